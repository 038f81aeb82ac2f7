"""PIPO decoding: compressed prefill with a real draft, then two-phase (backbone, MTP) decode steps.

`PipoForCausalLM.generate` routes here through transformers' `custom_generate` hook, so every preparation step of
`GenerationMixin.generate` (generation config merging, logits processors, stopping criteria, attention mask,
`num_return_sequences` expansion, cache creation) is kept. Shipped as remote code next to `modeling_pipo.py`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StopStringCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

DEFAULT_CONFIDENCE_THRESHOLD = 0.95
_ASSISTED_KWARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
# model_kwargs prepared by `generate` that PIPO decoding handles itself (or does not need).
_HANDLED_MODEL_KWARGS = ("position_ids", "use_cache", "logits_to_keep", "output_attentions", "output_hidden_states",
                         "return_dict", "past_key_values")


@dataclass
class PipoGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus PIPO statistics.

    `sequences` are the prompt ids exactly as given followed by the generated real tokens (PAD stand-ins
    removed), right-padded with `pad_token_id`. `scores`/`logits` hold one `[B, V]` entry per generated real
    token index (`-inf` rows where a sequence has fewer tokens).

    Args:
        pipo_slot_ids: `[B, S]` raw emitted slots after the prompt: token1, token2-or-PAD, token1, ... (the first
            pair comes from the prefill); right-padded with PAD.
        pipo_slot_lengths: `[B]` valid slots per row (odd when a row stopped on its token1).
        pipo_prompt_ids: per row, the unpadded prompt after the parity rule (PAD appended to odd prompts).
        committed_drafts: `[B]` drafts (token2) that were committed and emitted.
        decode_steps: `[B]` backbone steps the row took part in, prefill included.
        backbone_forwards: number of backbone calls for the whole batch.
        mean_confidence: `[B]` mean draft confidence `sigmoid(conf)` over evaluated drafts (NaN when none).
        mtp_cache: the MTP layer's cache.
    """

    pipo_slot_ids: torch.LongTensor | None = None
    pipo_slot_lengths: torch.LongTensor | None = None
    pipo_prompt_ids: list[torch.LongTensor] | None = None
    committed_drafts: torch.LongTensor | None = None
    decode_steps: torch.LongTensor | None = None
    backbone_forwards: int | None = None
    mean_confidence: torch.FloatTensor | None = None
    mtp_cache: Cache | None = None

    @property
    def commit_rate(self) -> torch.FloatTensor:
        """Committed drafts per decode step, per row."""
        return self.committed_drafts.float() / self.decode_steps.clamp(min=1).float()


def pipo_generate_entry(model, stock_generate, inputs=None, generation_config=None, **kwargs):
    """Route `generate` to PIPO decoding unless `pipo_decoding=False` or a `custom_generate` is given."""
    for key in _ASSISTED_KWARGS:
        if kwargs.get(key) not in (None, False):
            raise ValueError(
                f"`{key}` (assisted/speculative decoding) is not supported by PipoForCausalLM: PIPO drafts its own "
                "second token per step and its logits are per latent, not per token. Use the plain backbone for "
                "assisted-decoding baselines."
            )
    if not kwargs.pop("pipo_decoding", True):
        suppress = list(kwargs.pop("suppress_tokens", None) or [])
        kwargs["suppress_tokens"] = sorted(set(suppress) | {model.pad_token_id})
        return stock_generate(inputs, generation_config, **kwargs)
    if kwargs.get("custom_generate") is None:
        kwargs["custom_generate"] = pipo_generate
        # transformers 5.24 does not forward `streamer` or `tokenizer` to a callable custom_generate (HF_NOTES §3.2),
        # so they travel under PIPO names; stop strings are then turned into a criterion inside the loop.
        if kwargs.get("streamer") is not None:
            kwargs["pipo_streamer"] = kwargs.pop("streamer")
        if kwargs.get("tokenizer") is not None:
            kwargs["pipo_tokenizer"] = kwargs.pop("tokenizer")
        stop_strings = kwargs.pop("stop_strings", None)
        if stop_strings is None:
            source = generation_config if generation_config is not None else model.generation_config
            stop_strings = getattr(source, "stop_strings", None)
            if stop_strings:
                generation_config = copy.deepcopy(source)
                generation_config.stop_strings = None
        if stop_strings:
            kwargs["pipo_stop_strings"] = stop_strings
    return stock_generate(inputs, generation_config, **kwargs)


def resolve_confidence_threshold(model, generation_config) -> float:
    """τ from the call's generation config, else the model's, else the default; NaN and non-numbers are rejected."""
    tau = getattr(generation_config, "pipo_confidence_threshold", None)
    if tau is None:
        tau = getattr(getattr(model, "generation_config", None), "pipo_confidence_threshold", None)
    if tau is None:
        tau = DEFAULT_CONFIDENCE_THRESHOLD
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"pipo_confidence_threshold must be a number, got {tau!r}.")
    if math.isnan(tau):
        raise ValueError("pipo_confidence_threshold is NaN; use a number (<0 commits every draft, >=1 none).")
    return float(tau)


class _PipoDecodeState:
    """Per-row bookkeeping for one PIPO generation: real tokens, raw slots, stop flags and statistics."""

    def __init__(self, model, input_ids, attention_mask, generation_config, processors, criteria, streamer):
        self.pad = model.pad_token_id
        self.batch, self.prompt_len = input_ids.shape
        self.device = input_ids.device
        self.config = generation_config
        self.processors = processors
        self.criteria = criteria
        self.streamer = streamer
        self.eos = generation_config._eos_token_tensor
        if self.eos is not None:
            self.eos = self.eos.to(self.device).reshape(-1)
            if bool((self.eos == self.pad).any()):
                raise ValueError(f"eos_token_id contains the PIPO PAD id {self.pad}; PAD must never stop generation.")
        self.budget = max(0, generation_config.max_length - self.prompt_len)
        min_len = generation_config.min_length or 0
        self.min_new = max(generation_config.min_new_tokens or 0, min_len - self.prompt_len)
        out_pad = generation_config._pad_token_tensor
        self.out_pad = int(out_pad.reshape(-1)[0]) if out_pad is not None else self.pad
        self.want_scores = bool(generation_config.output_scores)
        self.want_logits = bool(generation_config.output_logits)

        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        rows = [input_ids[b][mask[b]] for b in range(self.batch)]
        if any(r.numel() == 0 for r in rows):
            raise ValueError("PIPO generation got an empty prompt; give at least one token per row.")
        # Processor view: each row's real tokens so far, right-aligned (left-padded with PAD).
        self.seq = _left_pad(rows, self.pad)
        self.prompt_rows = [torch.cat([r, r.new_full((1,), self.pad)]) if r.numel() % 2 else r for r in rows]

        cap = 2 * (self.budget + 1)
        self.generated = torch.full((self.batch, max(self.budget, 1)), self.out_pad, dtype=torch.long,
                                    device=self.device)
        self.gen_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.slots = torch.full((self.batch, cap), self.pad, dtype=torch.long, device=self.device)
        self.slot_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        if self.budget == 0:
            self.finished[:] = True
        self.committed = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.steps = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.conf_sum = torch.zeros(self.batch, dtype=torch.float32, device=self.device)
        self.conf_count = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.backbone_forwards = 0
        self.events: list[tuple] = []  # (gen_len before, active mask, scores, raw logits) when requested
        self.rows_idx = torch.arange(self.batch, device=self.device)

    def choose(self, raw_logits: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """Pick one token per row from raw LM-head logits with transformers' processors; PAD is never chosen."""
        scores = raw_logits.float().clone()
        scores[:, self.pad] = -math.inf
        if self.min_new > 0 and self.eos is not None:
            early = self.gen_len < self.min_new
            if bool(early.any()):
                scores[early.unsqueeze(1) & torch.isin(torch.arange(scores.shape[1], device=self.device),
                                                       self.eos).unsqueeze(0)] = -math.inf
        scores = self.processors(self.seq, scores)
        if self.config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        return tokens, scores

    def emit(self, tokens, active, scores, raw_logits) -> None:
        """Append `tokens` to the rows in `active` and update stop flags (EOS, budget, stopping criteria)."""
        if not bool(active.any()):
            return
        if self.want_scores or self.want_logits:
            self.events.append((self.gen_len.clone(), active.clone(), scores, raw_logits))
        rows = self.rows_idx[active]
        self.generated[rows, self.gen_len[active].clamp(max=self.generated.shape[1] - 1)] = tokens[active]
        self.gen_len += active.long()
        if bool(active.all()):
            self.seq = torch.cat([self.seq, tokens.unsqueeze(1)], dim=1)
        else:
            col = torch.where(active, tokens, torch.full_like(tokens, self.pad)).unsqueeze(1)
            appended = torch.cat([self.seq, col], dim=1)
            shifted = torch.cat([torch.full_like(col, self.pad), self.seq], dim=1)
            self.seq = torch.where(active.unsqueeze(1), appended, shifted)
        stop = self.gen_len >= self.budget
        if self.eos is not None:
            stop |= torch.isin(tokens, self.eos)
        if len(self.criteria) > 0:
            stop |= self.criteria(self.seq, scores).to(self.device)
        self.finished |= active & stop

    def record_slot(self, tokens, active) -> None:
        if bool(active.any()):
            self.slots[self.rows_idx[active], self.slot_len[active]] = tokens[active]
            self.slot_len += active.long()

    def stream(self, tokens, emitted) -> None:
        """Hand a just-emitted token to the streamer (batch size 1) as soon as it exists."""
        if self.streamer is not None and bool(emitted[0]):
            self.streamer.put(tokens[:1].cpu())

    def sequences(self, input_ids) -> torch.LongTensor:
        width = int(self.gen_len.max()) if self.batch else 0
        return torch.cat([input_ids, self.generated[:, :width]], dim=1)

    def per_token(self, which: int) -> tuple[torch.Tensor, ...] | None:
        """Scores (which=2) or raw logits (which=3) indexed by generated-token position."""
        if not self.events:
            return None
        width = int(self.gen_len.max())
        vocab = self.events[0][which].shape[-1]
        out = [torch.full((self.batch, vocab), -math.inf, device=self.device) for _ in range(width)]
        for event in self.events:
            before, active = event[0], event[1]
            values = event[which].float()
            for b in self.rows_idx[active].tolist():
                out[int(before[b])][b] = values[b]
        return tuple(out)


def pipo_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    pipo_streamer=None,
    pipo_tokenizer=None,
    pipo_stop_strings=None,
    **model_kwargs,
):
    """PIPO decoding loop (spec §3 with the fixes of §4.3/§3.5): see `PipoForCausalLM.generate`.

    Prefill folds the parity-aligned prompt into latents and runs the backbone once; the MTP layer then runs
    teacher-forced over the prompt (filling its cache exactly as in training) plus one position with the sampled
    token1, so the prefill already emits a real, gated token2. Each decode step compresses the last emitted pair,
    runs one backbone step (token1) and, unless τ >= 1, one MTP step (token2, confidence, gate).
    """
    streamer = pipo_streamer if pipo_streamer is not None else streamer
    if synced_gpus:
        raise ValueError("PIPO decoding does not support synced_gpus (ZeRO-3); gather the weights first.")
    if generation_config.num_beams > 1:
        raise ValueError(
            "Beam search is not supported by PIPO decoding (one latent can emit one or two tokens). Use "
            "pipo_decoding=False for token-level beam search."
        )
    tau = resolve_confidence_threshold(model, generation_config)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("PIPO generation got an empty prompt; give at least one token per row.")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("Streamers only support batch size 1.")
    attention_mask = model_kwargs.pop("attention_mask", None)
    cache = model_kwargs.pop("cache", None)
    for key in _HANDLED_MODEL_KWARGS:
        model_kwargs.pop(key, None)
    if model_kwargs:
        raise ValueError(f"PIPO generation does not accept the model kwargs {sorted(model_kwargs)}.")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("PIPO generation cannot continue from a pre-filled cache; pass the full prompt instead.")
    if cache is None:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=model.config.get_text_config())

    processors = LogitsProcessorList(
        [p for p in logits_processor if not isinstance(p, (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor))]
    )
    criteria = StoppingCriteriaList(
        [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    )
    if pipo_stop_strings:
        if pipo_tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass tokenizer= to generate().")
        criteria.append(StopStringCriteria(tokenizer=pipo_tokenizer, stop_strings=pipo_stop_strings))
    state = _PipoDecodeState(model, input_ids, attention_mask, generation_config, processors, criteria, streamer)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    run_mtp = tau < 1.0
    mtp_cache = model.new_mtp_cache() if run_mtp else None

    if not bool(state.finished.all()):
        with torch.no_grad():
            _decode(model, state, cache, mtp_cache, tau, run_mtp)
    if streamer is not None:
        streamer.end()

    sequences = state.sequences(input_ids)
    if not generation_config.return_dict_in_generate:
        return sequences
    width = int(state.slot_len.max()) if state.batch else 0
    return PipoGenerateOutput(
        sequences=sequences,
        scores=state.per_token(2) if state.want_scores else None,
        logits=state.per_token(3) if state.want_logits else None,
        cache=cache,
        mtp_cache=mtp_cache,
        pipo_slot_ids=state.slots[:, :width],
        pipo_slot_lengths=state.slot_len,
        pipo_prompt_ids=state.prompt_rows,
        committed_drafts=state.committed,
        decode_steps=state.steps,
        backbone_forwards=state.backbone_forwards,
        mean_confidence=torch.where(
            state.conf_count > 0, state.conf_sum / state.conf_count.clamp(min=1), torch.full_like(state.conf_sum,
                                                                                              math.nan)
        ),
    )


def _decode(model, state: _PipoDecodeState, cache, mtp_cache, tau: float, run_mtp: bool) -> None:
    pad = state.pad
    batch, device = state.batch, state.device
    prompt = _left_pad(state.prompt_rows, pad)
    n_pairs = prompt.shape[1] // 2
    lengths = torch.tensor([r.numel() // 2 for r in state.prompt_rows], device=device)
    padded = bool((lengths < n_pairs).any())
    pair_mask = (torch.arange(n_pairs, device=device).unsqueeze(0) >= (n_pairs - lengths).unsqueeze(1)).long()
    positions = (pair_mask.cumsum(-1) - 1).clamp(min=0)
    bb_mask = pair_mask if padded else None
    mtp_mask = None
    if padded:
        mtp_mask = torch.cat([pair_mask[:, :-1] * pair_mask[:, 1:], pair_mask.new_ones(batch, 1)], dim=1)

    # -- prefill -------------------------------------------------------------------------------------------------
    hidden = model.run_backbone(model.embed_pairs(prompt), bb_mask, positions, cache=cache, use_cache=True)
    state.backbone_forwards += 1
    last_pos = positions[:, -1:]
    token1, token2 = _pair_step(
        model, state, hidden, last_pos, mtp_cache, tau, run_mtp,
        mtp_tokens=prompt[:, 2::2], mtp_positions=positions, mtp_mask=mtp_mask,
    )

    # -- decode --------------------------------------------------------------------------------------------------
    while not bool(state.finished.all()):
        last_pos = last_pos + 1
        if bb_mask is not None:
            bb_mask = torch.cat([bb_mask, bb_mask.new_ones(batch, 1)], dim=1)
        if mtp_mask is not None:
            mtp_mask = torch.cat([mtp_mask, mtp_mask.new_ones(batch, 1)], dim=1)
        latent = model.embed_pairs(torch.stack([token1, token2], dim=1))
        hidden = model.run_backbone(latent, bb_mask, last_pos, cache=cache, use_cache=True)
        state.backbone_forwards += 1
        token1, token2 = _pair_step(
            model, state, hidden, last_pos, mtp_cache, tau, run_mtp,
            mtp_tokens=None, mtp_positions=last_pos, mtp_mask=mtp_mask,
        )


def _pair_step(model, state, hidden, last_pos, mtp_cache, tau, run_mtp, mtp_tokens, mtp_positions, mtp_mask):
    """Emit token1 from the last backbone hidden, then (unless τ >= 1) the gated MTP draft. Returns the new pair."""
    pad = state.pad
    active1 = ~state.finished
    state.steps += active1.long()
    h_last = hidden[:, -1:]
    raw1 = model.lm_head(h_last)[:, 0]
    token1, scores1 = state.choose(raw1)
    state.emit(token1, active1, scores1, raw1)
    state.record_slot(token1, active1)
    state.stream(token1, active1)  # token1 streams before the MTP phase runs

    token2 = torch.full_like(token1, pad)
    active2 = active1 & ~state.finished
    if run_mtp and bool(active2.any()):  # nobody left to draft for (e.g. max_new_tokens=1): skip phase 2
        tokens_in = token1.unsqueeze(1) if mtp_tokens is None else torch.cat([mtp_tokens, token1.unsqueeze(1)], 1)
        hidden_in = h_last if mtp_tokens is None else hidden
        mtp_hidden = model.run_mtp(tokens_in, hidden_in, mtp_mask, mtp_positions, cache=mtp_cache, use_cache=True)
        m_last = mtp_hidden[:, -1:]
        confidence = torch.sigmoid(model.confidence_logits(h_last, m_last))[:, 0]
        raw2 = model.lm_head(m_last)[:, 0]
        draft, scores2 = state.choose(raw2)
        commit = torch.ones_like(active2) if tau < 0 else confidence >= tau
        emitted2 = active2 & commit
        state.conf_sum += torch.where(active2, confidence.float(), torch.zeros_like(confidence.float()))
        state.conf_count += active2.long()
        state.committed += emitted2.long()
        token2 = torch.where(commit, draft, token2)
        state.emit(draft, emitted2, scores2, raw2)
        state.stream(draft, emitted2)
    state.record_slot(token2, active2)
    return token1, token2


def _left_pad(rows: list[torch.Tensor], pad: int) -> torch.LongTensor:
    width = max(r.numel() for r in rows)
    out = rows[0].new_full((len(rows), width), pad)
    for b, r in enumerate(rows):
        out[b, width - r.numel():] = r
    return out


__all__ = ["PipoGenerateOutput", "pipo_generate", "pipo_generate_entry", "DEFAULT_CONFIDENCE_THRESHOLD"]
