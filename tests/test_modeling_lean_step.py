"""The lean eager decode step (`lean_body_plan` / `lean_decode_step` behind `run_backbone`, `decode_causal_mask`):
bitwise the body's own forward for every family it applies to, the full forward for every other."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicCache

from conftest import EOS_ID, PAD_ID, tiny_pipo
from transformers_pipo import modeling_pipo
from transformers_pipo.modeling_pipo import lean_body_plan, lean_decode_step

LEAN_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}  # rotary bodies; mistral's tiny config slides (window 4)


def test_plan_per_family(family):
    """Standard rotary bodies get a plan (with their mask kinds); Qwen3.5 (linear attention) and GPT-2 (learned
    positions) do not."""
    model = tiny_pipo(family)
    plan = lean_body_plan(model.backbone)
    assert (plan is not None) == (family in LEAN_FAMILIES)
    if plan is not None:
        assert plan.num_layers == model.backbone.config.num_hidden_layers
        expected = "sliding_attention" if family == "mistral" else "full_attention"
        assert plan.mask_kinds == (expected,) * plan.num_layers


def _latents(model, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, model.config.get_text_config().hidden_size, generator=gen)


def _assert_same_cache(a, b):
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        for name in ("keys", "values"):
            assert torch.equal(getattr(layer_a, name), getattr(layer_b, name)), name


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_lean_step_equals_body_forward(family, padded, static):
    """Prompt through the body, then 8 one-latent steps (past mistral's window of 4) both ways: hidden states and
    caches bitwise equal, with and without left padding, on dynamic and static caches."""
    if family not in LEAN_FAMILIES:
        pytest.skip("no lean step for this family (see test_ineligible_bodies_take_the_full_forward)")
    model = tiny_pipo(family)
    body = model.backbone
    plan = lean_body_plan(body)
    batch, prompt, steps = 3, 5, 8
    x = _latents(model, batch, prompt + steps, seed=1)
    mask = torch.ones(batch, prompt + steps, dtype=torch.long)
    if padded:
        mask[0, :3] = 0
        mask[1, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def new_cache():
        if static:
            return StaticCache(config=body.config, max_cache_len=prompt + steps)
        return DynamicCache(config=body.config)

    caches = [new_cache(), new_cache()]
    with torch.no_grad():
        for cache in caches:
            body(inputs_embeds=x[:, :prompt], attention_mask=mask[:, :prompt] if padded else None,
                 position_ids=positions[:, :prompt], cache=cache, use_cache=True)
        for t in range(prompt, prompt + steps):
            if static:  # the static path hands the full-width mask (see generation_pipo._StepMasks)
                step_mask = torch.cat([mask[:, : t + 1], mask.new_zeros(batch, prompt + steps - t - 1)], 1)
            else:
                step_mask = mask[:, : t + 1]
            step_mask = step_mask if (padded or static) else None
            args = (step_mask, positions[:, t:t + 1])
            ref = body(inputs_embeds=x[:, t:t + 1], attention_mask=args[0], position_ids=args[1], cache=caches[0],
                       use_cache=True).last_hidden_state
            lean = lean_decode_step(body, plan, x[:, t:t + 1], *args, caches[1])
            assert torch.equal(ref, lean), t
    _assert_same_cache(caches[0], caches[1])


def _outputs(model, **kwargs):
    return model.generate(max_new_tokens=11, do_sample=False, eos_token_id=EOS_ID, return_dict_in_generate=True,
                          **kwargs)


def _idle_last_step(out) -> int:
    """1 when every row still running in the last step stopped on its token1 there (an odd slot count), so that
    the step's MTP phase was skipped (CPU), else 0."""
    last = out.decode_steps == out.backbone_forwards
    return int(bool((out.pipo_slot_lengths[last] % 2 == 1).all()))


def _assert_identical(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.pipo_slot_ids, b.pipo_slot_ids) and torch.equal(a.pipo_slot_lengths, b.pipo_slot_lengths)
    assert torch.equal(a.committed_drafts, b.committed_drafts) and torch.equal(a.decode_steps, b.decode_steps)
    assert a.backbone_forwards == b.backbone_forwards
    assert torch.allclose(a.mean_confidence, b.mean_confidence, rtol=0, atol=0, equal_nan=True)


def _left_padded_batch():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, PAD_ID, (n,), generator=gen).tolist() for n in (1, 4, 7, 10)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tau", [-1.0, 0.5, 1.0])
def test_generate_identical_with_and_without_lean_step(family, tau, attn, monkeypatch):
    """Eager PIPO generation gives the same tokens, raw slots and statistics (bitwise) with the lean step as with
    the full forward every step, on a left-padded batch and a single unpadded row; the lean step runs on every
    decode step of an eligible body and never on another."""
    model = tiny_pipo(family)
    model.set_attn_implementation(attn)
    ids, mask = _left_padded_batch()
    lean_body_plan(model.backbone)  # the one-time probe calls the lean step too: resolve it before counting
    calls = {"n": 0}
    original = modeling_pipo.lean_decode_step

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[2:3, -7:]}):
        monkeypatch.setattr(modeling_pipo, "lean_decode_step", counting)
        calls["n"] = 0
        lean = _outputs(model, pipo_confidence_threshold=tau, **inputs)
        expected_calls = lean.backbone_forwards - 1 if family in LEAN_FAMILIES else 0
        assert calls["n"] == expected_calls
        monkeypatch.setattr(modeling_pipo, "lean_body_plan", lambda body: None)
        full = _outputs(model, pipo_confidence_threshold=tau, **inputs)
        monkeypatch.undo()
        _assert_identical(lean, full)


def test_ineligible_bodies_take_the_full_forward():
    """A body whose forward does more than its parts (here: scales the input embeddings, as Gemma does) fails the
    probe and keeps the full forward; generation stays identical to the unpatched full path."""
    model = tiny_pipo("llama")
    body = model.backbone
    forward = body.forward

    def scaled_forward(*args, inputs_embeds=None, **kwargs):
        return forward(*args, inputs_embeds=inputs_embeds * 2.0, **kwargs)

    body.forward = scaled_forward
    assert lean_body_plan(body) is None
    assert body.__dict__[modeling_pipo._LEAN_PLAN_KEY] is False  # decided once
    ids = torch.randint(3, PAD_ID, (1, 6), generator=torch.Generator().manual_seed(0))
    x = _latents(model, 1, 6, seed=2)
    cache = DynamicCache(config=body.config)
    with torch.no_grad():
        model.run_backbone(x[:, :5], None, torch.arange(5)[None], cache=cache, use_cache=True)
        out = model.run_backbone(x[:, 5:], None, torch.tensor([[5]]), cache=cache, use_cache=True)
        ref_cache = DynamicCache(config=body.config)
        body(inputs_embeds=x[:, :5], position_ids=torch.arange(5)[None], cache=ref_cache, use_cache=True)
        ref = body(inputs_embeds=x[:, 5:], position_ids=torch.tensor([[5]]), cache=ref_cache,
                   use_cache=True).last_hidden_state
    assert torch.equal(out, ref)
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape[1] > ids.shape[1]


def test_training_mode_is_not_planned():
    """Dropout makes a training-mode probe meaningless: no plan, and nothing cached for later eval use."""
    model = tiny_pipo("qwen3").train()
    assert lean_body_plan(model.backbone) is None
    assert modeling_pipo._LEAN_PLAN_KEY not in model.backbone.__dict__
    model.eval()
    assert lean_body_plan(model.backbone) is not None


@pytest.mark.parametrize("tau", [-1.0, 0.5])
def test_mtp_step_reuses_the_backbone_rotary_embedding(family, tau, monkeypatch):
    """With equal rotary embeddings, an eager decode step computes cos/sin once (backbone) and the MTP step reuses
    it: tokens, slots and statistics are bitwise those of computing it twice, and the MTP's own rotary embedding
    runs only in the prefill."""
    model = tiny_pipo(family)
    ids, mask = _left_padded_batch()
    shares = model.model._mtp_shares_rope() and family in LEAN_FAMILIES  # reuse needs the lean backbone step
    assert shares == (family in LEAN_FAMILIES)
    calls = {"n": 0}
    rotary = getattr(model.mtp, "rotary_emb", None)
    if rotary is not None:
        rotary.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    shared = _outputs(model, pipo_confidence_threshold=tau, input_ids=ids, attention_mask=mask)
    if shares:
        assert calls["n"] == 1  # the teacher-forced prefill over the prompt; no decode step
    monkeypatch.setattr(type(model.model), "_mtp_shares_rope", lambda self: False)
    calls["n"] = 0
    fresh = _outputs(model, pipo_confidence_threshold=tau, input_ids=ids, attention_mask=mask)
    if rotary is not None and family in LEAN_FAMILIES:
        # prefill + one per decode step, but for a last step after whose token1 no row may draft (skipped on CPU)
        assert calls["n"] == fresh.backbone_forwards - _idle_last_step(fresh)
    _assert_identical(shared, fresh)


def test_mtp_step_recomputes_rope_for_other_positions():
    """Only the very position tensor of the last backbone step gets the remembered cos/sin: an MTP step at other
    positions (a caller's own tensor, or a shifted one) computes its own, so a position fault stays visible."""
    model = tiny_pipo("qwen3")
    h = _latents(model, 1, 6, seed=3)
    pos = torch.arange(5)[None]
    token1 = torch.tensor([[7]])

    def mtp_after_backbone(step_pos):
        cache, mtp_cache = DynamicCache(config=model.backbone.config), model.new_mtp_cache()
        with torch.no_grad():
            model.run_backbone(h[:, :5], None, pos, cache=cache, use_cache=True)
            model.run_mtp(torch.tensor([[4, 5, 6, 7, 8]]), h[:, :5], None, pos, cache=mtp_cache, use_cache=True)
            backbone_pos = torch.tensor([[5]])
            model.run_backbone(h[:, 5:], None, backbone_pos, cache=cache, use_cache=True)
            return model.mtp_step(token1, h[:, 5:], None, step_pos(backbone_pos), mtp_cache)

    same = mtp_after_backbone(lambda p: p)
    equal_copy = mtp_after_backbone(lambda p: p.clone())
    shifted = mtp_after_backbone(lambda p: p + 1)
    assert torch.equal(same, equal_copy)
    assert not torch.equal(same, shifted)


@pytest.mark.parametrize("new_tokens, mtp_steps", [(5, 2), (6, 3)])
def test_idle_last_mtp_phase_is_skipped_on_cpu(new_tokens, mtp_steps, monkeypatch):
    """τ<0: the prefill emits 2 tokens and each step 2 more. With 5 new tokens the second step's token1 spends the
    budget, so no row may draft and its MTP phase is skipped (2 MTP runs for 3 backbone runs); with 6 it runs.
    Either way the outputs are bitwise those of running every MTP phase (the skip disabled, as off CPU)."""
    from transformers_pipo import generation_pipo

    model = tiny_pipo("qwen3")
    ids = torch.randint(3, PAD_ID, (2, 6), generator=torch.Generator().manual_seed(4))
    calls = {"n": 0}
    model.mtp.decoder_layer().register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def run():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pipo_confidence_threshold=-1.0, return_dict_in_generate=True)

    skipped = run()
    assert skipped.backbone_forwards == 3 and calls["n"] == mtp_steps
    assert skipped.sequences.shape[1] == ids.shape[1] + new_tokens
    monkeypatch.setattr(generation_pipo, "_SYNC_FREE_DEVICES", frozenset())
    calls["n"] = 0
    every = run()
    assert calls["n"] == 3
    _assert_identical(skipped, every)


def test_decode_norm_fuses_plain_rms_norms_only(family):
    """`decode_norm` takes `F.rms_norm` for a plain `w * x / rms(x)` norm with bitwise the module's output, and the
    module's own forward for every other form (zero-centred `(1 + w)`, LayerNorm), under grad, or with hooks."""
    import torch.nn.functional as F

    from transformers_pipo.modeling_pipo import _FUSED_NORM_KEY, decode_norm, norm_style_of

    model = tiny_pipo(family)
    norm = model.mtp.pre_fc_norm_hidden
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, norm.weight.shape[0], generator=torch.Generator().manual_seed(1)) * 4
    plain = norm_style_of(model.model.backbone.norm if hasattr(model.model.backbone, "norm") else norm) == "w"
    fused = {"n": 0}
    original = F.rms_norm

    def counting(*args, **kwargs):
        fused["n"] += 1
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "rms_norm", counting)
        with torch.no_grad():
            decode_norm(norm, x)  # decides once (the probe may call F.rms_norm itself)
            assert (norm.__dict__[_FUSED_NORM_KEY][(x.dtype, x.device)] is not False) == plain
            fused["n"] = 0
            assert torch.equal(decode_norm(norm, x), norm(x))
            assert fused["n"] == int(plain)
            handle = norm.register_forward_hook(lambda *_: None)
            assert torch.equal(decode_norm(norm, x), norm(x))
            handle.remove()
            assert fused["n"] == int(plain)  # a hooked module runs its own forward
        assert torch.equal(decode_norm(norm, x), norm(x))
        assert fused["n"] == int(plain)  # grad enabled: the module's forward
