"""Small hooks into vLLM 0.32 internals that have no public extension point (installed by `register`).

Each hook wraps one vLLM function, acts only for PIPO checkpoints (the target's config has ``model_type == "pipo"``)
and otherwise calls the original. They are listed in docs/SERVING.md with the upstream change that would remove each.

1. ``EngineArgs.create_engine_config``: a PIPO checkpoint gets PIPO's speculative config when none is given.
2. ``SpeculativeConfig.hf_config_override``: ``method="mtp"`` on a PIPO config resolves to the PIPO drafter.
3. ``EngineCore.preprocess_add_request``: odd prompts get a PAD appended; per-request PIPO counters.
4. ``Scheduler.__init__`` / ``Scheduler._mamba_block_aligned_split``: every scheduled chunk ends on an even
   position (the scheduler's existing alignment hook, so far used for Mamba only).
5. ``scheduler.check_stop`` / ``Scheduler._update_request_with_output``: ``max_tokens`` counts real tokens and PAD
   never reaches the output.
6. ``rejection_sampler.rejection_sample``: synthetic accept-all (rates 1.0) on CPU, whose C++ kernels assert against
   synthetic mode (on GPU the Triton kernels support it and are left alone).
7. ``SpecDecodeBaseProposer.__init__`` / ``_sample_draft_tokens`` / ``propose``: the drafter's token is gated by the
   confidence head (`sigmoid(conf) >= tau`, else PAD) with the request's tau; a batch whose requests all have
   tau >= 1 skips the drafter (all PAD), as `generate` skips the MTP phase.
8. ``VllmConfig._get_v2_model_runner_unsupported_features``: PIPO stays on the V1 model runner, whose proposer
   hook 7 gates (Model Runner V2 has its own speculators).
9. ``SamplingParams._validate_spec_decode`` / ``gpu_model_runner.build_logitsprocs``: min-p and logit bias are
   accepted and their built-in processors loaded for PIPO (vLLM refuses both with speculative decoding because its
   verification ignores them; PIPO has no verification: token1 is vLLM's bonus token, sampled with every built-in
   processor, and hook 7 applies them to token2). Custom logits processors stay refused, as vLLM does for every
   speculative config.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from . import DRAFTER_ARCH, TAU_KEY, speculative_config

logger = logging.getLogger("transformers_pipo.serving.vllm")
_SAMPLING_EPS = 1e-5  # vLLM's Sampler: temperatures below this are greedy
_INSTALLED = False


def pipo_pad_id(vllm_config) -> int | None:
    """The PAD id when `vllm_config` serves a PIPO checkpoint, else None."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if getattr(hf_config, "model_type", None) != "pipo":
        return None
    return int(hf_config.pad_token_id)


def resolve_tau(value, default: float) -> float:
    """A request's τ (SamplingParams.extra_args[TAU_KEY]) or the checkpoint default; non-numbers/NaN are errors."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{TAU_KEY} must be a number (<0 commits every draft, >=1 none), got {value!r}.")
    return float(value)


def checkpoint_tau(model: str, revision: str | None = None) -> float:
    """τ from the checkpoint's generation_config.json (`pipo_confidence_threshold`), else PIPO's default."""
    from transformers import GenerationConfig

    from transformers_pipo.generation_pipo import DEFAULT_CONFIDENCE_THRESHOLD

    try:
        gen = GenerationConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError):
        return DEFAULT_CONFIDENCE_THRESHOLD
    return resolve_tau(getattr(gen, TAU_KEY, None), DEFAULT_CONFIDENCE_THRESHOLD)


def _is_pipo_checkpoint(model: str, revision: str | None) -> bool:
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "pipo"


# -- 1. default speculative config -------------------------------------------------------------------------------------


def _patch_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if _is_pipo_checkpoint(self.model, getattr(self, "revision", None)):
            wanted = speculative_config()
            given = self.speculative_config
            if given is None:
                self.speculative_config = dict(wanted)
            else:
                given = dict(given) if isinstance(given, dict) else given
                wrong = {k: v for k, v in wanted.items() if not isinstance(given, dict) or given.get(k) != v}
                if wrong:
                    raise ValueError(
                        f"A PIPO checkpoint is served with its own drafter and confidence gate; its speculative "
                        f"config must contain {wanted} (got {given}). Leave --speculative-config unset."
                    )
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


# -- 2. drafter architecture -------------------------------------------------------------------------------------------


_ORIGINAL_HF_CONFIG_OVERRIDE = None


def pipo_hf_config_override(hf_config):
    """`SpeculativeConfig.hf_config_override` plus PIPO (module-level: the draft config is pickled to the engine)."""
    if getattr(hf_config, "model_type", None) == "pipo":
        hf_config.model_type = "mtp"  # a registered MTP model type: vLLM then takes the MTP drafter path
        hf_config.update({"n_predict": 1, "architectures": [DRAFTER_ARCH]})
        return hf_config
    return _ORIGINAL_HF_CONFIG_OVERRIDE(hf_config)


def _patch_speculative_config():
    global _ORIGINAL_HF_CONFIG_OVERRIDE
    from vllm.config.speculative import SpeculativeConfig

    _ORIGINAL_HF_CONFIG_OVERRIDE = SpeculativeConfig.hf_config_override
    SpeculativeConfig.hf_config_override = staticmethod(pipo_hf_config_override)


# -- 3. PAD appended to odd prompts --------------------------------------------------------------------------------------


def _patch_engine_core():
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.preprocess_add_request

    @functools.wraps(original)
    def preprocess_add_request(self, request):
        pad = pipo_pad_id(self.vllm_config)
        if pad is not None:
            if request.prompt_token_ids is None:
                raise ValueError("PIPO serving needs token prompts (prompt embeddings cannot be folded into pairs).")
            if len(request.prompt_token_ids) % 2:
                request.prompt_token_ids = list(request.prompt_token_ids) + [pad]
        req, wave = original(self, request)
        if pad is not None and req.sampling_params is not None:
            req._pipo_pad = pad
            req._pipo_pads = 0
            req._pipo_real_max = req.max_tokens
            params = req.sampling_params
            if params.logprobs is not None or params.prompt_logprobs is not None:
                logger.warning("PIPO serving returns no logprobs yet; the request's logprobs are not aligned with "
                               "its tokens.")
        return req, wave

    EngineCore.preprocess_add_request = preprocess_add_request


# -- 4./5. scheduler: even chunks, real-token budget, PAD out of the output ----------------------------------------------


def _patch_scheduler():
    from vllm.v1.core.sched import scheduler as sched_module
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    split = Scheduler._mamba_block_aligned_split
    update = Scheduler._update_request_with_output
    check_stop = sched_module.check_stop

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._pipo_pad = pipo_pad_id(self.vllm_config)
        if self._pipo_pad is not None:
            if self.need_mamba_block_aligned_split:
                raise NotImplementedError("PIPO serving does not support Mamba/linear-attention cache alignment.")
            self.need_mamba_block_aligned_split = True  # routes every chunk through the split hook below

    @functools.wraps(split)
    def _mamba_block_aligned_split(self, request, num_new_tokens, num_new_local_computed_tokens=0,
                                   num_external_computed_tokens=0):
        if getattr(self, "_pipo_pad", None) is None:
            return split(self, request, num_new_tokens, num_new_local_computed_tokens, num_external_computed_tokens)
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        return num_new_tokens - (start + num_new_tokens) % 2

    def pipo_check_stop(request, max_model_len):
        pad = getattr(request, "_pipo_pad", None)
        if pad is not None:
            if request.output_token_ids[-1] == pad:
                request._pipo_pads += 1
            request.max_tokens = request._pipo_real_max + request._pipo_pads  # max_tokens counts real tokens
        return check_stop(request, max_model_len)

    @functools.wraps(update)
    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        new_token_ids, stopped = update(self, request, new_token_ids, *args, **kwargs)
        pad = getattr(request, "_pipo_pad", None)
        if pad is not None:
            new_token_ids = [t for t in new_token_ids if t != pad]
        return new_token_ids, stopped

    Scheduler.__init__ = __init__
    Scheduler._mamba_block_aligned_split = _mamba_block_aligned_split
    Scheduler._update_request_with_output = _update_request_with_output
    sched_module.check_stop = pipo_check_stop


# -- 6. accept-all on CPU ----------------------------------------------------------------------------------------------


def accept_all(draft_token_ids: torch.Tensor, num_draft_tokens: list[int], max_spec_len: int,
               cu_num_draft_tokens: torch.Tensor, bonus_token_ids: torch.Tensor) -> torch.Tensor:
    """Rejection-sampler output when every draft is accepted: each request's drafts, then its bonus token, then -1."""
    device = bonus_token_ids.device
    batch = len(num_draft_tokens)
    out = torch.full((batch, max_spec_len + 1), -1, dtype=torch.int32, device=device)
    counts = torch.tensor(num_draft_tokens, dtype=torch.long, device=device)
    cols = torch.arange(max_spec_len + 1, device=device).unsqueeze(0)
    if draft_token_ids.numel():
        starts = cu_num_draft_tokens.long() - counts
        src = (starts.unsqueeze(1) + cols).clamp(0, draft_token_ids.numel() - 1)
        out = torch.where(cols < counts.unsqueeze(1), draft_token_ids[src].to(torch.int32), out)
    return torch.where(cols == counts.unsqueeze(1), bonus_token_ids.reshape(-1, 1).to(torch.int32), out)


def _patch_rejection_sampler():
    from vllm.v1.sample import rejection_sampler as module

    original = module.rejection_sample

    @functools.wraps(original)
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                         target_logits, bonus_token_ids, sampling_metadata, synthetic_mode=False,
                         synthetic_conditional_rates=None, **kwargs):
        rates = synthetic_conditional_rates
        if synthetic_mode and rates is not None and rates.device.type == "cpu" and bool((rates >= 1.0).all()):
            return accept_all(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, bonus_token_ids)
        return original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                        target_logits, bonus_token_ids, sampling_metadata, synthetic_mode=synthetic_mode,
                        synthetic_conditional_rates=synthetic_conditional_rates, **kwargs)

    module.rejection_sample = rejection_sample


# -- 7. the confidence gate on the drafter's token -----------------------------------------------------------------------


def _patch_proposer():
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    init = SpecDecodeBaseProposer.__init__
    sample = SpecDecodeBaseProposer._sample_draft_tokens
    propose = SpecDecodeBaseProposer.propose

    @functools.wraps(init)
    def __init__(self, vllm_config, device, *args, **kwargs):
        init(self, vllm_config, device, *args, **kwargs)
        self._pipo_runner = kwargs.get("runner", args[1] if len(args) > 1 else None)
        self._pipo_tau = None
        if pipo_pad_id(vllm_config) is not None:
            model_config = vllm_config.model_config
            self._pipo_tau = checkpoint_tau(model_config.model, getattr(model_config, "revision", None))

    @functools.wraps(sample)
    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        model = self.model
        if not getattr(model, "is_pipo_drafter", False):
            return sample(self, hidden_states, sampling_metadata)
        logits = model.compute_logits(hidden_states)
        draft = sample_draft(logits, sampling_metadata)
        _warn_unapplied(self, sampling_metadata)
        confidence = model.confidence(hidden_states)
        tau = _batch_tau(self, draft.shape[0], draft.device)
        # τ < 0 commits every draft; τ >= 1 none (even where sigmoid saturates to 1.0), as `generate`.
        commit = (tau < 0) | ((tau < 1) & (confidence >= tau))
        return torch.where(commit, draft, torch.full_like(draft, model.pad_token_id)), None

    @functools.wraps(propose)
    def pipo_propose(self, *args, **kwargs):
        skipped = skip_drafter(self, *args, **kwargs)
        return skipped if skipped is not None else propose(self, *args, **kwargs)

    SpecDecodeBaseProposer.__init__ = __init__
    SpecDecodeBaseProposer._sample_draft_tokens = _sample_draft_tokens
    SpecDecodeBaseProposer.propose = pipo_propose


def skip_drafter(proposer, num_speculative_tokens: int, *args, **kwargs) -> torch.Tensor | None:
    """All-PAD drafts, without running the drafter, when every request of the batch has τ >= 1 (none of them can ever
    commit a draft, so their MTP cache is never read: `generate` skips the MTP phase at τ >= 1); else None (the
    drafter runs). Takes `SpecDecodeBaseProposer.propose`'s arguments."""
    model = proposer.model
    if not getattr(model, "is_pipo_drafter", False) or num_speculative_tokens <= 0:
        return None
    metadata = kwargs["common_attn_metadata"] if "common_attn_metadata" in kwargs else args[5]
    next_token_ids = kwargs["next_token_ids"] if "next_token_ids" in kwargs else args[3]
    batch = metadata.batch_size()
    if not bool((_batch_tau(proposer, batch, next_token_ids.device) >= 1).all()):
        return None
    proposer.num_speculative_tokens = num_speculative_tokens
    proposer._last_draft_probs = None
    return torch.full((batch, num_speculative_tokens), model.pad_token_id, dtype=torch.int64,
                      device=next_token_ids.device)


def _builtin_processors(metadata) -> tuple[list, list]:
    """vLLM's built-in logits processors of the batch, split as its sampler applies them: (logit bias and min-tokens,
    which act before the penalties; min-p, which acts after the temperature). Hook 9 loads them for PIPO; custom
    processors are refused by vLLM with any speculative config."""
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )

    procs = getattr(metadata, "logitsprocs", None)
    if procs is None:
        return [], []
    before = [p for p in procs.non_argmax_invariant
              if isinstance(p, (LogitBiasLogitsProcessor, MinTokensLogitsProcessor))]
    after = [p for p in procs.argmax_invariant if isinstance(p, MinPLogitsProcessor)]
    return before, after


def sample_draft(logits: torch.Tensor, metadata) -> torch.Tensor:
    """token2 from the drafter's logits with the request's sampling parameters, in the order of vLLM's `Sampler`
    (so token2 means what token1 means): allowed-token mask, logit bias and min-tokens, presence/frequency/repetition
    penalties (`apply_all_penalties` over the prompt and the output so far, which at draft time already ends with
    this step's token1), then greedy rows take the argmax; the others get temperature, min-p, top-k, top-p and a draw
    from the request's own generator when it has a seed (vLLM's drafter uses temperature only and the global RNG).

    Not applied: bad words (`_warn_unapplied` says so)."""
    rows = logits.shape[0]
    scores = logits.float().clone()  # the processors below write in place
    before, after = _builtin_processors(metadata)
    batch = metadata.frequency_penalties.shape[0]  # one entry per request of the batch
    if (before or after or not metadata.no_penalties) and rows != batch:
        raise RuntimeError(f"PIPO drafter sampled {rows} rows for a batch of {batch} requests; the per-request "
                           f"sampling state would not line up.")
    mask = getattr(metadata, "allowed_token_ids_mask", None)
    if mask is not None:
        scores.masked_fill_(mask[:rows], -float("inf"))
    for proc in before:
        scores = proc.apply(scores)
    if not metadata.no_penalties:
        from vllm.v1.sample.ops.penalties import apply_all_penalties

        scores = apply_all_penalties(scores, metadata.prompt_token_ids, metadata.presence_penalties,
                                     metadata.frequency_penalties, metadata.repetition_penalties,
                                     metadata.output_token_ids)
    greedy = scores.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy
    temperature = metadata.temperature[:rows].float()
    is_greedy = temperature < _SAMPLING_EPS
    scores = scores / torch.where(is_greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    for proc in after:
        scores = proc.apply(scores)
    if metadata.top_k is not None:
        k = metadata.top_k[:rows].long().clamp(1, scores.shape[1])
        kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if metadata.top_p is not None:
        top_p = metadata.top_p[:rows].float().unsqueeze(1)
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(1, order, ordered.masked_fill(drop, -float("inf")))
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs)
    for row in range(rows):
        generator = metadata.generators.get(row)
        race[row].exponential_(generator=generator) if generator is not None else race[row].exponential_()
    sampled = (probs / race).argmax(dim=-1)  # exponential race: an exact draw from `probs`
    return torch.where(is_greedy, greedy, sampled)


def _warn_unapplied(proposer, metadata) -> None:
    """Warn once per engine when a batch uses a sampling feature token2 does not get (token1 gets it): bad words."""
    if getattr(metadata, "bad_words_token_ids", None) and not getattr(proposer, "_pipo_warned_sampling", False):
        logger.warning("PIPO serving: bad_words apply to token1 only; the drafted token2 is sampled without them "
                       "(docs/SERVING.md section 4).")
        proposer._pipo_warned_sampling = True


def _batch_tau(proposer, rows: int, device) -> torch.Tensor:
    """τ per drafted row (the runner's batch order), from each request's `extra_args` or the checkpoint."""
    default = proposer._pipo_tau
    runner = proposer._pipo_runner
    if runner is None:
        return torch.full((rows,), default, device=device)
    values = []
    for req_id in runner.input_batch.req_ids[:rows]:
        params = runner.requests[req_id].sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        values.append(resolve_tau(extra.get(TAU_KEY), default))
    return torch.tensor(values, dtype=torch.float32, device=device)


# -- 8. V1 model runner -----------------------------------------------------------------------------------------------


def _patch_runner_choice():
    from vllm.config.vllm import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features

    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self):
        unsupported = original(self)
        if pipo_pad_id(self) is not None:
            unsupported.append("PIPO checkpoints (the confidence gate hooks the V1 proposer)")
        return unsupported

    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features


# -- 9. min-p and logit bias accepted ---------------------------------------------------------------------------------


def _is_pipo_speculation(speculative_config) -> bool:
    target = getattr(speculative_config, "target_model_config", None)
    return getattr(getattr(target, "hf_config", None), "model_type", None) == "pipo"


def _patch_logitsprocs():
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors
    from vllm.v1.worker import gpu_model_runner as module

    original = module.build_logitsprocs

    @functools.wraps(original)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        if pipo_pad_id(vllm_config) is not None and not is_pooling_model and not custom_logitsprocs:
            return LogitsProcessors(ctor(vllm_config, device, is_pin_memory) for ctor in BUILTIN_LOGITS_PROCESSORS)
        return original(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)

    module.build_logitsprocs = build_logitsprocs


def _patch_sampling_params():
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode

    @functools.wraps(original)
    def _validate_spec_decode(self, speculative_config):
        if speculative_config is not None and _is_pipo_speculation(speculative_config):
            return  # accept-all: no verification that would ignore min-p / logit bias
        return original(self, speculative_config)

    SamplingParams._validate_spec_decode = _validate_spec_decode


def install() -> None:
    """Install every hook once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _patch_engine_args()
    _patch_speculative_config()
    _patch_engine_core()
    _patch_scheduler()
    _patch_rejection_sampler()
    _patch_proposer()
    _patch_runner_choice()
    _patch_sampling_params()
    _patch_logitsprocs()
    _INSTALLED = True
