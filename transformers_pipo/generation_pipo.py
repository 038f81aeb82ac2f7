"""PIPO decoding: compressed prefill with a real draft, then two-phase (backbone, MTP) decode steps.

`PipoForCausalLM.generate` routes here through transformers' `custom_generate` hook, so every preparation step of
`GenerationMixin.generate` (generation config merging, logits processors, stopping criteria, attention mask,
`num_return_sequences` expansion, cache creation) is kept. Shipped as remote code next to `modeling_pipo.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
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
from transformers.utils import logging

logger = logging.get_logger(__name__)

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

    After eager decoding over dynamic caches, `cache` and `mtp_cache` hold inference tensors (DESIGN §3.8): clone
    them before using them in autograd. Every other field is an ordinary tensor.
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
        """Committed drafts per decode step, per row (see [`commit_rate`])."""
        return commit_rate(self.committed_drafts, self.decode_steps)


def commit_rate(committed_drafts, decode_steps):
    """The commit rate, defined once: committed drafts / decode steps (0 without a step).

    A decode step is one backbone step of PIPO decoding (`PipoGenerateOutput.decode_steps`), each offering at most
    one draft. Works on per-row tensors (elementwise) and on totals (ints) summed over rows or prompts.
    """
    if torch.is_tensor(committed_drafts) or torch.is_tensor(decode_steps):
        return torch.as_tensor(committed_drafts).float() / torch.as_tensor(decode_steps).clamp(min=1).float()
    return committed_drafts / decode_steps if decode_steps else 0.0


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
        # `generate` drops `synced_gpus` for a callable custom_generate (DESIGN §5.3): it travels as a PIPO kwarg.
        if "synced_gpus" in kwargs:
            kwargs["pipo_synced_gpus"] = kwargs.pop("synced_gpus")
        # transformers 5.24 does not forward `streamer` or `tokenizer` to a callable custom_generate (DESIGN §5.3),
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
    """Per-row bookkeeping of one PIPO generation, owned here and updated only by `token1` / `token2`.

    Real tokens, raw slots, stop flags and statistics live in fixed-size device tensors and are updated with dense
    masked operations (`where`/`scatter`), so a decode step needs no host-device synchronisation. The processor view
    `seq` (each row's real tokens, right-aligned, PAD on the left) is kept only when logits processors or stopping
    criteria need it.
    """

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
        # Raw slots and statistics are only returned in a `PipoGenerateOutput`; plain calls skip their upkeep.
        self.track = bool(generation_config.return_dict_in_generate)
        self.eos_vocab_mask = None  # [V] bool, built on first use (needs the vocabulary size)
        self.pad_index = torch.tensor([self.pad], device=self.device)

        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        rows = [input_ids[b][mask[b]] for b in range(self.batch)]
        if any(r.numel() == 0 for r in rows):
            raise ValueError("PIPO generation got an empty prompt; give at least one token per row.")
        # Processor view: each row's real tokens so far, right-aligned (left-padded with PAD).
        self.needs_seq = len(processors) > 0 or len(criteria) > 0
        self.seq = _left_pad(rows, self.pad)
        self.prompt_rows = [torch.cat([r, r.new_full((1,), self.pad)]) if r.numel() % 2 else r for r in rows]

        # `slots` has one spare column: a row writes at its current length, which never passes twice the budget, so
        # the spare column is never real and writes need no clamping.
        cap = 2 * (self.budget + 1)
        long = dict(dtype=torch.long, device=self.device)
        # Emitted tokens are laid out once, in `sequences` (a per-emission scatter would cost four ops twice a step):
        # each entry is (tokens [B], emitted [B]), both fresh tensors that nothing writes to afterwards.
        self.emissions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gen_len = torch.zeros(self.batch, **long)
        self.slots = torch.full((self.batch, cap), self.pad, **long)
        self.slot_len = torch.zeros(self.batch, **long)
        self.finished = torch.full((self.batch,), self.budget == 0, dtype=torch.bool, device=self.device)
        self.committed = torch.zeros(self.batch, **long)
        self.steps = torch.zeros(self.batch, **long)
        self.conf_sum = torch.zeros(self.batch, dtype=torch.float32, device=self.device)
        self.conf_count = torch.zeros(self.batch, **long)
        self.active2 = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        self.backbone_forwards = 0
        self.done_locally = False
        self.events: list[tuple] = []  # (gen_len before, active mask, scores, raw logits) when requested

    # -- the two updates of a step ------------------------------------------------------------------------------------

    def token1(self, raw1: torch.Tensor, chosen: torch.LongTensor | None = None) -> torch.LongTensor:
        """Phase-1 update: choose (or take the fused step's greedy `chosen`) and emit token1 for every unfinished row;
        remembers who may still draft."""
        active1 = ~self.finished
        if self.track:
            self.steps += active1
        if chosen is not None:  # a compiled step's output buffer, which its next replay overwrites
            chosen = chosen.clone()
        token1, scores1 = self._choose(raw1, chosen)
        self._emit(token1, active1, scores1, raw1)
        self._record_slot(token1, active1)
        self._stream(token1, active1)  # token1 streams before the MTP phase runs
        self.active2 = active1 & ~self.finished
        return token1

    def token2(self, raw2: torch.Tensor | None, confidence: torch.Tensor | None, tau: float) -> torch.LongTensor:
        """Phase-2 update: gate and emit the draft (or PAD when there is no draft: `raw2=None`); returns token2."""
        active2 = self.active2
        if raw2 is None:
            token2 = torch.full_like(active2, self.pad, dtype=torch.long)
        else:
            draft, scores2 = self._choose(raw2)
            if tau < 0:
                token2, emitted2 = draft, active2
            else:
                commit = confidence >= tau
                token2, emitted2 = torch.where(commit, draft, self.pad), active2 & commit
            if self.track:
                self.conf_sum += torch.where(active2, confidence.float(), 0.0)
                self.conf_count += active2
                self.committed += emitted2
            self._emit(draft, emitted2, scores2, raw2)
            self._stream(draft, emitted2)
        self._record_slot(token2, active2)
        return token2

    # -- helpers (only called from the two updates above) --------------------------------------------------------------

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing between the phases that needs the host (no processors, sampling or min length)."""
        return not self.config.do_sample and len(self.processors) == 0 and not (self.min_new > 0 and
                                                                                  self.eos is not None)

    def _choose(self, raw_logits: torch.Tensor, chosen: torch.LongTensor | None = None):
        """Pick one token per row from raw LM-head logits with transformers' processors; PAD is never chosen."""
        if self.pad_index.device != raw_logits.device:  # LM head on another device (device_map)
            self.pad_index = self.pad_index.to(raw_logits.device)
        scores = raw_logits.float().index_fill(1, self.pad_index, -math.inf)  # a copy: the raw logits stay intact
        if chosen is not None:  # the fused greedy step already took this argmax
            return chosen, scores
        if self.min_new > 0 and self.eos is not None:
            if self.eos_vocab_mask is None:
                self.eos_vocab_mask = torch.isin(torch.arange(scores.shape[1], device=self.device), self.eos)
            early = self.gen_len < self.min_new
            scores = scores.masked_fill(early.unsqueeze(1) & self.eos_vocab_mask.unsqueeze(0), -math.inf)
        if len(self.processors) > 0:
            scores = self.processors(self.seq, scores)
        if self.config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        return tokens, scores

    def _emit(self, tokens, active, scores, raw_logits) -> None:
        """Append `tokens` to the rows in `active` and update stop flags (EOS, budget, stopping criteria)."""
        if self.want_scores or self.want_logits:
            # Copies: a CUDA-graph step reuses its output buffers on the next replay.
            self.events.append((self.gen_len.clone(), active.clone(), scores, raw_logits.clone()))
        self.emissions.append((tokens, active))
        self.gen_len += active
        stop = self.gen_len >= self.budget
        if self.eos is not None:
            stop |= torch.isin(tokens, self.eos)
        if self.needs_seq and bool(active.any()):  # processors/criteria read `seq`, whose width is data-dependent
            if bool(active.all()):
                self.seq = torch.cat([self.seq, tokens.unsqueeze(1)], dim=1)
            else:
                col = torch.where(active, tokens, torch.full_like(tokens, self.pad)).unsqueeze(1)
                appended = torch.cat([self.seq, col], dim=1)
                shifted = torch.cat([torch.full_like(col, self.pad), self.seq], dim=1)
                self.seq = torch.where(active.unsqueeze(1), appended, shifted)
            if len(self.criteria) > 0:
                stop |= self.criteria(self.seq, scores).to(self.device)
        self.finished |= active & stop

    def _record_slot(self, tokens, active) -> None:
        if not self.track:
            return
        self.slots.scatter_(1, self.slot_len.unsqueeze(1), torch.where(active, tokens, self.pad).unsqueeze(1))
        self.slot_len += active

    def _stream(self, tokens, emitted) -> None:
        """Hand a just-emitted token to the streamer (batch size 1) as soon as it exists."""
        if self.streamer is not None and bool(emitted[0]):
            self.streamer.put(tokens[:1].cpu())

    # -- results ------------------------------------------------------------------------------------------------------

    def sequences(self, input_ids) -> torch.LongTensor:
        """The prompt followed by each row's emitted tokens, right-padded with the output PAD."""
        width = int(self.gen_len.max()) if self.batch else 0
        generated = torch.full((self.batch, width + 1), self.out_pad, dtype=torch.long, device=self.device)
        if width:
            tokens = torch.stack([t.to(self.device) for t, _ in self.emissions], dim=1)
            emitted = torch.stack([a.to(self.device) for _, a in self.emissions], dim=1)
            # an emission lands at its row's running count; the others all go to the spare last column
            column = torch.where(emitted, emitted.long().cumsum(1) - 1, width)
            generated.scatter_(1, column, torch.where(emitted, tokens, self.out_pad))
        return torch.cat([input_ids, generated[:, :width]], dim=1)

    def per_token(self, which: int) -> tuple[torch.Tensor, ...] | None:
        """Scores (which=2) or raw logits (which=3) indexed by generated-token position."""
        if not self.events:
            return None
        width = int(self.gen_len.max())
        vocab = self.events[0][which].shape[-1]
        out = [torch.full((self.batch, vocab), -math.inf, device=self.device) for _ in range(width)]
        rows = torch.arange(self.batch, device=self.device)
        for event in self.events:
            before, active = event[0], event[1]
            values = event[which].float()
            for b in rows[active].tolist():
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
    pipo_synced_gpus: bool | None = None,
    **model_kwargs,
):
    """PIPO decoding loop (DESIGN §3 with the fixes of §4.3/§3.5): see `PipoForCausalLM.generate`.

    Prefill folds the parity-aligned prompt into latents and runs the backbone once; the MTP layer then runs
    teacher-forced over the prompt (filling its cache exactly as in training) plus one position with the sampled
    token1, so the prefill already emits a real, gated token2. Each decode step compresses the last emitted pair,
    runs one backbone step (token1) and, unless τ >= 1, one MTP step (token2, confidence, gate).

    Fast path: `cache_implementation="static"` gives both the backbone (sized in latents) and the MTP layer static
    caches; the switches that make transformers compile regular decoding (a static cache, `compile_config`,
    `disable_compile`, see `GenerationMixin._valid_auto_compile_criteria`) then compile the two phases of the decode
    step. The steady-state step synchronises host and device once (the stop check) when no processor or stopping
    criterion needs the generated ids.
    """
    streamer = pipo_streamer if pipo_streamer is not None else streamer
    synced_gpus = _resolve_synced_gpus(model, synced_gpus or pipo_synced_gpus)
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
    run_mtp = tau < 1.0
    n_pairs = max(r.numel() for r in state.prompt_rows) // 2
    if synced_gpus and generation_config.cache_implementation == "static":
        # A finished rank keeps stepping until every rank is done, beyond its own budget: no fixed-size cache.
        logger.warning_once("PIPO generation with synced_gpus uses a dynamic cache (ranks step past their budget).")
        generation_config = copy.copy(generation_config)
        generation_config.cache_implementation = None
    cache, mtp_cache, compiled = _prepare_caches(
        model, generation_config, cache, state.batch, n_pairs + max(state.budget, 1), run_mtp
    )
    if streamer is not None:
        streamer.put(input_ids.cpu())

    if synced_gpus or not bool(state.finished.all()):
        with _decode_grad_mode(cache, mtp_cache, synced_gpus), _gathered_root_params(model, synced_gpus):
            _decode(model, state, cache, mtp_cache, tau, run_mtp, compiled, synced_gpus)
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


# ----------------------------------------------------------------------------------------------------------------------
# Caches and the compiled step
# ----------------------------------------------------------------------------------------------------------------------


def _prepare_caches(model, generation_config, cache, batch: int, latents: int, run_mtp: bool):
    """Backbone and MTP caches for one call, and the compiled step functions (or None for eager).

    `cache_implementation="static"` builds static caches sized in latents (`latents` = prompt pairs + token budget
    bounds both the backbone's and the MTP layer's positions); they are kept on the model and reused (reset) by
    later calls that fit, as transformers does, so compiled graphs keep their shapes. A user-given `StaticCache` is
    used as the backbone cache. Everything else gets a `DynamicCache`.
    """
    from transformers.cache_utils import DynamicCache, StaticCache

    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("PIPO generation cannot continue from a pre-filled cache; pass the full prompt instead.")
    user_static = isinstance(cache, StaticCache) and generation_config.cache_implementation != "static"
    want_static = generation_config.cache_implementation == "static" or user_static
    if want_static:
        reason = _static_cache_blocker(model)
        if reason is not None:
            logger.warning_once(f"PIPO generation falls back to a dynamic cache: {reason}.")
            want_static = False
    if not want_static:
        if cache is None or not isinstance(cache, DynamicCache):
            cache = DynamicCache(config=model.config.get_text_config())
        mtp_cache = model.new_mtp_cache() if run_mtp else None
        return cache, mtp_cache, None

    pool = getattr(model, "_pipo_static_caches", None) or {}
    if user_static:
        if cache.get_max_length() < latents:
            raise ValueError(
                f"The static cache holds {cache.get_max_length()} positions but this PIPO generation needs up "
                f"to {latents} latents (prompt pairs + max_new_tokens)."
            )
    else:
        cache = _kept_static(pool, "backbone", batch, latents,
                             lambda: StaticCache(config=model.config.get_text_config(), max_cache_len=latents))
    mtp_cache = None
    if run_mtp:
        mtp_cache = _kept_static(pool, "mtp", batch, latents, lambda: model.new_mtp_cache(max_cache_len=latents))
    model._pipo_static_caches = pool
    compiled = None
    if model._valid_auto_compile_criteria({"cache": cache}, generation_config):
        compiled = _compiled_steps(model, generation_config)
    return cache, mtp_cache, compiled


def _static_cache_blocker(model) -> str | None:
    """Why the backbone cannot decode with a static cache (None when it can)."""
    from transformers.cache_utils import StaticCache

    try:
        probe = StaticCache(config=model.config.get_text_config(), max_cache_len=1)
    except (ValueError, TypeError, KeyError) as err:
        return f"{type(model.backbone).__name__} has no static cache layout ({err})"
    recurrent = sorted({type(layer).__name__ for layer in probe.layers if not hasattr(layer, "max_cache_len")})
    if recurrent:
        # Linear-attention layers (Qwen3.5) carry a recurrent state instead of per-position keys and read the 2D
        # padding mask by its last columns, so a fixed-width mask over static slots would mask the new position.
        return (f"{type(model.backbone).__name__} has recurrent cache layers ({', '.join(recurrent)}) that hold no "
                "per-position KV slots")
    if not probe.is_compileable:
        kinds = sorted({type(layer).__name__ for layer in probe.layers if not layer.is_compileable})
        return f"{type(model.backbone).__name__} cache layers {kinds} cannot be static"
    return None


def _kept_static(pool: dict, key: str, batch: int, latents: int, make):
    """The static cache kept under `pool[key]`, reset, when it fits this call (same batch, enough positions); else a
    new one from `make()`, kept in its place."""
    cache = pool.get(key)
    fits = cache is not None and getattr(cache, "_pipo_capacity", 0) >= latents and all(
        not getattr(layer, "is_initialized", False) or getattr(layer, "batch_size", batch) == batch
        for layer in cache.layers
    )
    if fits:
        cache.reset()
    else:
        cache = make()
        cache._pipo_capacity = latents
        pool[key] = cache
    return cache


# model -> {compile options: (phase 1, phase 2)}; weak keys, and nothing on the module (deepcopy/pickle stay plain).
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_steps(model, generation_config):
    """`torch.compile`d phase functions, built once per model and compile config (graphs are shared across calls)."""
    compile_config = generation_config.compile_config
    if compile_config is None:
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig()
    options = compile_config.to_dict()
    options.pop("_compile_all_devices", None)
    key = repr(sorted(options.items(), key=lambda kv: kv[0]))
    store = _COMPILED_STEPS.setdefault(model, {})
    if key not in store:
        store[key] = tuple(torch.compile(fn, **options) for fn in (_phase1, _phase2, _fused_greedy))
    return store[key]


def _phase1(model, pair: torch.LongTensor, mask, position: torch.LongTensor, cache):
    """Compress the last pair, one backbone step, LM head: `(h_last [B, 1, H], token1 logits [B, V])`."""
    hidden = model.run_backbone(model.embed_pairs(pair), mask, position, cache=cache, use_cache=True)
    h_last = hidden[:, -1:]
    return h_last, model.lm_head(h_last)[:, 0]


def _fused_greedy(model, pair: torch.LongTensor, bb_mask, mtp_mask, position: torch.LongTensor, cache, mtp_cache,
                  pad: int):
    """Phase 1, greedy token1 (PAD suppressed, as `_PipoDecodeState._choose`), phase 2: one graph per step."""
    h_last, raw1 = _phase1(model, pair, bb_mask, position, cache)
    scores = raw1.float().clone()
    scores[:, pad] = -math.inf
    token1 = scores.argmax(dim=-1)
    confidence, raw2 = _phase2(model, token1, h_last, mtp_mask, position, mtp_cache)
    return raw1, token1, confidence, raw2


def _phase2(model, token1: torch.LongTensor, h_last: torch.Tensor, mask, position: torch.LongTensor, cache):
    """One MTP step, confidence, LM head: `(confidence [B], draft logits [B, V])`."""
    m_last = model.mtp_step(token1.unsqueeze(1), h_last, mask, position, cache)
    confidence = torch.sigmoid(model.confidence_logits(h_last, m_last))[:, 0]
    return confidence, model.lm_head(m_last)[:, 0]


# Devices whose tensors the host reads without a device synchronisation, so a step may look at a flag mid-step.
_SYNC_FREE_DEVICES = frozenset({"cpu"})


def _decode(model, state: _PipoDecodeState, cache, mtp_cache, tau: float, run_mtp: bool, compiled,
            synced_gpus: bool = False) -> None:
    """Prefill (eager) then the decode loop: phase 1 and phase 2 per step, one stop check per step.

    With `synced_gpus` every rank runs every step (sharded weights are gathered collectively) until all ranks are
    done; a finished rank's steps change nothing, as all its rows are inactive.
    """
    pad = state.pad
    batch, device = state.batch, state.device
    prompt = _left_pad(state.prompt_rows, pad)
    n_pairs = prompt.shape[1] // 2
    lengths = torch.tensor([r.numel() // 2 for r in state.prompt_rows], device=device)
    padded = bool((lengths < n_pairs).any())
    pair_mask = (torch.arange(n_pairs, device=device).unsqueeze(0) >= (n_pairs - lengths).unsqueeze(1)).long()
    positions = (pair_mask.cumsum(-1) - 1).clamp(min=0)
    masks = _StepMasks(pair_mask, padded, cache, mtp_cache, n_pairs + max(state.budget, 1))
    phase1, phase2, fused = compiled if compiled is not None else (_phase1, _phase2, None)
    if not (run_mtp and state.plain_greedy):
        fused = None  # the host (processors, sampling) acts between the phases: two graphs
    if run_mtp:
        model.mtp.uses_lean_step()  # resolved once, eagerly: the compiled phase 2 then only reads a cached flag
    # A step after whose token1 no row may draft (each stopped at EOS or its budget: the last step) skips the MTP
    # phase where reading that flag costs no device sync (CPU). Elsewhere the phase runs masked, keeping one sync per
    # step. Under synced_gpus every rank runs every phase.
    skip_idle_phase2 = run_mtp and device.type in _SYNC_FREE_DEVICES and not synced_gpus

    # -- prefill (eager): backbone over the prompt latents, MTP teacher-forced over the prompt + token1 ----------
    hidden = model.run_backbone(model.embed_pairs(prompt), masks.backbone, positions, cache=cache, use_cache=True)
    state.backbone_forwards += 1
    h_last = hidden[:, -1:]
    token1 = state.token1(model.lm_head(h_last)[:, 0])
    raw2 = confidence = None
    if run_mtp and (synced_gpus or bool(state.active2.any())):  # nobody left to draft for: skip phase 2
        tokens_in = torch.cat([prompt[:, 2::2], token1.unsqueeze(1)], 1)
        mtp_hidden = model.run_mtp(tokens_in, hidden, masks.mtp, positions, cache=mtp_cache, use_cache=True)
        m_last = mtp_hidden[:, -1:]
        confidence = torch.sigmoid(model.confidence_logits(h_last, m_last))[:, 0]
        raw2 = model.lm_head(m_last)[:, 0]
    token2 = state.token2(raw2, confidence, tau)

    # -- decode: steady state, no host sync but the stop check ----------------------------------------------------
    position = positions[:, -1:]
    step = 0
    while not _all_done(state, synced_gpus):
        step += 1
        position = position + 1
        masks.advance(n_pairs + step - 1)
        pair = torch.stack([token1, token2], dim=1)
        if fused is not None:
            raw1, token1, confidence, raw2 = fused(model, pair, masks.backbone, masks.mtp, position, cache,
                                                   mtp_cache, pad)
            state.backbone_forwards += 1 if not state.done_locally else 0
            token1 = state.token1(raw1, chosen=token1)
            token2 = state.token2(raw2, confidence, tau)
            continue
        h_last, raw1 = phase1(model, pair, masks.backbone, position, cache)
        state.backbone_forwards += 1 if not state.done_locally else 0
        token1 = state.token1(raw1)
        # rows that stopped on token1 are masked out of the update
        if run_mtp and (not skip_idle_phase2 or bool(state.active2.any())):
            confidence, raw2 = phase2(model, token1, h_last, masks.mtp, position, mtp_cache)
            token2 = state.token2(raw2, confidence, tau)
        else:
            token2 = state.token2(None, None, tau)


def _decode_grad_mode(cache, mtp_cache, synced_gpus: bool):
    """`torch.inference_mode()` for eager decoding over dynamic caches, else `torch.no_grad()`.

    Eager decoding of a small backbone is bound by per-op overhead, which inference mode trims (no version counters
    or view tracking; DESIGN §3.8). It is used only where every tensor it creates is new to this call: dynamic
    caches built here or passed in empty (so the two caches returned hold inference tensors: clone them before
    using them in autograd). Static caches outlive the call (kept and reset in place by later calls, and
    shared with the compiled step, which only static caches get) and FSDP gathers parameters in place, so those paths
    keep `no_grad`.
    """
    if synced_gpus or not all(c is None or _is_dynamic(c) for c in (cache, mtp_cache)):
        return torch.no_grad()
    return torch.inference_mode()


def _all_done(state: _PipoDecodeState, synced_gpus: bool) -> bool:
    """The per-step stop check (the step's one host sync); with `synced_gpus`, done only when every rank is."""
    state.done_locally = bool(state.finished.all())
    if not synced_gpus:
        return state.done_locally
    import torch.distributed as dist

    flag = torch.tensor(0.0 if state.done_locally else 1.0, device=state.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0.0


def _resolve_synced_gpus(model, requested: bool | None) -> bool:
    """`synced_gpus` as `generate` computes it for its own decoding methods (ZeRO-3 or FSDP, world size > 1)."""
    if requested is not None:
        return bool(requested)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return bool(is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


@contextlib.contextmanager
def _gathered_root_params(model, synced_gpus: bool):
    """Gather FSDP2's root-level parameters (embeddings, LM head, PIPO heads) for the whole decode.

    PIPO calls submodules (embedding, compressor, LM head, MTP and confidence heads) outside the root `forward`,
    whose hooks are what gathers FSDP2 parameters; sharded layers wrapped on their own still gather in their hooks.
    """
    unshard = getattr(model, "unshard", None) if synced_gpus else None
    if unshard is None:
        yield
        return
    state = getattr(model, "_get_fsdp_state", lambda: None)()
    if state is not None:
        # Root lazy init, as the root forward would do: the layers then reshard after their forward (they would
        # otherwise each act as a root and keep their parameters gathered).
        state._lazy_init()
    unshard()
    try:
        yield
    finally:
        model.reshard()


class _StepMasks:
    """2D padding masks of the backbone and MTP caches.

    Unpadded batches need none. With left padding the dynamic path grows them by one column per step; the static
    path keeps full-length buffers (one column per cache slot) and switches a column on per step, so the compiled
    step always sees the same shapes.
    """

    def __init__(self, pair_mask: torch.LongTensor, padded: bool, cache, mtp_cache, latents: int):
        self.static = getattr(cache, "is_compileable", False) and not _is_dynamic(cache)
        self.backbone = self.mtp = None
        if not padded:
            return
        batch, n_pairs = pair_mask.shape
        mtp_prompt = torch.cat([pair_mask[:, :-1] * pair_mask[:, 1:], pair_mask.new_ones(batch, 1)], dim=1)
        if not self.static:
            self.backbone, self.mtp = pair_mask, mtp_prompt
            return
        # Absolute cache positions (sliding layers index the same 2D mask); kept caches fix the width across calls.
        self.backbone = pair_mask.new_zeros(batch, max(latents, getattr(cache, "_pipo_capacity", 0)))
        self.backbone[:, :n_pairs] = pair_mask
        if mtp_cache is not None:
            self.mtp = pair_mask.new_zeros(batch, max(latents, getattr(mtp_cache, "_pipo_capacity", 0)))
            self.mtp[:, :n_pairs] = mtp_prompt

    def advance(self, slot: int) -> None:
        """Make cache slot `slot` (the position the next step writes) visible."""
        if self.backbone is None:
            return
        if self.static:
            self.backbone[:, slot] = 1
            if self.mtp is not None:
                self.mtp[:, slot] = 1
            return
        self.backbone = torch.cat([self.backbone, self.backbone.new_ones(self.backbone.shape[0], 1)], dim=1)
        self.mtp = torch.cat([self.mtp, self.mtp.new_ones(self.mtp.shape[0], 1)], dim=1)


def _is_dynamic(cache) -> bool:
    from transformers.cache_utils import DynamicCache

    return isinstance(cache, DynamicCache)


def _left_pad(rows: list[torch.Tensor], pad: int) -> torch.LongTensor:
    width = max(r.numel() for r in rows)
    out = rows[0].new_full((len(rows), width), pad)
    for b, r in enumerate(rows):
        out[b, width - r.numel():] = r
    return out


__all__ = ["PipoGenerateOutput", "pipo_generate", "pipo_generate_entry", "commit_rate", "DEFAULT_CONFIDENCE_THRESHOLD"]
