"""Plain functions behind PIPO on-policy distillation (DESIGN §2.5): PAD compaction and student/teacher divergences.

Everything here works on tensors only (no trainer state), so each piece has an exact unit test.

Slot alignment (DESIGN §2.5d), for a row `x[0..T-1]` with `T` even and `L = T/2`, `j = 0..L-2`:

- backbone latent `j` predicts `x[2j+2]` ↔ teacher position `2j+1` of the full-length (mapped-back) sequence;
- MTP position `j` predicts `x[2j+3]` ↔ teacher position `2j+2`.

The teacher never sees PADs: it runs on the compacted sequence and position `p` reads the teacher output at the last
real token at or before `p` (`index_map[p] = max(0, cumsum(keep)[p] - 1)`), i.e. its prediction of the next *real*
token — which is what the student must predict after a `(t, PAD)` pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modeling_pipo import IGNORE_INDEX

DIVERGENCES = ("full", "topk", "sampled")
FILL_LABEL = -1  # label value meaning "fill from the student's own distribution" (DESIGN §2.5e)


# ----------------------------------------------------------------------------------------------------------------------
# PAD compaction (DESIGN §2.5d)
# ----------------------------------------------------------------------------------------------------------------------


def compact_pads(
    input_ids: torch.LongTensor, keep: torch.Tensor, pad_token_id: int
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """Remove the positions not in `keep` from every row, order preserved.

    Args:
        input_ids: `[B, T]` token ids.
        keep: `[B, T]` bool, True for real tokens (not PAD, not batch padding).
        pad_token_id: fills the right padding of the compacted batch.

    Returns:
        `compact [B, K]` (right-padded with `pad_token_id`, `K = max kept per row`), `compact_mask [B, K]` (1 on kept
        tokens) and `index_map [B, T]` with `index_map[b, p] = max(0, cumsum(keep[b])[p] - 1)`: the compacted index of
        the last kept token at or before `p`.
    """
    if input_ids.shape != keep.shape:
        raise ValueError(f"keep shape {tuple(keep.shape)} does not match input_ids {tuple(input_ids.shape)}.")
    keep = keep.bool()
    counts = keep.sum(dim=1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    batch = input_ids.shape[0]
    compact = input_ids.new_full((batch, width), pad_token_id)
    compact_mask = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
    cumsum = keep.long().cumsum(dim=1)
    target = (cumsum - 1).clamp(min=0)
    rows = torch.arange(batch, device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    compact[rows[keep], target[keep]] = input_ids[keep]
    compact_mask[rows[keep], target[keep]] = 1
    return compact, compact_mask, target


def map_back(values: torch.Tensor, index_map: torch.LongTensor) -> torch.Tensor:
    """Full-length view of compacted per-position values: `out[b, p] = values[b, index_map[b, p]]`.

    `values` is `[B, K, ...]`; the result is `[B, T, ...]`.
    """
    index = index_map
    for _ in range(values.dim() - 2):
        index = index.unsqueeze(-1)
    index = index.expand(*index_map.shape, *values.shape[2:])
    return values.gather(1, index)


def teacher_slots(mapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split mapped-back teacher values `[B, T, ...]` into the backbone slots (positions `1, 3, ..., T-3`) and the
    MTP slots (positions `2, 4, ..., T-2`), each `[B, L-1, ...]`."""
    length = mapped.shape[1]
    if length % 2:
        raise ValueError(f"PIPO rows have even length, got {length}.")
    return mapped[:, 1 : length - 2 : 2], mapped[:, 2 : length - 1 : 2]


# ----------------------------------------------------------------------------------------------------------------------
# Divergences (DESIGN §2.5f)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DivergenceOutput:
    """Per-position results of [`divergence_from_logits`] / [`chunked_divergence`].

    Args:
        loss: `[N]` differentiable per-position loss (for `sampled`, a surrogate whose value is the single-sample
            KL estimate and whose gradient is the score-function gradient).
        divergence: `[N]` detached divergence value (exact for `full`, over the union for `topk`, the
            single-sample estimate `log p_s(y) - log p_t(y)` for `sampled`).
        alpha: `[N]` detached confidence target (`min(1, p_t(y)/p_s(y))`, or `1 - TV` for `full`).
        labels: `[N]` the label actually used (fill labels resolved).
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    alpha: torch.Tensor
    labels: torch.LongTensor


def _mask_columns(logits: torch.Tensor, columns: list[int] | None) -> torch.Tensor:
    if not columns:
        return logits
    logits = logits.clone()
    logits[..., columns] = float("-inf")
    return logits


def _xlogy_diff(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """`sum_v exp(p_log) (p_log - q_log)`, treating 0 · (anything) as 0 (masked entries are -inf)."""
    p = p_log.exp()
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p_log))
    return (p * diff).sum(-1)


def generalized_jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-position generalised JSD (trl GKD convention) over the last dim of log-probabilities.

    `beta = 1`: reverse KL `KL(p_s || p_t)`; `beta = 0`: forward KL `KL(p_t || p_s)`; otherwise
    `beta KL(p_t || M) + (1 - beta) KL(p_s || M)` with `M = beta p_t + (1 - beta) p_s`.
    """
    if beta == 1.0:
        return _xlogy_diff(student_log, teacher_log)
    if beta == 0.0:
        return _xlogy_diff(teacher_log, student_log)
    mix = torch.logsumexp(torch.stack([student_log + math.log1p(-beta), teacher_log + math.log(beta)]), dim=0)
    return beta * _xlogy_diff(teacher_log, mix) + (1.0 - beta) * _xlogy_diff(student_log, mix)


def resolve_fill_labels(
    student_logits: torch.Tensor, labels: torch.LongTensor, mode: str, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Replace [`FILL_LABEL`] entries: the student's argmax (`full`/`topk`, as the reference), or a sample from the
    student (`sampled`, so the score-function estimator stays unbiased at filled slots)."""
    fill = labels == FILL_LABEL
    if not bool(fill.any()):
        return labels
    with torch.no_grad():
        logits = student_logits[fill].float()
        if mode == "sampled":
            picked = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        else:
            picked = logits.argmax(-1)
    labels = labels.clone()
    labels[fill] = picked
    return labels


def divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.LongTensor,
    mode: str = "topk",
    beta: float = 1.0,
    topk: int = 32,
    temperature: float = 1.0,
) -> DivergenceOutput:
    """Per-position student/teacher divergence and confidence target from logits `[N, V]` (labels `[N]`, all valid).

    Modes (DESIGN §2.5f, `p` = softmax(logits / temperature)):

    - `full`: generalised JSD over the whole vocabulary (`beta=1` → reverse KL); `alpha = Σ_v min(p_s, p_t)`.
    - `topk`: the same over the union `U` = student top-k ∪ teacher top-k ∪ {y}, both renormalised on `U`;
      `alpha = min(1, p̃_t(y) / p̃_s(y))`.
    - `sampled`: the score-function estimator of `∇ KL(p_s || p_t)` for `y ~ p_s`: the loss is
      `d + d · (log p_s(y) - stopgrad(log p_s(y)))` with `d = stopgrad(log p_s(y) - log p_t(y))`, so its value is the
      single-sample KL estimate and its gradient `d ∇ log p_s(y)`, whose expectation is `∇ KL`. (The reference
      differentiates `log p_s(y) - log p_t(y)` itself, whose expected gradient is `E[∇ log p_s] = 0`.) Only `beta = 1`.
    """
    if mode not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {mode!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "distillation compares next-token distributions and needs a shared vocabulary."
        )
    if bool((labels < 0).any()):
        raise ValueError("divergence_from_logits needs valid labels (resolve FILL_LABEL first, drop -100).")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    y = labels.unsqueeze(-1)

    if mode == "sampled":
        if beta != 1.0:
            raise ValueError("divergence='sampled' estimates the reverse KL only; use beta=1.0.")
        ls_y = torch.log_softmax(s, -1).gather(-1, y).squeeze(-1)
        with torch.no_grad():
            lt_y = torch.log_softmax(t, -1).gather(-1, y).squeeze(-1)
            d = ls_y.detach() - lt_y
        loss = d + d * (ls_y - ls_y.detach())
        alpha = torch.exp(-d.clamp(min=0))
        return DivergenceOutput(loss=loss, divergence=d, alpha=alpha, labels=labels)

    if mode == "full":
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t.detach(), -1)
        loss = generalized_jsd(ls, lt, beta)
        with torch.no_grad():
            alpha = torch.minimum(ls.exp(), lt.exp()).sum(-1).clamp(0.0, 1.0)
        return DivergenceOutput(loss=loss, divergence=loss.detach(), alpha=alpha, labels=labels)

    # topk over the union of supports
    k = min(topk, s.shape[-1])
    with torch.no_grad():
        idx = torch.cat([s.topk(k, -1).indices, t.topk(k, -1).indices, y], dim=-1)
        idx, _ = idx.sort(-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        y_pos = ((idx == y) & ~dup).float().argmax(-1, keepdim=True)
    neg_inf = torch.tensor(float("-inf"), device=s.device)
    s_u = torch.where(dup, neg_inf, s.gather(-1, idx))
    t_u = torch.where(dup, neg_inf, t.detach().gather(-1, idx))
    ls, lt = torch.log_softmax(s_u, -1), torch.log_softmax(t_u, -1)
    loss = generalized_jsd(ls, lt, beta)
    with torch.no_grad():
        ratio = lt.gather(-1, y_pos) - ls.gather(-1, y_pos)
        alpha = torch.exp(ratio.squeeze(-1).clamp(max=0))
    return DivergenceOutput(loss=loss, divergence=loss.detach(), alpha=alpha, labels=labels)


def _chunk_loss(s_hidden, t_logits, labels, head, mode, beta, topk, temperature, masked):
    s_logits = _mask_columns(head(s_hidden), masked)
    out = divergence_from_logits(s_logits, t_logits, labels, mode, beta, topk, temperature)
    return out.loss, out.divergence, out.alpha


def chunked_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.LongTensor,
    student_head: nn.Module,
    teacher_head,
    mode: str = "topk",
    beta: float = 1.0,
    topk: int = 32,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    masked_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> DivergenceOutput:
    """[`divergence_from_logits`] over hidden states `[N, H]`, `chunk_size` rows at a time.

    Teacher logits are computed per chunk without gradients; the student chunk is checkpointed, so neither pass
    holds more than `[chunk_size, V]` logits at once. `masked_token_ids` (e.g. the PIPO PAD) are removed from both
    vocabularies before the softmax. Labels may contain [`FILL_LABEL`], resolved from the student chunk.
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0] or student_hidden.shape[0] != labels.shape[0]:
        raise ValueError("student_hidden, teacher_hidden and labels must have the same number of rows.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    losses, divs, alphas, used = [], [], [], []
    for start in range(0, student_hidden.shape[0], chunk_size):
        sh = student_hidden[start : start + chunk_size]
        th = teacher_hidden[start : start + chunk_size]
        y = labels[start : start + chunk_size]
        with torch.no_grad():
            t_logits = _mask_columns(teacher_head(th).float(), masked_token_ids)
            if bool((y == FILL_LABEL).any()):
                y = resolve_fill_labels(_mask_columns(student_head(sh.detach()), masked_token_ids), y, mode, generator)
        needs_grad = torch.is_grad_enabled() and (
            sh.requires_grad or any(p.requires_grad for p in student_head.parameters())
        )
        args = (sh, t_logits, y, student_head, mode, beta, topk, temperature, masked_token_ids)
        if needs_grad:
            loss, div, alpha = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            loss, div, alpha = _chunk_loss(*args)
        losses.append(loss)
        divs.append(div)
        alphas.append(alpha)
        used.append(y)
    if not losses:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return DivergenceOutput(empty, empty, empty, labels)
    return DivergenceOutput(torch.cat(losses), torch.cat(divs), torch.cat(alphas), torch.cat(used))


def vocab_rows(model: nn.Module) -> int:
    """Rows of a model's LM head (its real vocabulary width, which may exceed `config.vocab_size` of the tokenizer)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head).")
    return int(head.weight.shape[0])


def teacher_logits_fn(teacher: nn.Module, vocab_size: int | None = None):
    """A callable `hidden [N, H] -> logits [N, V]` reproducing the teacher's own LM-head post-processing
    (`logit_scale` multipliers and final logit soft-capping, where the config declares them).

    With `vocab_size` larger than the teacher's vocabulary (a student whose vocabulary extends the teacher's, e.g.
    by the PAD that `from_backbone` appended), the missing columns are `-inf`: the teacher gives those ids no mass.
    """
    head = teacher.get_output_embeddings()
    if head is None:
        raise ValueError(f"teacher {type(teacher).__name__} has no output embeddings (LM head).")
    rows = int(head.weight.shape[0])
    if vocab_size is not None and vocab_size < rows:
        raise ValueError(f"the teacher's vocabulary ({rows}) is larger than the student's ({vocab_size}).")
    extra = 0 if vocab_size is None else vocab_size - rows
    config = teacher.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden.to(head.weight.dtype))
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if extra:
            logits = torch.cat([logits, logits.new_full((*logits.shape[:-1], extra), float("-inf"))], dim=-1)
        return logits

    return project




# ----------------------------------------------------------------------------------------------------------------------
# The whole OPD objective for one batch of PIPO rows (DESIGN §2.5 c-g)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OPDLossOutput:
    """Result of [`opd_loss`]. Grids are `[B, L-1]` (NaN where a slot is not supervised).

    Args:
        loss: `backbone_loss + mtp_loss_weight · mtp_loss + confidence_loss_weight · confidence_loss`.
        backbone_loss / mtp_loss: mean per-position divergence loss over supervised backbone / MTP slots.
        confidence_loss: BCE of the confidence head against `alpha` at supervised MTP slots.
        backbone_divergence / mtp_divergence / alpha / confidence: per-slot grids (detached).
        backbone_valid / mtp_valid / filled: masks of supervised slots and of MTP slots filled at PADs.
    """

    loss: torch.Tensor
    backbone_loss: torch.Tensor
    mtp_loss: torch.Tensor
    confidence_loss: torch.Tensor
    backbone_divergence: torch.Tensor
    mtp_divergence: torch.Tensor
    alpha: torch.Tensor
    confidence: torch.Tensor
    backbone_valid: torch.Tensor
    mtp_valid: torch.Tensor
    filled: torch.Tensor


def _grid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    grid = torch.full(valid.shape, float("nan"), device=valid.device)
    grid[valid] = values.detach().float()
    return grid


def teacher_hidden_states(teacher: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None):
    """Post-norm last hidden states of a causal LM's body (`base_model`, else `get_decoder()`)."""
    body = teacher.base_model if teacher.base_model is not teacher else teacher.get_decoder()
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
    return body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state


def opd_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    labels: torch.LongTensor,
    *,
    divergence: str = "topk",
    beta: float = 1.0,
    topk: int = 32,
    temperature: float = 1.0,
    fill_pad_labels: bool = True,
    mtp_loss_weight: float | None = None,
    confidence_loss_weight: float | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> OPDLossOutput:
    """OPD loss of a PIPO student against a frozen teacher on rows laid out in pairs (e.g. rollouts).

    1. Student training forward (token1 teacher-forced): `h [B, L, H]`, `m [B, L-1, H]`, confidence logits.
    2. Teacher on the PAD-compacted rows; hidden states mapped back and split into backbone / MTP slots.
    3. Divergences (chunked) at backbone slots (label `x[2j+2]`) and MTP slots (label `x[2j+3]`; at PAD slots the
       label is filled from the student when `fill_pad_labels`, except after an EOS token1).
    4. Confidence BCE against the detached α at supervised MTP slots. Empty sets give zero-valued "ghost" terms that
       keep every parameter in the graph.

    `student` may be wrapped by peft (its base must expose `lm_head` and the PIPO config); `teacher` is a plain causal
    LM. PAD is removed from both vocabularies (it is never a prediction target). The loss weights default to the
    student config's `mtp_loss_weight` / `confidence_loss_weight`.
    """
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    config = base.config
    if mtp_loss_weight is None:
        mtp_loss_weight = config.mtp_loss_weight
    if confidence_loss_weight is None:
        confidence_loss_weight = config.confidence_loss_weight
    pad = config.pad_token_id
    out = student(input_ids=input_ids, attention_mask=attention_mask, return_logits=False, use_cache=False)
    if out.pair_input_ids.shape != input_ids.shape:
        raise ValueError("OPD rows must already be laid out in pairs (even rows, PAD after odd prompts).")
    hidden, mtp_hidden, conf_logits = out.last_hidden_state, out.mtp_last_hidden_state, out.confidence_logits
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    is_pad = (input_ids == pad) & real
    if bool(is_pad[:, 0::2].any()):
        raise ValueError("a PAD sits in a token1 (even) slot; PIPO rows only ever have PADs in draft slots.")
    if mtp_hidden is None:  # a single pair: nothing to predict inside the row
        zero = hidden.sum() * 0.0
        empty = torch.zeros((input_ids.shape[0], 0), dtype=torch.bool, device=input_ids.device)
        nan = empty.float()
        return OPDLossOutput(zero, zero, zero, zero, nan, nan, nan, nan, empty, empty, empty)

    compact, compact_mask, index = compact_pads(input_ids, real & ~is_pad, pad)
    teacher_rows = vocab_rows(teacher)
    beyond = compact >= teacher_rows
    if bool(beyond.any()):
        if bool((beyond & compact_mask.bool()).any()):
            bad = int(compact[beyond & compact_mask.bool()][0])
            raise ValueError(f"token id {bad} is outside the teacher's vocabulary ({teacher_rows} ids).")
        compact = compact.masked_fill(beyond, 0)  # padding slots of the compacted rows (the PAD id): never attended
    with torch.no_grad():
        teacher_hidden = teacher_hidden_states(teacher, compact, compact_mask)
    t_back, t_mtp = teacher_slots(map_back(teacher_hidden, index))

    back_labels = labels[:, 2::2]
    mtp_labels = labels[:, 3::2].clone()
    filled = torch.zeros_like(mtp_labels, dtype=torch.bool)
    if fill_pad_labels:
        eos = list(config.eos_token_ids)
        after_eos = torch.isin(input_ids[:, 2::2], torch.tensor(eos, device=input_ids.device)) if eos else filled
        filled = is_pad[:, 3::2] & ~after_eos
        mtp_labels[filled] = FILL_LABEL
    valid_b = back_labels != IGNORE_INDEX
    valid_m = mtp_labels != IGNORE_INDEX

    # A teacher whose vocabulary is a prefix of the student's: the student-only ids (the PAD that from_backbone
    # appended, padding rows) get -inf teacher logits and are removed from both distributions, like the PAD.
    student_rows = vocab_rows(base)
    masked = [pad] + [i for i in range(teacher_rows, student_rows) if i != pad]
    common = dict(
        student_head=base.get_output_embeddings(),
        teacher_head=teacher_logits_fn(teacher, vocab_size=student_rows),
        mode=divergence,
        beta=beta,
        topk=topk,
        temperature=temperature,
        chunk_size=chunk_size or config.loss_chunk_size,
        masked_token_ids=masked,
        generator=generator,
    )
    hb = hidden[:, :-1]
    div_b = chunked_divergence(hb[valid_b], t_back[valid_b].to(hb.dtype), back_labels[valid_b], **common)
    div_m = chunked_divergence(
        mtp_hidden[valid_m], t_mtp[valid_m].to(mtp_hidden.dtype), mtp_labels[valid_m], **common
    )
    backbone_loss = div_b.loss.mean() if div_b.loss.numel() else hb.sum() * 0.0
    mtp_loss = div_m.loss.mean() if div_m.loss.numel() else mtp_hidden.sum() * 0.0
    conf = conf_logits[valid_m].float()
    if conf.numel():
        confidence_loss = F.binary_cross_entropy_with_logits(conf, div_m.alpha.float())
    else:
        confidence_loss = conf_logits.sum() * 0.0  # ghost term: the head still gets a (zero) gradient
    loss = backbone_loss + mtp_loss_weight * mtp_loss + confidence_loss_weight * confidence_loss
    return OPDLossOutput(
        loss=loss,
        backbone_loss=backbone_loss,
        mtp_loss=mtp_loss,
        confidence_loss=confidence_loss,
        backbone_divergence=_grid(div_b.divergence, valid_b),
        mtp_divergence=_grid(div_m.divergence, valid_m),
        alpha=_grid(div_m.alpha, valid_m),
        confidence=_grid(torch.sigmoid(conf), valid_m),
        backbone_valid=valid_b,
        mtp_valid=valid_m,
        filled=filled,
    )


__all__ = [
    "DIVERGENCES",
    "FILL_LABEL",
    "DivergenceOutput",
    "compact_pads",
    "map_back",
    "teacher_slots",
    "generalized_jsd",
    "divergence_from_logits",
    "chunked_divergence",
    "resolve_fill_labels",
    "teacher_logits_fn",
    "vocab_rows",
    "teacher_hidden_states",
    "opd_loss",
    "OPDLossOutput",
]
