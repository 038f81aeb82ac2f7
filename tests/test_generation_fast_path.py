"""PIPO on transformers' fast path: static caches, the compiled two-phase step, host syncs per decode step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import StaticCache
from transformers.generation.configuration_utils import CompileConfig

from conftest import EOS_ID, PAD_ID, tiny_pipo
from pipo_oracle import wiring_sensitive_pipo
from transformers_pipo import generation_pipo

SYNC_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def count_host_syncs():
    """Count host-device synchronisations: tensor -> Python conversions, `nonzero` and boolean-mask indexing."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS + ("__getitem__", "__setitem__")}
    original_nonzero_fn = torch.nonzero

    def counted(fn):
        def wrapper(*args, **kwargs):
            counter["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    def has_bool_index(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    def getitem(self, index):
        if has_bool_index(index):
            counter["n"] += 1
        return originals["__getitem__"](self, index)

    def setitem(self, index, value):
        if has_bool_index(index):
            counter["n"] += 1
        return originals["__setitem__"](self, index, value)

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counted(originals[name]))
        torch.Tensor.__getitem__ = getitem
        torch.Tensor.__setitem__ = setitem
        torch.nonzero = counted(original_nonzero_fn)
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = original_nonzero_fn


def _generate(model, ids, steps: int, **kwargs):
    # τ<0 commits every draft: the prefill emits 2 tokens and each decode step 2 more.
    return model.generate(ids, max_new_tokens=2 + 2 * steps, do_sample=False, eos_token_id=None,
                          pipo_confidence_threshold=-1.0, return_dict_in_generate=True, **kwargs)


def syncs_per_step(model, ids, **kwargs) -> float:
    """Host syncs per steady-state decode step: (syncs of a 32-step run - a 1-step run) / 31."""
    _generate(model, ids, 1, **kwargs)  # warm-up (lazy inits, compilation)
    counts = {}
    for steps in (1, 32):
        with count_host_syncs() as counter:
            out = _generate(model, ids, steps, **kwargs)
        assert out.backbone_forwards == steps + 1
        counts[steps] = counter["n"]
    return (counts[32] - counts[1]) / 31


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_at_most_one_host_sync_per_decode_step(cache_implementation, monkeypatch):
    """One host read per step (the stop check) where a read synchronises the device. On CPU, where a read is free,
    a step also reads whether any row may still draft after token1 (to skip an idle last MTP phase)."""
    from transformers_pipo import generation_pipo

    model = tiny_pipo("qwen3")
    ids = torch.randint(3, PAD_ID, (1, 7), generator=torch.Generator().manual_seed(0))
    assert syncs_per_step(model, ids, cache_implementation=cache_implementation) <= 2.0
    monkeypatch.setattr(generation_pipo, "_SYNC_FREE_DEVICES", frozenset())  # as on an accelerator
    assert syncs_per_step(model, ids, cache_implementation=cache_implementation) <= 1.0


def test_sync_counter_sees_syncs():
    """The instrument counts what it claims to (else the bound above could not fail)."""
    x = torch.tensor([1, 0, 1])
    with count_host_syncs() as counter:
        bool(x.any()), x.tolist(), int(x[0]), x[x > 0], x.nonzero(), torch.nonzero(x)
    assert counter["n"] == 6


def _assert_same_outputs(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.pipo_slot_ids, b.pipo_slot_ids) and torch.equal(a.pipo_slot_lengths, b.pipo_slot_lengths)
    assert torch.equal(a.committed_drafts, b.committed_drafts) and torch.equal(a.decode_steps, b.decode_steps)
    assert a.backbone_forwards == b.backbone_forwards
    assert torch.allclose(a.mean_confidence, b.mean_confidence, equal_nan=True, rtol=1e-5, atol=1e-6)


def _left_padded_batch():
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, PAD_ID, (n,), generator=gen).tolist() for n in (1, 2, 3, 4, 5, 8, 9, 12)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("tau", [-1.0, 0.5, 1.0])
def test_static_cache_matches_dynamic(family, tau):
    """Static caches give the eager dynamic path's tokens, raw slots and statistics (left-padded batch of 8 and a
    single row); Qwen3.5's linear-attention layers fall back to a dynamic cache. The model is the oracle tests'
    wiring-sensitive one, so a wiring difference between the paths shows in the tokens."""
    model = wiring_sensitive_pipo(family)
    ids, mask = _left_padded_batch()
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[4:5, -5:]}):
        kwargs = dict(max_new_tokens=9, do_sample=False, eos_token_id=EOS_ID, pipo_confidence_threshold=tau,
                      return_dict_in_generate=True, **inputs)
        dynamic = model.generate(**kwargs)
        static = model.generate(cache_implementation="static", **kwargs)
        _assert_same_outputs(dynamic, static)
        if family == "qwen3_5":
            assert not isinstance(static.cache, StaticCache)
        else:
            assert isinstance(static.cache, StaticCache)
            assert tau >= 1 or isinstance(static.mtp_cache, StaticCache)
            # Sized in latents (prompt pairs + max_new_tokens), not in tokens.
            latents = (inputs["input_ids"].shape[1] + 1) // 2 + 9
            assert static.cache._pipo_capacity == latents
            full = [layer for layer in static.cache.layers if type(layer).__name__ == "StaticLayer"]
            assert all(layer.keys.shape[-2] == latents for layer in full)


def test_qwen3_5_static_fallback_warns(caplog):
    from transformers.utils import logging

    model = tiny_pipo("qwen3_5")
    generation_pipo.logger.warning_once.cache_clear()  # earlier tests may have warned already
    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, cache_implementation="static", eos_token_id=None)
    logging.disable_propagation()
    assert "falls back to a dynamic cache" in caplog.text and "LinearAttentionLayer" in caplog.text


def test_static_seeded_sampling_matches_dynamic():
    model = tiny_pipo("llama")
    ids, mask = _left_padded_batch()
    outs = []
    for cache_implementation in (None, "static"):
        torch.manual_seed(11)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
                                   temperature=0.9, eos_token_id=EOS_ID, pipo_confidence_threshold=0.5,
                                   cache_implementation=cache_implementation, return_dict_in_generate=True))
    _assert_same_outputs(*outs)


def test_user_static_cache_too_small_is_rejected():
    model = tiny_pipo("llama")
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=4)
    with pytest.raises(ValueError, match="latents"):
        model.generate(torch.tensor([[4, 5, 6, 7]]), cache=cache, max_new_tokens=8, eos_token_id=None)


def test_compiled_step_matches_eager_without_recompiles(monkeypatch):
    """The compiled step (CPU: `_compile_all_devices`) is token-identical to eager PIPO on a left-padded batch of 8:
    one fused graph for plain greedy, two (phase 1, phase 2) with a logits processor; no recompilation on a second
    call with other prompts."""
    import torch._dynamo

    model = tiny_pipo("qwen3")
    ids, mask = _left_padded_batch()
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    kwargs = dict(max_new_tokens=9, do_sample=False, eos_token_id=EOS_ID, pipo_confidence_threshold=0.5,
                  return_dict_in_generate=True)
    torch._dynamo.reset()
    # Compiled first, on a fresh model: nothing eager has run before the graphs are traced.
    compiled = model.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=compile_config,
                              **kwargs)
    eager = model.generate(ids, attention_mask=mask, **kwargs)
    _assert_same_outputs(eager, compiled)
    assert len(generation_pipo._COMPILED_STEPS[model]) == 1
    # Greedy without processors: one fused graph per step (phase 1, argmax, phase 2).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # A logits processor acts between the phases: two graphs (phase 1, phase 2), still identical to eager.
    penalised = dict(kwargs, repetition_penalty=1.3)
    _assert_same_outputs(
        model.generate(ids, attention_mask=mask, **penalised),
        model.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=compile_config,
                       **penalised),
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    other = torch.randint(3, PAD_ID, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(other, attention_mask=mask, cache_implementation="static",
                               compile_config=compile_config, **kwargs)
    _assert_same_outputs(model.generate(other, attention_mask=mask, **kwargs), again)

    # disable_compile turns the same call back to eager static decoding.
    def no_compile(*args):
        raise AssertionError("compiled despite disable_compile")

    monkeypatch.setattr(generation_pipo, "_compiled_steps", no_compile)
    plain = model.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=compile_config,
                           disable_compile=True, **kwargs)
    _assert_same_outputs(eager, plain)
