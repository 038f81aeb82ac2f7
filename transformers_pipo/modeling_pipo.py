"""PIPO (Pair-In, Pair-Out) model for any Hugging Face decoder-only backbone.

Pair-in: two token embeddings are folded by a compressor into one latent, so the backbone runs over half as many
positions. Pair-out: from each backbone hidden state the shared LM head predicts token1, and a one-layer MTP head
(a decoder layer of the backbone's own class, with its own cache) predicts token2 from [E(token1); h]. A confidence
head scores token2; generation replaces low-confidence drafts by PAD.

Shipped as remote code by ``save_pretrained``; only ``from .x import y`` links it to its siblings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput, logging

from .configuration_pipo import PipoConfig, _backbone_hidden_size
from .generation_pipo import DEFAULT_CONFIDENCE_THRESHOLD, pipo_generate_entry
from .modelcard_pipo import PipoModelCardMixin

IGNORE_INDEX = -100  # label of a position that is not trained (transformers' convention)
logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Parity rules (DESIGN §1.2)
# ----------------------------------------------------------------------------------------------------------------------


def align_row(ids: list[int], labels: list[int] | None, pad_token_id: int) -> tuple[list[int], list[int] | None]:
    """Apply the PIPO parity rules to one unpadded row.

    A PAD (label -100) is inserted where the first labelled token sits at an odd index, so no pair straddles the
    prompt/response boundary, and one more PAD is appended when the total length is odd. PADs only ever land in
    odd (draft) slots.
    """
    ids = list(ids)
    labels = None if labels is None else list(labels)
    if labels is not None:
        if len(labels) != len(ids):
            raise ValueError(f"labels length {len(labels)} does not match input length {len(ids)}.")
        start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        if start % 2 == 1 and start < len(ids):
            ids.insert(start, pad_token_id)
            labels.insert(start, IGNORE_INDEX)
    if len(ids) % 2 == 1:
        ids.append(pad_token_id)
        if labels is not None:
            labels.append(IGNORE_INDEX)
    return ids, labels


def pair_layout(
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.LongTensor | None, torch.Tensor | None]:
    """Return `(input_ids, labels, attention_mask)` laid out in whole pairs.

    Inputs that already satisfy the rules are returned unchanged (no copy). Otherwise every row's real tokens are
    re-aligned with [`align_row`] and the batch is re-padded in whole pairs on the side it was padded on.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(input_ids.shape)}."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}."
        )
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("input_ids is empty: PIPO needs at least one token.")
    mask_all_ones = attention_mask is None or bool(attention_mask.all())
    if length % 2 == 0 and mask_all_ones:
        if labels is None:
            return input_ids, labels, attention_mask
        starts = _first_label_index(labels)
        if bool((starts % 2 == 0).all()):
            return input_ids, labels, attention_mask

    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    left_padded = bool((~mask[:, 0]).any())
    rows, row_labels = [], []
    for b in range(batch):
        keep = mask[b]
        ids, lab = align_row(
            input_ids[b][keep].tolist(), None if labels is None else labels[b][keep].tolist(), pad_token_id
        )
        rows.append(ids)
        row_labels.append(lab)
    width = max(len(r) for r in rows)
    out_ids = input_ids.new_full((batch, width), pad_token_id)
    out_mask = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
    out_labels = None if labels is None else labels.new_full((batch, width), IGNORE_INDEX)
    for b, ids in enumerate(rows):
        sl = slice(width - len(ids), width) if left_padded else slice(0, len(ids))
        out_ids[b, sl] = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
        out_mask[b, sl] = 1
        if out_labels is not None:
            out_labels[b, sl] = torch.tensor(row_labels[b], dtype=labels.dtype, device=labels.device)
    return out_ids, out_labels, (None if bool(out_mask.all()) else out_mask)


def _first_label_index(labels: torch.LongTensor) -> torch.LongTensor:
    """Index of the first labelled token per row (row length when none is labelled)."""
    valid = labels != IGNORE_INDEX
    idx = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(valid, idx, labels.shape[1]).min(dim=1).values


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class PipoLinearCompressor(nn.Module):
    """`z = W [a; b] + c`; identity-like init `W = [I | I]`, `c = 0` gives `z = a + b`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(2 * hidden_size, hidden_size, bias=True)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.linear(pairs)

    def init_identity_like(self) -> None:
        eye = torch.eye(self.hidden_size, device=self.linear.weight.device, dtype=self.linear.weight.dtype)
        init.copy_(self.linear.weight, torch.cat([eye, eye], dim=1))
        init.zeros_(self.linear.bias)


class PipoMLPCompressor(nn.Module):
    """`z = W2 SiLU(W1 [a; b] + c1) + c2`; init `W1 = I`, `W2 = [I | I]` gives `z = SiLU(a) + SiLU(b)`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(2 * hidden_size, hidden_size, bias=True),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(pairs)

    def init_identity_like(self) -> None:
        first, last = self.mlp[0], self.mlp[2]
        kw = {"device": first.weight.device, "dtype": first.weight.dtype}
        init.copy_(first.weight, torch.eye(2 * self.hidden_size, **kw))
        init.zeros_(first.bias)
        eye = torch.eye(self.hidden_size, **kw)
        init.copy_(last.weight, torch.cat([eye, eye], dim=1))
        init.zeros_(last.bias)


class PipoGatedCompressor(nn.Module):
    """`z = sigmoid(alpha(a)) a + sigmoid(beta(b)) b + delta(a - b)`.

    Unlike the reference (random `delta`), `delta` starts at zero, so the init is `z = (a + b) / 2` exactly.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.alpha = nn.Linear(hidden_size, 1, bias=True)
        self.beta = nn.Linear(hidden_size, 1, bias=True)
        self.delta = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        a, b = pairs.split(self.hidden_size, dim=-1)
        return torch.sigmoid(self.alpha(a)) * a + torch.sigmoid(self.beta(b)) * b + self.delta(a - b)

    def init_identity_like(self) -> None:
        init.zeros_(self.alpha.weight)
        init.zeros_(self.alpha.bias)
        init.zeros_(self.beta.weight)
        init.zeros_(self.beta.bias)
        init.zeros_(self.delta.weight)


COMPRESSOR_CLASSES: dict[str, type[nn.Module]] = {
    "linear": PipoLinearCompressor,
    "mlp": PipoMLPCompressor,
    "gated": PipoGatedCompressor,
}


def _norm_template(body: nn.Module) -> nn.Module:
    """The backbone's final norm module (its class and eps are reused for every new PIPO norm)."""
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm"):
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"Cannot find the final norm of backbone {type(body).__name__}; PIPO reuses its class for the new heads."
    )


def make_norm(template: nn.Module, size: int) -> nn.Module:
    """A new norm of `size` features, of the same class and epsilon as `template`."""
    eps = None
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(template, attr, None), float):
            eps = getattr(template, attr)
            break
    cls = type(template)
    try:
        return cls(size, eps=eps) if eps is not None else cls(size)
    except TypeError:
        return cls(size)


def norm_style_of(template: nn.Module) -> str:
    """Classify a norm: LayerNorm, zero-centred RMSNorm (`x * (1 + w)`) or plain RMSNorm (`x * w`)."""
    if isinstance(template, nn.LayerNorm) or getattr(template, "bias", None) is not None:
        return "layernorm"
    with torch.device("cpu"), torch.no_grad():
        probe = make_norm(template, 4)
        if probe.weight is not None:
            probe.weight.zero_()
        out = probe(torch.ones(1, 4))
    return "one_plus_w" if bool(out.abs().sum() > 0) else "w"


_FUSED_NORM_KEY = "_pipo_fused_norm"  # on a norm's __dict__: {(dtype, device): eps, or False when not fusable}
# torch's global module hooks (`register_module_forward_(pre_)hook`), which a direct `F.rms_norm` call would skip
_GLOBAL_FORWARD_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


def decode_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in a no-grad eager decode step, as one `F.rms_norm` call where that is bitwise the module's result.

    A plain RMSNorm (`w * x / rms(x)`, the Llama/Qwen form) runs about seven ops and three module-level Python
    frames per call; at batch 1 that overhead is the cost. Whether `F.rms_norm` gives bitwise the module's output is
    checked once per module, dtype and device on a probe (a zero-centred `(1 + w)` norm, a LayerNorm or any other
    form fails it and keeps its own forward). Modules with hooks (device maps, offloading) and grad-enabled or
    compiled calls always take the module's forward.
    """
    if (torch.is_grad_enabled() or norm._forward_hooks or norm._forward_pre_hooks or _GLOBAL_FORWARD_HOOKS[0]
            or _GLOBAL_FORWARD_HOOKS[1] or torch.compiler.is_compiling()):
        return norm(x)
    decided = norm.__dict__.get(_FUSED_NORM_KEY)
    if decided is None:
        decided = norm.__dict__[_FUSED_NORM_KEY] = {}
    key = (x.dtype, x.device)
    eps = decided.get(key)
    if eps is None:
        eps = decided[key] = _fused_norm_eps(norm, x)
    if eps is False:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _fused_norm_eps(norm: nn.Module, x: torch.Tensor) -> float | bool:
    """The epsilon with which `F.rms_norm` reproduces `norm` bitwise on a probe in `x`'s dtype and device, else
    False."""
    eps = next((getattr(norm, a) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(norm, a, None), float)), None)
    weight = getattr(norm, "weight", None)
    size = x.shape[-1]
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != size or \
            weight.device != x.device or weight.device.type == "meta":
        return False
    # rows of different scales (tiny, unit, large), so an epsilon or a mean-centring difference shows
    base = torch.sin(torch.arange(3 * size, device=x.device, dtype=torch.float32) * 0.61 + 0.3).reshape(3, size)
    probe = (base * torch.tensor([[1e-3], [1.0], [30.0]], device=x.device)).to(x.dtype)
    return eps if torch.equal(norm(probe), F.rms_norm(probe, (size,), weight, eps)) else False


def _decoder_layers(body: nn.Module, num_layers: int) -> nn.ModuleList:
    for child in body.children():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return child
    raise ValueError(f"Cannot find the decoder layer list of backbone {type(body).__name__}.")


def _mtp_body_config(backbone_config):
    """Backbone config reduced to one full-attention layer: the MTP layer's own config and cache layout."""
    cfg = copy.deepcopy(backbone_config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"]
    for name in ("mlp_layer_types",):
        value = getattr(cfg, name, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, name, value[-1:])
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    if getattr(cfg, "use_sliding_window", None):
        cfg.use_sliding_window = False
    return cfg


class PipoMTPHead(nn.Module):
    """MTP head: `fc([norm_e(E(token1)); norm_h(h)])` → one decoder layer of the backbone's class → final norm.

    The layer runs inside a one-layer instance of the backbone's own model class (so masks, RoPE, learned positions
    and caches behave exactly as in the backbone), forced to full attention. That instance's children are
    registered directly on this module, giving checkpoint keys `mtp.layers.0.*` and `mtp.norm.*` as in the
    reference; its (unused) input embedding is dropped.
    """

    def __init__(self, backbone_config, norm_template: nn.Module):
        super().__init__()
        hidden = _backbone_hidden_size(backbone_config)
        self.body_config = _mtp_body_config(backbone_config)
        body = AutoModel.from_config(self.body_config)
        embedding = body.get_input_embeddings()
        for name, child in list(body.named_children()):
            if child is embedding:
                setattr(body, name, None)
            else:
                self.add_module(name, child)
        if any(True for _ in body.named_parameters(recurse=False)):
            raise ValueError(f"{type(body).__name__} holds parameters outside submodules; unsupported as MTP body.")
        object.__setattr__(self, "_body", body)  # not a submodule: its children are registered above
        # Tensor parallelism (`tp_plan="auto"`): the MTP layer is sharded like the backbone's layers (transformers
        # gathers a child module's `_tp_plan` under its name, giving `mtp.layers.*` entries).
        backbone_plan = getattr(backbone_config, "base_model_tp_plan", None) or {}
        self._tp_plan = {k: v for k, v in backbone_plan.items() if k.startswith("layers.")}
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = make_norm(norm_template, hidden)
        self.pre_fc_norm_hidden = make_norm(norm_template, hidden)
        self.hidden_size = hidden

    def train(self, mode: bool = True):
        super().train(mode)
        self._body.train(mode)
        return self

    def decoder_layer(self) -> nn.Module:
        layers = self.__dict__.get("_layer_list")  # found once, not by a search over children at every decode step
        if layers is None:
            layers = self.__dict__["_layer_list"] = _decoder_layers(self, 1)
        return layers[0]

    def init_fc(self, scheme: str) -> None:
        if scheme == "random":
            return
        h = self.hidden_size
        kw = {"device": self.fc.weight.device, "dtype": self.fc.weight.dtype}
        eye = torch.eye(h, **kw)
        left = torch.zeros(h, h, **kw) if scheme == "hidden_only" else 0.5 * eye
        right = eye if scheme == "hidden_only" else 0.5 * eye
        init.copy_(self.fc.weight, torch.cat([left, right], dim=1))

    def forward(
        self,
        token1_embeds: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(token1_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        out = self._body(
            inputs_embeds=u,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state

    def decode_step(
        self,
        token1_embeds: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One cached decode position, calling the decoder layer directly (no one-layer model forward).

        Same computation as `forward` for bodies whose forward is `rotary embedding -> layers -> norm` (every
        rotary backbone: Llama, Mistral, Qwen2/3/3.5, ...): the layer gets its cache, its position embeddings and
        the mask from `create_causal_mask`, without the model-level wrappers. Other bodies (learned positions, e.g.
        GPT-2) take the full `forward`. `position_embeddings`: the backbone's cos/sin at `position_ids`, when its
        rotary embedding equals this one (see `PipoModel.mtp_step`); used when dtype and device match.
        """
        if not self.uses_lean_step():
            return self.forward(token1_embeds, hidden, attention_mask, position_ids, cache=cache, use_cache=True)
        u = self.fc(torch.cat([decode_norm(self.pre_fc_norm_embedding, token1_embeds),
                               decode_norm(self.pre_fc_norm_hidden, hidden)], dim=-1))
        mask = decode_causal_mask(config=self.body_config, inputs_embeds=u, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        if position_embeddings is None or position_embeddings[0].dtype != u.dtype or \
                position_embeddings[0].device != u.device:
            position_embeddings = self.rotary_emb(u, position_ids)
        out = self.decoder_layer()(u, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                                   position_embeddings=position_embeddings)
        return decode_norm(self.norm, out)

    def uses_lean_step(self) -> bool:
        """Whether `decode_step` calls the layer directly (rotary bodies) or the full one-layer forward."""
        import inspect

        lean = self.__dict__.get("_lean_cached")
        if lean is None:
            layer = self.decoder_layer()
            lean = (
                isinstance(getattr(self, "rotary_emb", None), nn.Module)
                and isinstance(getattr(self, "norm", None), nn.Module)
                and "position_embeddings" in inspect.signature(layer.forward).parameters
                and getattr(self.body_config, "layer_types", ["full_attention"])[0] == "full_attention"
            )
            self.__dict__["_lean_cached"] = lean
        return lean


class PipoConfidenceHead(nn.Module):
    """`norm(2H) → Linear(2H, Hc, no bias) → SiLU → Linear(Hc, 1, no bias)` on `[h; m]`; gives a draft logit."""

    def __init__(self, hidden_size: int, inner_size: int, norm_template: nn.Module):
        super().__init__()
        self.norm = make_norm(norm_template, 2 * hidden_size)
        self.fc1 = nn.Linear(2 * hidden_size, inner_size, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(inner_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, mtp_hidden], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(decode_norm(self.norm, x)))).squeeze(-1)  # norm(x) outside decoding


def _token_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="none")


def chunked_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int) -> torch.Tensor:
    """Per-token negative log-likelihood of `labels` under `lm_head(hidden)`, computed `chunk_size` rows at a time.

    Each chunk is checkpointed, so neither forward nor backward ever holds more than `[chunk_size, V]` logits:
    peak memory does not grow with sequence length × vocabulary.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters())):
            pieces.append(checkpoint(_token_nll, h, y, lm_head, use_reentrant=False))
        else:
            pieces.append(_token_nll(h, y, lm_head))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


# ----------------------------------------------------------------------------------------------------------------------
# Losses (DESIGN §2.3)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PipoLossOutput(ModelOutput):
    """Result of [`pipo_sft_loss`].

    Args:
        loss: `backbone_loss + mtp_loss_weight * mtp_loss + confidence_loss_weight * confidence_loss`.
        backbone_loss / mtp_loss / confidence_loss: the three terms, each normalised as described in
            [`pipo_sft_loss`].
    """

    loss: torch.FloatTensor | None = None
    backbone_loss: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    confidence_loss: torch.FloatTensor | None = None


def _normalise(total: torch.Tensor, count: torch.Tensor | int, num_items_in_batch) -> torch.Tensor:
    """A per-head sum divided by its own count, or by half of `num_items_in_batch` (see [`pipo_sft_loss`])."""
    if num_items_in_batch is None:
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / (num_items_in_batch / 2)


def pipo_sft_loss(
    hidden: torch.Tensor,
    mtp_hidden: torch.Tensor | None,
    confidence_logits: torch.Tensor | None,
    labels: torch.LongTensor,
    lm_head: nn.Module,
    config: PipoConfig,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> PipoLossOutput:
    """The PIPO SFT objective (DESIGN §2.3): backbone CE (target `labels[2j+2]`), MTP CE (target `labels[2j+3]`) and
    the confidence BCE against the detached `p_MTP(gold token2)`, weighted by `config.mtp_loss_weight` and
    `config.confidence_loss_weight` (the only place the weights are read).

    Normalisation:
        - without `num_items_in_batch`, each term is a mean over its own labelled positions (the reference
          objective);
        - with `num_items_in_batch` (what `transformers.Trainer` passes: the labelled tokens of the whole
          gradient-accumulation step, over every micro-batch), each term's per-token **sum** is divided by
          `num_items_in_batch / 2`. Every labelled token is the target of exactly one head, so `N/2` is each head's
          share of an evenly split batch; the loss is then additive over micro-batches, and `k` accumulation steps
          give exactly the update of one step over the `k`-times batch (DESIGN §2.3).

    PAD is never a target (labels equal to the PAD id are ignored). With no labelled position, a term is a zero that
    stays attached to the graph (a ghost term: DDP/ZeRO need a gradient for every head on every rank).
    """
    labels = labels.masked_fill(labels == config.pad_token_id, IGNORE_INDEX)
    chunk = config.loss_chunk_size
    tok1_labels = labels[:, 2::2]
    valid = tok1_labels != IGNORE_INDEX
    if bool(valid.any()):
        hb = hidden[:, : tok1_labels.shape[1]]
        nll = chunked_nll(hb[valid], tok1_labels[valid], lm_head, chunk)
        backbone_loss = _normalise(nll.sum(), nll.numel(), num_items_in_batch)
    else:
        backbone_loss = hidden.sum() * 0.0
    if mtp_hidden is None:
        mtp_loss = confidence_loss = hidden.sum() * 0.0
    else:
        tok2_labels = labels[:, 3::2]
        valid2 = tok2_labels != IGNORE_INDEX
        if bool(valid2.any()):
            nll = chunked_nll(mtp_hidden[valid2], tok2_labels[valid2], lm_head, chunk)
            target = torch.exp(-nll.detach()).clamp(0.0, 1.0)
            bce = F.binary_cross_entropy_with_logits(confidence_logits[valid2].float(), target, reduction="sum")
            mtp_loss = _normalise(nll.sum(), nll.numel(), num_items_in_batch)
            confidence_loss = _normalise(bce, nll.numel(), num_items_in_batch)
        else:
            mtp_loss = mtp_hidden.sum() * 0.0
            confidence_loss = confidence_logits.sum() * 0.0
    loss = backbone_loss + config.mtp_loss_weight * mtp_loss + config.confidence_loss_weight * confidence_loss
    return PipoLossOutput(
        loss=loss, backbone_loss=backbone_loss, mtp_loss=mtp_loss, confidence_loss=confidence_loss
    )


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint layout (DESIGN §6)
# ----------------------------------------------------------------------------------------------------------------------

PIPO_HEADS = ("compressor", "mtp", "confidence_head")
# Checkpoints written before the PipoModel / PipoForCausalLM split kept the backbone under `model.*` and the heads at
# the top level (the reference layout). `from_pretrained` renames them with transformers' `key_mapping`.
LEGACY_KEY_MAPPING = {
    r"^model\.(?!backbone\.|compressor\.|mtp\.|confidence_head\.)": "model.backbone.",
    **{rf"^{head}\.": f"model.{head}." for head in PIPO_HEADS},
}


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class PipoPreTrainedModel(PreTrainedModel):
    config: PipoConfig
    config_class = PipoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Heads kept in fp32 and never quantized (quantizers match these names from the start of a module path, so the
    # causal LM names them under its `model.`). The non-strict list only upcasts under fp16; the strict one also keeps
    # them fp32 when loading in bf16, matching from_backbone (which builds them in fp32), so a bf16 save -> load round
    # trip is lossless.
    _keep_in_fp32_modules = ["compressor", "confidence_head"]
    _keep_in_fp32_modules_strict = ["compressor", "confidence_head"]

    def _init_weights(self, module: nn.Module) -> None:
        backbone = getattr(getattr(self, "model", self), "backbone", None)
        if isinstance(module, tuple(COMPRESSOR_CLASSES.values())):
            module.init_identity_like()
        elif isinstance(module, PipoMTPHead):
            module.init_fc(self.config.mtp_fc_init)
        elif isinstance(backbone, PreTrainedModel):
            # New norms and layers use the backbone's own init (e.g. zero weights for (1 + w) RMSNorms).
            backbone._init_weights(module)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, also reading checkpoints in the layout written before the
        `PipoModel` split (DESIGN §6) through transformers' `key_mapping`.

        A re-save writes the current layout: the legacy renaming is used for loading only.
        """
        if issubclass(cls, PipoForCausalLM):
            kwargs["key_mapping"] = {**LEGACY_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        conversions = getattr(loaded, "_weight_conversions", None)
        if conversions:
            legacy = set(LEGACY_KEY_MAPPING)
            loaded._weight_conversions = [
                c for c in conversions if not set(getattr(c, "_original_source_patterns", None) or []) <= legacy
            ]
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, also from a model sharded with FSDP2.

        FSDP2 (`fully_shard`) swaps the instance's class for a generated `FSDP<Name>(FSDPModule, <Name>)` defined in
        torch; remote-code saving copies the file of `type(self)`, so this saves as the wrapped class itself (the
        state dict the caller passes is already gathered) and the folder ships modeling_pipo.py with a PIPO
        `auto_map`.
        """
        sharded_class = type(self)
        bases = sharded_class.__bases__
        if len(bases) == 2 and bases[0].__name__ in ("FSDPModule", "ReplicateModule"):
            self.__class__ = bases[1]
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class


@dataclass
class PipoModelOutput(ModelOutput):
    """Output of [`PipoModel.forward`]. Latent `j` holds tokens `(x[2j], x[2j+1])` of `pair_input_ids`.

    Args:
        last_hidden_state: `[B, L, H]` backbone outputs after the final norm (`h`).
        cache: the backbone cache (one entry per latent), when `use_cache`.
        hidden_states: the backbone's per-layer hidden states, when `output_hidden_states`.
        attentions: the backbone's per-layer attention weights, when `output_attentions`.
        mtp_last_hidden_state: `[B, L-1, H]` MTP outputs after the MTP norm (`m`; None for a single latent).
        mtp_cache: the MTP layer's own cache, when `use_cache`.
        confidence_logits: `[B, L-1]` draft-confidence logits (sigmoid gives `c`).
        pair_input_ids / pair_attention_mask: the inputs after [`pair_layout`] (identical to the inputs when
            they were already laid out in pairs); every position index above refers to them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    mtp_last_hidden_state: torch.FloatTensor | None = None
    mtp_cache: Cache | None = None
    confidence_logits: torch.FloatTensor | None = None
    pair_input_ids: torch.LongTensor | None = None
    pair_attention_mask: torch.LongTensor | None = None


@dataclass
class PipoCausalLMOutput(ModelOutput):
    """Output of [`PipoForCausalLM.forward`].

    Latent `j` holds tokens `(x[2j], x[2j+1])` of `pair_input_ids`. `logits[:, j]` predicts `x[2j+2]` (token1) and
    `mtp_logits[:, j]` predicts `x[2j+3]` (token2), for `j < L-1`.

    Args:
        loss / backbone_loss / mtp_loss / confidence_loss: see [`pipo_sft_loss`].
        logits: `[B, L, V]` token1 logits (the last `logits_to_keep` latents; None with `return_logits=False`).
        mtp_logits: `[B, L-1, V]` token2 logits (the last `logits_to_keep` positions; None with
            `return_logits=False`).
        confidence_logits: `[B, L-1]` draft-confidence logits (sigmoid gives `c`).
        cache / mtp_cache: the backbone cache and the MTP layer's own cache, when `use_cache`.
        last_hidden_state: `[B, L, H]` backbone outputs after the final norm.
        hidden_states / attentions: the backbone's per-layer tuples, when asked for.
        mtp_last_hidden_state: `[B, L-1, H]` MTP outputs after the MTP norm.
        pair_input_ids / pair_labels / pair_attention_mask: the inputs after [`pair_layout`] (PAD inserted after an
            odd prompt and at the end of odd rows); identical to the inputs when they were already laid out.
    """

    loss: torch.FloatTensor | None = None
    backbone_loss: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    confidence_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mtp_logits: torch.FloatTensor | None = None
    confidence_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    mtp_cache: Cache | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    mtp_last_hidden_state: torch.FloatTensor | None = None
    pair_input_ids: torch.LongTensor | None = None
    pair_labels: torch.LongTensor | None = None
    pair_attention_mask: torch.LongTensor | None = None


class PipoModel(PipoPreTrainedModel):
    """The PIPO body: compressor → backbone → MTP head and confidence head; returns hidden states (no LM head).

    Submodules: `backbone` (the `AutoModel` of `config.backbone_config`), `compressor`, `mtp`, `confidence_head`.
    """

    def __init__(self, config: PipoConfig):
        super().__init__(config)
        config.require_pad_token()
        bb = config.get_text_config()
        hidden = _backbone_hidden_size(bb)
        self.backbone = AutoModel.from_config(bb)
        template = _norm_template(self.backbone)
        if config.norm_style is None:
            config.norm_style = norm_style_of(template)
        self.compressor = COMPRESSOR_CLASSES[config.compressor_type](hidden)
        self.mtp = PipoMTPHead(bb, template)
        self.confidence_head = PipoConfidenceHead(hidden, config.confidence_hidden_size or hidden, template)
        # Units `device_map="auto"` never splits (and FSDP's transformer auto-wrap shards as one): each PIPO head runs
        # on one device, since its forward concatenates / normalises tensors that must share one. Only classes present
        # in this model (FSDP's auto-wrap rejects absent ones); `post_init` adds the backbone's decoder layer class.
        self._no_split_modules = [type(self.compressor).__name__, type(self.mtp).__name__,
                                  type(self.confidence_head).__name__]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        # The MTP layer runs in a one-layer body that is not a registered sub-model, so transformers does not reach
        # its config: mirror the backbone's implementation onto it.
        self.mtp.body_config._attn_implementation_internal = self.backbone.config._attn_implementation

    @property
    def pad_token_id(self) -> int:
        return self.config.require_pad_token()

    # -- PIPO building blocks (shared by forward and generation) ------------------------------------------------------

    def embed_pairs(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Fold `[B, 2k]` token ids into `[B, k, H]` latents with the compressor."""
        batch, length = input_ids.shape
        if length % 2:
            raise ValueError(f"embed_pairs needs an even number of tokens, got {length}.")
        embeds = self.get_input_embeddings()(input_ids)
        pairs = embeds.reshape(batch, length // 2, 2 * embeds.shape[-1])
        weight_dtype = next(self.compressor.parameters()).dtype
        return self.compressor(pairs.to(weight_dtype)).to(embeds.dtype)

    def run_backbone(
        self,
        latents: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        use_cache: bool = False,
        *,
        return_output: bool = False,
        **kwargs,
    ):
        """Backbone body over latents; returns the post-norm hidden states `h`, or the backbone's whole output
        (per-layer states, attentions) with `return_output=True`. `kwargs` go to the backbone.

        A one-latent cached decode step of a standard rotary body goes through `lean_decode_step` (the same layers,
        masks and rotary embedding, without the model-level wrappers; see `lean_body_plan`)."""
        if (use_cache and cache is not None and latents.shape[1] == 1 and not return_output and not kwargs
                and not torch.compiler.is_compiling()):
            plan = lean_body_plan(self.backbone)
            if plan is not None:
                rope = self.backbone.rotary_emb(latents, position_ids)
                if self._mtp_shares_rope():  # the MTP step at the same positions reuses it (`mtp_step`)
                    self.__dict__[_STEP_ROPE_KEY] = (position_ids, rope)
                return lean_decode_step(self.backbone, plan, latents, attention_mask, position_ids, cache, rope)
        out = self.backbone(
            inputs_embeds=latents,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return out if return_output else out.last_hidden_state

    def run_mtp(
        self,
        token1: torch.LongTensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """MTP head for token1 ids `[B, n]` and backbone hiddens `[B, n, H]`; returns post-norm `m`."""
        return self.mtp(
            self.get_input_embeddings()(token1),
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )

    def confidence_logits(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        """Draft-confidence logits `[B, n]` (inputs detached when `config.detach_confidence_inputs`)."""
        if torch.is_grad_enabled() and self.config.detach_confidence_inputs:  # no config lookup per decode step
            hidden, mtp_hidden = hidden.detach(), mtp_hidden.detach()
        return self.confidence_head(hidden, mtp_hidden).float()

    def mtp_step(
        self,
        token1: torch.LongTensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
    ) -> torch.Tensor:
        """One cached MTP decode position (`token1` `[B, 1]`, `hidden` `[B, 1, H]`); same result as `run_mtp`.

        When this step's `position_ids` is the very tensor the last lean backbone step was given (the decode loop
        passes one tensor to both phases) and the two rotary embeddings are equal, the backbone's cos/sin is reused:
        one rotary computation per step instead of two. Any other positions (a caller's own, or a shifted copy)
        are computed afresh."""
        step = self.__dict__.get(_STEP_ROPE_KEY)
        rope = step[1] if step is not None and step[0] is position_ids and not torch.compiler.is_compiling() else None
        return self.mtp.decode_step(self.get_input_embeddings()(token1), hidden, attention_mask, position_ids, cache,
                                    rope)

    def _mtp_shares_rope(self) -> bool:
        """Whether the MTP body's rotary embedding computes the backbone's cos/sin: same class, static frequencies
        (no dynamic/longrope update), equal `inv_freq` and scaling. Decided once per model."""
        shared = self.__dict__.get(_SHARES_ROPE_KEY)
        if shared is None:
            a, b = getattr(self.backbone, "rotary_emb", None), getattr(self.mtp, "rotary_emb", None)
            kind = getattr(a, "rope_type", None)
            shared = (
                isinstance(a, nn.Module) and type(a) is type(b) and isinstance(kind, str)
                and kind == getattr(b, "rope_type", None) and "dynamic" not in kind and kind != "longrope"
                and isinstance(getattr(a, "inv_freq", None), torch.Tensor)
                and isinstance(getattr(b, "inv_freq", None), torch.Tensor)
                and a.inv_freq.device == b.inv_freq.device and torch.equal(a.inv_freq, b.inv_freq)
                and getattr(a, "attention_scaling", None) == getattr(b, "attention_scaling", None)
            )
            self.__dict__[_SHARES_ROPE_KEY] = shared
        return shared

    def new_mtp_cache(self, max_cache_len: int | None = None) -> Cache:
        """A fresh cache for the MTP layer (independent of the backbone cache): dynamic, or static with
        `max_cache_len` positions."""
        if max_cache_len is None:
            return DynamicCache(config=self.mtp.body_config)
        from transformers.cache_utils import StaticCache

        return StaticCache(config=self.mtp.body_config, max_cache_len=max_cache_len)

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        mtp_cache: Cache | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> PipoModelOutput:
        r"""Compressor, backbone, MTP head and confidence head over token ids (DESIGN §2.3).

        The rows go through [`pair_layout`] first (the documented parity step, DESIGN §1.2; a no-op on rows already
        laid out, e.g. by `PipoDataCollator`); `pair_input_ids` / `pair_attention_mask` of the output are the rows
        actually used, and every position index of the output refers to them.

        Args:
            input_ids: `[B, T]` token ids.
            attention_mask: `[B, T]` batch-padding mask (left or right padding).
            position_ids: optional latent positions `[B, L]`; token-level positions are rejected.
            cache / mtp_cache: optional caches for the backbone and the MTP layer (filled when `use_cache`).
            inputs_embeds: not supported (pairs are built from token ids).
        """
        input_ids, _, attention_mask = self.check_and_layout(input_ids, None, attention_mask, inputs_embeds)
        return self._forward_laid_out(
            input_ids, attention_mask, position_ids, cache, use_cache, mtp_cache, output_hidden_states,
            output_attentions, **kwargs,
        )

    def check_and_layout(
        self,
        input_ids: torch.LongTensor | None,
        labels: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None, torch.Tensor | None]:
        """Validate token ids and apply [`pair_layout`] (shared by `PipoModel` and `PipoForCausalLM`)."""
        if input_ids is None:
            raise ValueError("PIPO forward needs input_ids (pairs are built from token ids).")
        if inputs_embeds is not None:
            raise ValueError("PIPO forward does not take inputs_embeds; pass input_ids.")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(
                f"input_ids contain ids outside the vocabulary [0, {vocab}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}."
            )
        return pair_layout(input_ids, labels, attention_mask, self.pad_token_id)

    def _forward_laid_out(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        mtp_cache: Cache | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        **kwargs,
    ) -> PipoModelOutput:
        batch, length = input_ids.shape
        n_lat = length // 2
        pair_mask = None if attention_mask is None else attention_mask[:, 0::2].long()
        if attention_mask is not None and bool((attention_mask[:, 1::2].bool() & ~attention_mask[:, 0::2].bool()).any()):
            raise ValueError("attention_mask marks a pair whose first token is padding but second is not.")
        if position_ids is not None:
            if position_ids.shape[-1] != n_lat:
                raise ValueError(
                    f"position_ids must index latents (length {n_lat}), got length {position_ids.shape[-1]}; "
                    "token-level positions do not apply to the compressed sequence."
                )
        else:
            position_ids = latent_positions(pair_mask, batch, n_lat, input_ids.device, cache)
        use_cache = bool(use_cache)
        extra = {k: v for k, v in (("output_hidden_states", output_hidden_states),
                                   ("output_attentions", output_attentions)) if v}
        backbone_out = self.run_backbone(self.embed_pairs(input_ids), pair_mask, position_ids, cache=cache,
                                         use_cache=use_cache, return_output=True, **extra)
        hidden = backbone_out.last_hidden_state

        mtp_hidden = conf_logits = None
        if n_lat > 1:
            mtp_mask = None if pair_mask is None else pair_mask[:, :-1] * pair_mask[:, 1:]
            if use_cache and mtp_cache is None:
                mtp_cache = self.new_mtp_cache()
            mtp_hidden = self.run_mtp(
                input_ids[:, 2::2], hidden[:, :-1], mtp_mask, position_ids[..., :-1], cache=mtp_cache,
                use_cache=use_cache,
            )
            conf_logits = self.confidence_logits(hidden[:, :-1], mtp_hidden)
        return PipoModelOutput(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=getattr(backbone_out, "hidden_states", None) if output_hidden_states else None,
            attentions=getattr(backbone_out, "attentions", None) if output_attentions else None,
            mtp_last_hidden_state=mtp_hidden,
            mtp_cache=mtp_cache if use_cache else None,
            confidence_logits=conf_logits,
            pair_input_ids=input_ids,
            pair_attention_mask=attention_mask,
        )


class PipoForCausalLM(PipoModelCardMixin, PipoPreTrainedModel, GenerationMixin):
    """A [`PipoModel`] with the backbone's LM head and the PIPO training losses.

    `forward` is the training computation (DESIGN §2.3); `generate` decodes two tokens per backbone step. The PIPO
    building blocks used by generation (`embed_pairs`, `run_backbone`, `run_mtp`, `mtp_step`, `confidence_logits`,
    `new_mtp_cache`) and the heads (`compressor`, `mtp`, `confidence_head`, `backbone`) are reachable here as well
    as on `model`.
    """

    # Tensor parallelism: the LM head is sharded over the vocabulary and gathers its output (as in the backbones'
    # own *ForCausalLM); the backbone's plan comes from its config, the MTP layer's from `PipoMTPHead`.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _keep_in_fp32_modules = ["model.compressor", "model.confidence_head"]
    _keep_in_fp32_modules_strict = ["model.compressor", "model.confidence_head"]

    def __init__(self, config: PipoConfig):
        super().__init__(config)
        self.model = PipoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        embedding_name = next(
            n for n, m in self.model.backbone.named_children() if m is self.model.backbone.get_input_embeddings()
        )
        self._tied_weights_keys = {"lm_head.weight": f"model.backbone.{embedding_name}.weight"}
        self.post_init()
        if self.generation_config is not None:
            # A PIPO generation config of its own: `_from_model_config` would make loading drop the PIPO fields.
            self.generation_config._from_model_config = False
            self.generation_config.pad_token_id = config.pad_token_id
            self.generation_config.pipo_confidence_threshold = DEFAULT_CONFIDENCE_THRESHOLD

    # -- transformers plumbing -----------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> PipoModel:
        return self.model

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.model.mtp.body_config._attn_implementation_internal = self.model.backbone.config._attn_implementation

    @property
    def pad_token_id(self) -> int:
        return self.config.require_pad_token()

    # Read-only shortcuts to the body's parts (generation and the training code address them on the causal LM).
    backbone = property(lambda self: self.model.backbone, doc="The backbone body (`model.backbone`).")
    compressor = property(lambda self: self.model.compressor, doc="The pair compressor (`model.compressor`).")
    mtp = property(lambda self: self.model.mtp, doc="The MTP head (`model.mtp`).")
    confidence_head = property(lambda self: self.model.confidence_head, doc="`model.confidence_head`.")

    def embed_pairs(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """[`PipoModel.embed_pairs`]."""
        return self.model.embed_pairs(input_ids)

    def run_backbone(self, *args, **kwargs):
        """[`PipoModel.run_backbone`]."""
        return self.model.run_backbone(*args, **kwargs)

    def run_mtp(self, *args, **kwargs) -> torch.Tensor:
        """[`PipoModel.run_mtp`]."""
        return self.model.run_mtp(*args, **kwargs)

    def mtp_step(self, *args, **kwargs) -> torch.Tensor:
        """[`PipoModel.mtp_step`]."""
        return self.model.mtp_step(*args, **kwargs)

    def confidence_logits(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        """[`PipoModel.confidence_logits`]."""
        return self.model.confidence_logits(hidden, mtp_hidden)

    def new_mtp_cache(self, max_cache_len: int | None = None) -> Cache:
        """[`PipoModel.new_mtp_cache`]."""
        return self.model.new_mtp_cache(max_cache_len)

    # -- training forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        mtp_cache: Cache | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> PipoCausalLMOutput:
        r"""Training computation of DESIGN §2.3 over token ids.

        `input_ids`, `labels` and `attention_mask` go through [`pair_layout`] first, the same documented step
        `PipoDataCollator` applies (a no-op on its batches): a PAD is inserted after an odd prompt and at the end of
        an odd row. The output's `pair_input_ids` / `pair_labels` / `pair_attention_mask` are the rows actually
        used; logits and losses index them.

        Args:
            input_ids: `[B, T]` token ids.
            attention_mask: `[B, T]` batch-padding mask (left or right padding).
            position_ids: optional latent positions `[B, L]`; token-level positions are rejected.
            cache / mtp_cache: optional caches for the backbone and the MTP layer (filled when `use_cache`).
            labels: `[B, T]` **unshifted** labels (`labels[t] = x[t]` on trained tokens, -100 elsewhere).
            logits_to_keep: keep only the last `n` positions of `logits` and `mtp_logits` (0: all), or the
                positions of a 1-D index tensor, as in transformers' causal LMs.
            return_logits: set False to skip materialising `[B, L, V]` logits when only the losses are needed.
            num_items_in_batch: labelled tokens of the whole gradient-accumulation step (passed by
                `transformers.Trainer`); see [`pipo_sft_loss`].
        """
        input_ids, labels, attention_mask = self.model.check_and_layout(input_ids, labels, attention_mask,
                                                                        inputs_embeds)
        out = self.model._forward_laid_out(
            input_ids, attention_mask, position_ids, cache, use_cache, mtp_cache, output_hidden_states,
            output_attentions, **kwargs,
        )
        hidden, mtp_hidden = out.last_hidden_state, out.mtp_last_hidden_state
        logits = mtp_logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
            mtp_logits = None if mtp_hidden is None else self.lm_head(mtp_hidden[:, keep])

        losses = PipoLossOutput()
        if labels is not None:
            losses = pipo_sft_loss(hidden, mtp_hidden, out.confidence_logits, labels, self.lm_head, self.config,
                                   num_items_in_batch=num_items_in_batch)
        return PipoCausalLMOutput(
            loss=losses.loss,
            backbone_loss=losses.backbone_loss,
            mtp_loss=losses.mtp_loss,
            confidence_loss=losses.confidence_loss,
            logits=logits,
            mtp_logits=mtp_logits,
            confidence_logits=out.confidence_logits,
            cache=out.cache,
            mtp_cache=out.mtp_cache,
            last_hidden_state=hidden,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            mtp_last_hidden_state=mtp_hidden,
            pair_input_ids=input_ids,
            pair_labels=labels,
            pair_attention_mask=attention_mask,
        )

    # -- generation -------------------------------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """PIPO decoding by default (two tokens per backbone step); see `generation_pipo.pipo_generate`.

        `pipo_decoding=False` decodes one token per full uncached forward (for comparison); assisted decoding and
        beam search are rejected with a clear error in PIPO mode.
        """
        return pipo_generate_entry(self, super().generate, inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Token-by-token fallback (`pipo_decoding=False`): every step re-reads the whole sequence without a cache,
        because appending one token changes the last pair's latent."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    # -- conversion -------------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, model_or_path, tokenizer=None, **kwargs):
        """Wrap a pretrained `*ForCausalLM` (a model object or a path/Hub id) as a PIPO model.

        The stable entry point of [`transformers_pipo.conversion.backbone.from_backbone`], which documents the
        arguments, the PAD/EOS rule and what it changes on the objects passed in. Needs the `transformers_pipo`
        package (a saved folder loaded as remote code only runs and generates).
        """
        try:
            from transformers_pipo.conversion.backbone import from_backbone
        except ImportError as err:  # remote code in a process without the package
            raise ImportError(
                "PipoForCausalLM.from_backbone needs the transformers-pipo package (`pip install transformers-pipo`);"
                " a saved PIPO folder loads and generates without it."
            ) from err
        return from_backbone(model_or_path, tokenizer, model_class=cls, **kwargs)


def latent_positions(
    pair_mask: torch.Tensor | None, batch: int, n_lat: int, device: torch.device, cache: Cache | None = None
) -> torch.LongTensor:
    """RoPE positions of latents: `0..L-1` (offset by the cache), or `cumsum(mask) - 1` with batch padding."""
    if pair_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(n_lat, device=device) + past).unsqueeze(0).expand(batch, -1)
    positions = pair_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -n_lat:]



# ----------------------------------------------------------------------------------------------------------------------
# Lean decode step of a standard decoder body (eager decoding: per-step Python overhead)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeanBodyPlan:
    """How `lean_decode_step` steps a decoder body: its layer list's attribute name, how many layers run, and the
    mask kind (`"full_attention"` / `"sliding_attention"`) each layer reads."""

    layers_attr: str
    num_layers: int
    mask_kinds: tuple[str, ...]


_STEP_ROPE_KEY = "_pipo_step_rope"  # on PipoModel.__dict__: (position_ids, (cos, sin)) of the last lean backbone step
_SHARES_ROPE_KEY = "_pipo_mtp_shares_rope"
_LEAN_PLAN_KEY = "_pipo_lean_plan"  # cached on the body's __dict__: a LeanBodyPlan, or False when ineligible
_LEAN_MASK_KINDS = ("full_attention", "sliding_attention")


def lean_body_plan(body: nn.Module) -> LeanBodyPlan | None:
    """The plan to step `body` directly, or None when its decode steps must take the full forward.

    Eligible: bodies whose forward is `masks -> rotary embedding -> layers(position_embeddings=...) -> norm` (Llama,
    Mistral, Qwen2/3, ...), with full or sliding-window attention layers. Recurrent/hybrid layers (Qwen3.5 linear
    attention), learned positions (GPT-2) and anything else take the full forward. Structure alone cannot see
    family-specific steps inside a forward (an embedding scale, say), so the plan is accepted only when a probe
    (two cached decode steps of a deterministic input, in eval mode) gives bitwise the same hidden states and cache
    as the body's own forward. Decided once per body and cached; a body in training mode is not planned (dropout).
    """
    cached = body.__dict__.get(_LEAN_PLAN_KEY)
    if cached is not None:
        return cached or None
    if body.training:
        return None
    plan = _structural_plan(body)
    if plan is not None and not _lean_matches_forward(body, plan):
        plan = None
    body.__dict__[_LEAN_PLAN_KEY] = plan if plan is not None else False
    return plan


def _structural_plan(body: nn.Module) -> LeanBodyPlan | None:
    import inspect

    config = getattr(body, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or not isinstance(getattr(body, "rotary_emb", None), nn.Module):
        return None
    if not isinstance(getattr(body, "norm", None), nn.Module):
        return None
    name = next((k for k, child in body.named_children() if isinstance(child, nn.ModuleList) and len(child) >= n),
                None)
    if name is None or n == 0:
        return None
    if "position_embeddings" not in inspect.signature(getattr(body, name)[0].forward).parameters:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        kinds = tuple(layer_types[:n])
    else:  # Mistral-style configs: one kind for every layer, chosen by `sliding_window`
        kinds = (("full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"),) * n
    if len(kinds) != n or any(kind not in _LEAN_MASK_KINDS for kind in kinds):
        return None
    return LeanBodyPlan(name, n, kinds)


def lean_decode_step(
    body: nn.Module,
    plan: LeanBodyPlan,
    latents: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor,
    cache: Cache,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One cached decode step of `body` over `latents` `[B, q, H]`, calling its parts directly; returns the post-norm
    hidden states, as `body(inputs_embeds=latents, ..., use_cache=True).last_hidden_state` does.
    `position_embeddings`: `body.rotary_emb(latents, position_ids)` when the caller already computed it."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    makers = {"full_attention": decode_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {
        kind: makers[kind](config=body.config, inputs_embeds=latents, attention_mask=attention_mask, cache=cache,
                           position_ids=position_ids)
        for kind in dict.fromkeys(plan.mask_kinds)
    }
    if position_embeddings is None:
        position_embeddings = body.rotary_emb(latents, position_ids)
    hidden = latents
    # zip stops at the last planned layer; slicing the ModuleList would build a new ModuleList every step
    for layer, kind in zip(getattr(body, plan.layers_attr), plan.mask_kinds):
        hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=position_embeddings,
                       position_ids=position_ids, cache=cache, use_cache=True)
    return decode_norm(body.norm, hidden)


# (attention implementation, is_causal) -> True once `create_causal_mask` returned None for one unpadded query on a
# dynamic cache: that mask is "attend to every cached key" at every step, which such an implementation (sdpa, flash)
# leaves to the kernel, so later steps need not rebuild it.
_NULL_DECODE_MASK: dict[tuple, bool] = {}


def decode_causal_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache,
    position_ids: torch.LongTensor,
) -> torch.Tensor | None:
    """`create_causal_mask` of a cached decode step (full attention), remembering per attention implementation when
    the unpadded one-query mask is None (see `_NULL_DECODE_MASK`). Padded batches, several queries and compileable
    (static) caches, and tracing, always build the mask."""
    from transformers.masking_utils import create_causal_mask

    plain = (attention_mask is None and inputs_embeds.shape[1] == 1 and not getattr(cache, "is_compileable", False)
             and not torch.compiler.is_compiling())
    key = (config._attn_implementation, getattr(config, "is_causal", True))
    if plain and _NULL_DECODE_MASK.get(key, False):
        return None
    mask = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)
    if plain and mask is None:
        _NULL_DECODE_MASK[key] = True
    return mask


def _lean_matches_forward(body: nn.Module, plan: LeanBodyPlan, prompt: int = 5, steps: int = 2) -> bool:
    """Whether `lean_decode_step` equals the body's forward bitwise (hidden states and cache) on a probe: a cached
    prompt, then `steps` one-position steps. The input is deterministic (no random generator is drawn)."""
    embedding = body.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or weight.device.type == "meta":
        return False
    hidden = weight.shape[-1]
    total = prompt + steps
    with torch.no_grad():
        probe = torch.sin(torch.arange(total * hidden, device=weight.device, dtype=torch.float32) * 0.37)
        probe = probe.reshape(1, total, hidden).to(weight.dtype)
        positions = torch.arange(total, device=weight.device).unsqueeze(0)
        caches = [DynamicCache(config=body.config), DynamicCache(config=body.config)]
        for cache in caches:
            body(inputs_embeds=probe[:, :prompt], position_ids=positions[:, :prompt], cache=cache, use_cache=True)
        for t in range(prompt, total):
            ref = body(inputs_embeds=probe[:, t:t + 1], position_ids=positions[:, t:t + 1], cache=caches[0],
                       use_cache=True).last_hidden_state
            lean = lean_decode_step(body, plan, probe[:, t:t + 1], None, positions[:, t:t + 1], caches[1])
            if not torch.equal(ref, lean):
                return False
        for ref_layer, lean_layer in zip(caches[0].layers, caches[1].layers):
            for attr in ("keys", "values"):
                a, b = getattr(ref_layer, attr, None), getattr(lean_layer, attr, None)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    return False
    return True


__all__ = [
    "PipoForCausalLM",
    "PipoModel",
    "PipoPreTrainedModel",
    "PipoCausalLMOutput",
    "PipoModelOutput",
    "PipoLossOutput",
    "pipo_sft_loss",
    "pair_layout",
    "align_row",
]
