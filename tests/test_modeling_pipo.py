"""PipoForCausalLM core (issue 2): from_backbone init, exact DESIGN §2.3 indexing against an independent oracle,
parity rules, batch equivalence, chunked losses, gradients and input errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    EOS_ID,
    FAMILIES,
    PAD_ID,
    VOCAB,
    make_tokenizer,
    tiny_backbone_config,
    tiny_pipo,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoModelForCausalLM

from transformers_pipo import PipoConfig, PipoForCausalLM
from transformers_pipo.modeling_pipo import align_row

IGNORE = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine are ~10x faster single-threaded (no OpenMP contention).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def source_backbone(family: str, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_backbone_config(family, **config_kwargs)).eval()


def decoder_layers(body: torch.nn.Module) -> torch.nn.ModuleList:
    return body.h if hasattr(body, "h") else body.layers


def random_ids(batch: int, length: int, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, PAD_ID, (batch, length), generator=g)  # never BOS/EOS/PAD


# ----------------------------------------------------------------------------------------------------------------------
# Every family: forward with labels, gradients, detached confidence inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_forward_backward_reaches_every_trainable_part(family):
    model = tiny_pipo(family).train()
    ids = random_ids(2, 16)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    out = model(ids, labels=labels)
    for name in ("loss", "backbone_loss", "mtp_loss", "confidence_loss"):
        value = getattr(out, name)
        assert value.dim() == 0 and torch.isfinite(value), name
    assert out.backbone_loss > 0 and out.mtp_loss > 0 and out.confidence_loss > 0
    out.loss.backward()

    groups = {"model.compressor.": [], "model.mtp.": [], "model.backbone.": [], "model.confidence_head.": []}
    for name, param in model.named_parameters():
        for prefix in groups:
            if name.startswith(prefix):
                groups[prefix].append((name, param))
    for prefix, params in groups.items():
        assert params, prefix
        for name, param in params:
            assert param.grad is not None, f"no gradient reached {name}"
            assert torch.isfinite(param.grad).all(), name
            # mtp.fc starts as [0 | I] (hidden only), so the embedding-side norm gets an exactly-zero gradient at init.
            if not name.startswith("model.mtp.pre_fc_norm_embedding."):
                assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5", "gpt2"])
def test_zero_weight_on_embedding_path_is_only_the_fc_init(family):
    # Counterpart of the exemption above: with an fc that reads the embedding, its norm does get a gradient.
    model = tiny_pipo(family, mtp_fc_init="average").train()
    ids = random_ids(1, 12)
    model(ids, labels=ids).loss.backward()
    for name, param in model.mtp.pre_fc_norm_embedding.named_parameters():
        assert param.grad.abs().sum() > 0, name


def _confidence_grads(model, ids):
    out = model(ids, labels=ids)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.confidence_loss, [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, grads)}


def test_confidence_loss_is_detached_from_backbone_and_mtp(family):
    model = tiny_pipo(family).train()
    grads = _confidence_grads(model, random_ids(2, 12))
    for name, grad in grads.items():
        if name.startswith("model.confidence_head."):
            assert grad.abs().sum() > 0, name
        else:
            assert grad.abs().sum() == 0, f"confidence loss leaks a gradient into {name}"


def test_confidence_detach_switch_is_what_stops_the_gradient():
    # Control for the test above: without detaching, the same measurement sees gradients in backbone and MTP.
    model = tiny_pipo("qwen3", detach_confidence_inputs=False).train()
    grads = _confidence_grads(model, random_ids(2, 12))
    assert sum(g.abs().sum() for n, g in grads.items() if n.startswith("model.backbone.layers.")) > 0
    assert sum(g.abs().sum() for n, g in grads.items() if n.startswith("model.mtp.layers.")) > 0


def test_confidence_target_is_detached_even_without_input_detach():
    # The BCE target p_MTP(gold) must be a constant: the gradient equals that of BCE against a fixed target.
    torch.manual_seed(0)
    model = tiny_pipo("llama", detach_confidence_inputs=False).train()
    model.config.mtp_loss_weight = 0.0
    ids = random_ids(1, 12)
    out = model(ids, labels=ids)
    target = torch.exp(-F.cross_entropy(out.mtp_logits[0], ids[0, 3::2], reduction="none")).detach()
    manual = F.binary_cross_entropy_with_logits(out.confidence_logits[0], target)
    torch.testing.assert_close(out.confidence_loss, manual, rtol=1e-6, atol=1e-6)
    params = list(model.mtp.parameters())
    got = torch.autograd.grad(out.confidence_loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(manual, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# from_backbone initialisation
# ----------------------------------------------------------------------------------------------------------------------


def test_from_backbone_keeps_backbone_and_lm_head_bit_identical(family):
    source = source_backbone(family)
    reference = {k: v.detach().clone() for k, v in source.state_dict().items()}
    head = source.get_output_embeddings().weight.detach().clone()
    model = PipoForCausalLM.from_backbone(source, pad_token_id=PAD_ID)
    prefix = source.base_model_prefix + "."
    state = model.state_dict()
    for key, value in reference.items():
        ours = "model.backbone." + key[len(prefix):] if key.startswith(prefix) else key
        assert torch.equal(state[ours], value), key
    assert torch.equal(model.lm_head.weight, head)
    assert model.config.pad_token_id == PAD_ID
    tied = source.get_output_embeddings().weight is source.get_input_embeddings().weight
    assert tied is (family in ("qwen3", "gpt2"))
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    assert model.config.tie_word_embeddings is tied


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_from_backbone_path_is_bit_identical(family, tmp_path):
    source_backbone(family).save_pretrained(tmp_path)
    source = AutoModelForCausalLM.from_pretrained(tmp_path)
    model = PipoForCausalLM.from_backbone(tmp_path, pad_token_id=PAD_ID)
    state = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(state[key.replace("model.", "model.backbone.", 1)], value), key
    assert model.config.mtp_init == "last_layer"


@pytest.mark.parametrize("family", FAMILIES)
def test_compressor_linear_init_is_exact_sum(family):
    model = tiny_pipo(family, compressor_type="linear")
    ids = random_ids(2, 10)
    emb = model.get_input_embeddings()(ids)
    assert torch.equal(model.embed_pairs(ids), emb[:, 0::2] + emb[:, 1::2])


@pytest.mark.parametrize("family", ["llama", "qwen3_5", "gpt2"])
def test_compressor_mlp_init_is_sum_of_silu(family):
    model = tiny_pipo(family, compressor_type="mlp")
    ids = random_ids(2, 10)
    emb = model.get_input_embeddings()(ids)
    want = F.silu(emb[:, 0::2]) + F.silu(emb[:, 1::2])
    torch.testing.assert_close(model.embed_pairs(ids), want, rtol=0, atol=1e-7)
    assert [n for n, _ in model.compressor.named_parameters()] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


def _last_full_attention_index(config) -> int:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return max(i for i, t in enumerate(types) if t == "full_attention")


def _assert_mtp_layer_is_copy(model, source_layer):
    mtp_layer = model.mtp.decoder_layer()
    src, tgt = source_layer.state_dict(), mtp_layer.state_dict()
    assert set(src) == set(tgt)
    for key in src:
        assert torch.equal(src[key], tgt[key]), key
        assert src[key].data_ptr() != tgt[key].data_ptr(), f"{key} shares storage with the backbone"


def test_mtp_layer_is_copy_of_last_full_attention_layer(family):
    source = source_backbone(family)
    body = getattr(source, source.base_model_prefix)
    layer = decoder_layers(body)[_last_full_attention_index(source.config)]
    model = PipoForCausalLM.from_backbone(source, pad_token_id=PAD_ID)
    _assert_mtp_layer_is_copy(model, layer)
    # The MTP layer is a full-attention layer (no sliding window, no linear attention) in its own config.
    mtp_cfg = model.mtp.body_config
    assert mtp_cfg.num_hidden_layers == 1
    assert getattr(mtp_cfg, "sliding_window", None) is None
    assert getattr(mtp_cfg, "layer_types", None) in (None, ["full_attention"])
    # mtp.fc starts as [0 | I] (hidden only), DESIGN §1.5.
    h = model.config.hidden_size
    assert torch.equal(model.mtp.fc.weight, torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))


def test_mtp_layer_skips_trailing_linear_attention_layers():
    # Hybrid backbone whose last layer is linear attention: the MTP copies the last *full-attention* layer (index 1).
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    config = tiny_backbone_config("qwen3_5")
    config.layer_types = types
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config).eval()
    model = PipoForCausalLM.from_backbone(source, pad_token_id=PAD_ID)
    _assert_mtp_layer_is_copy(model, source.model.layers[1])


@pytest.mark.parametrize("family", ["llama", "qwen3_5", "gpt2"])
def test_new_norms_start_at_identity_scale(family):
    model = tiny_pipo(family)
    x = torch.randn(5, model.config.hidden_size) * 3 + 1
    for norm in (model.mtp.pre_fc_norm_embedding, model.mtp.pre_fc_norm_hidden):
        y = norm(x)
        if family == "gpt2":  # LayerNorm: zero mean, unit variance, no scale or shift
            torch.testing.assert_close(y, F.layer_norm(x, x.shape[-1:], eps=norm.eps))
        else:
            torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(5), rtol=1e-4, atol=1e-4)
    x2 = torch.randn(5, 2 * model.config.hidden_size)
    y2 = model.confidence_head.norm(x2)
    torch.testing.assert_close(y2.pow(2).mean(-1), torch.ones(5), rtol=1e-3, atol=1e-3)


def test_confidence_head_starts_near_one_half(family):
    model = tiny_pipo(family)
    with torch.no_grad():
        out = model(random_ids(2, 20))
    c = torch.sigmoid(out.confidence_logits)
    assert c.shape == (2, 9)
    assert (c - 0.5).abs().max() < 0.02, c


def test_from_backbone_changes_exactly_what_it_documents():
    """Documented in `conversion.backbone.from_backbone`: the backbone's body and LM head are shared (not copied) and
    resized in place when a PAD is added; the tokenizer gets its PAD in place; the backbone's config and generation
    config are left as they were (the PIPO model has copies)."""
    tokenizer = make_tokenizer()
    n = len(tokenizer)
    source = source_backbone("llama", vocab_size=n)
    source.generation_config.eos_token_id = [EOS_ID]
    config_before = source.config.to_dict()
    generation_before = source.generation_config.to_dict()
    model = PipoForCausalLM.from_backbone(source, tokenizer)
    assert model.model.backbone is source.model and model.lm_head is source.lm_head  # shared modules
    assert source.get_input_embeddings().weight.shape[0] == n + 1  # resized in place for the added PAD
    assert tokenizer.pad_token == "<|pipo_pad|>" and tokenizer.pad_token_id == n  # tokenizer updated in place
    after = source.config.to_dict()
    assert {k: v for k, v in after.items() if k != "vocab_size"} == {
        k: v for k, v in config_before.items() if k != "vocab_size"}  # only the resize touched the config
    assert source.generation_config.to_dict() == generation_before
    assert model.config.backbone_config is not source.config
    assert model.generation_config is not source.generation_config
    with pytest.raises(TypeError, match="pipo_confidence_threshold"):
        PipoForCausalLM.from_backbone(source_backbone("llama"), pad_token_id=PAD_ID, confidence_threshold=0.5)


@pytest.mark.parametrize(("family", "tied"), [("qwen3", True), ("gpt2", True), ("llama", False)])
def test_tokenizer_without_pad_gets_dedicated_pad_and_resize(family, tied):
    tokenizer = make_tokenizer()
    assert tokenizer.pad_token_id is None
    n = len(tokenizer)  # 127: the new PAD (id 127) does not fit the backbone vocabulary
    source = source_backbone(family, vocab_size=n)
    old_embed = source.get_input_embeddings().weight.detach().clone()
    old_head = source.get_output_embeddings().weight.detach().clone()
    model, tok = PipoForCausalLM.from_backbone(source, tokenizer, return_tokenizer=True)

    assert tok is tokenizer and tok.pad_token_id == n and tok.pad_token == "<|pipo_pad|>"
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token_id not in model.config.eos_token_ids
    assert model.config.pad_token_id == n and model.generation_config.pad_token_id == n
    assert model.get_input_embeddings().weight.shape == (n + 1, 32)
    assert model.lm_head.weight.shape == (n + 1, 32)
    assert model.config.vocab_size == n + 1
    assert torch.equal(model.get_input_embeddings().weight[:n], old_embed)
    assert torch.equal(model.lm_head.weight[:n], old_head)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    if not tied:
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        out = model(torch.tensor([[5, n, 6, 7]]), labels=torch.tensor([[IGNORE, IGNORE, 6, 7]]))
    assert out.logits.shape == (1, 2, n + 1) and torch.isfinite(out.loss)


def test_tokenizer_pad_equal_to_eos_is_replaced():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = PipoForCausalLM.from_backbone(source_backbone("llama"), tokenizer)
    assert tokenizer.pad_token_id not in (EOS_ID, None)
    assert model.config.pad_token_id == tokenizer.pad_token_id == VOCAB - 1


def test_tokenizer_with_distinct_pad_is_reused():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = "w7"
    source = source_backbone("qwen3")
    model = PipoForCausalLM.from_backbone(source, tokenizer)
    assert model.config.pad_token_id == 7
    assert len(tokenizer) == VOCAB - 1 and model.config.vocab_size == VOCAB


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_native_mtp_weights_load_bit_exactly(family, tmp_path):
    from safetensors.torch import load_file, save_file

    source = source_backbone(family)
    source.save_pretrained(tmp_path)
    donor = tiny_pipo(family, seed=123)
    with torch.no_grad():
        for p in donor.mtp.parameters():
            p.add_(torch.randn_like(p))
    native = {f"mtp.{k}": v.detach().clone().contiguous() for k, v in donor.mtp.state_dict().items()}
    weights = load_file(tmp_path / "model.safetensors")
    weights.update(native)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = PipoForCausalLM.from_backbone(tmp_path, pad_token_id=PAD_ID)
    assert model.config.mtp_init == "native"
    state = model.state_dict()
    for key, value in native.items():
        assert torch.equal(state["model." + key], value), key
    for key, value in source.state_dict().items():  # the backbone is untouched by the extra keys
        assert torch.equal(state[key.replace("model.", "model.backbone.", 1)], value), key
    with torch.no_grad():
        out = model(random_ids(1, 10))
    assert torch.isfinite(out.mtp_logits).all()


def test_native_mtp_requested_but_absent(tmp_path):
    source_backbone("qwen3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"mtp_init='native'.*no `mtp\.\*` weights"):
        PipoForCausalLM.from_backbone(tmp_path, pad_token_id=PAD_ID, mtp_init="native")


# ----------------------------------------------------------------------------------------------------------------------
# Exact indexing (DESIGN §2.3) against an independent oracle
# ----------------------------------------------------------------------------------------------------------------------


def oracle_mtp_body(model) -> torch.nn.Module:
    """A one-layer full-attention model of the backbone's class carrying the MTP layer's weights."""
    cfg = copy.deepcopy(model.config.backbone_config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"]
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    body = AutoModel.from_config(cfg).eval()
    weights = {k: v for k, v in model.mtp.state_dict().items() if not k.startswith(("fc.", "pre_fc_norm_"))}
    result = body.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    embedding = next(n for n, m in body.named_modules() if m is body.get_input_embeddings())
    assert result.missing_keys == [f"{embedding}.weight"]
    return body


@pytest.mark.parametrize("pick", ["first", "second"])
def test_exact_indexing_matches_oracle_and_hand_losses(family, pick):
    torch.manual_seed(7)
    model = tiny_pipo(family, compressor_type="linear")
    model.config.mtp_loss_weight = 0.7
    model.config.confidence_loss_weight = 1.3
    h = model.config.hidden_size
    eye, zero = torch.eye(h), torch.zeros(h, h)
    with torch.no_grad():
        # Compressor keeps one token of each pair: z_j = E(x[2j]) ("first") or E(x[2j+1]) ("second").
        model.compressor.linear.weight.copy_(torch.cat([eye, zero] if pick == "first" else [zero, eye], dim=1))
        model.compressor.linear.bias.zero_()
        # A random fc and non-trivial pre-fc norms, so swapping embedding/hidden or misindexing h is visible.
        model.mtp.fc.weight.normal_(0.0, 0.3)
        for p in list(model.mtp.pre_fc_norm_embedding.parameters()) + list(model.mtp.pre_fc_norm_hidden.parameters()):
            p.add_(torch.rand_like(p))
        for p in model.confidence_head.parameters():
            p.normal_(0.0, 0.5)

    B, T = 2, 20  # L = 10 latents: longer than mistral's sliding window (4)
    L = T // 2
    x = random_ids(B, T, seed=3)
    labels = x.clone()
    labels[:, :4] = IGNORE
    labels[0, 7] = IGNORE  # a token2 slot
    labels[1, 10] = IGNORE  # a token1 slot
    labels[1, 15] = IGNORE
    with torch.no_grad():
        out = model(x, labels=labels)

        E = model.get_input_embeddings()
        picked = x[:, 0::2] if pick == "first" else x[:, 1::2]
        positions = torch.arange(L).unsqueeze(0).expand(B, -1)
        h_ref = model.model.backbone(inputs_embeds=E(picked), position_ids=positions).last_hidden_state
        logits_ref = model.lm_head(h_ref)
        tok1 = x[:, 2::2]
        u = F.linear(
            torch.cat([model.mtp.pre_fc_norm_embedding(E(tok1)), model.mtp.pre_fc_norm_hidden(h_ref[:, :-1])], -1),
            model.mtp.fc.weight,
        )
        m_ref = oracle_mtp_body(model)(inputs_embeds=u, position_ids=positions[:, :-1]).last_hidden_state
        mtp_logits_ref = model.lm_head(m_ref)
        conf_ref = model.confidence_head(h_ref[:, :-1], m_ref)

    assert torch.equal(out.pair_input_ids, x) and torch.equal(out.pair_labels, labels)
    assert out.logits.shape == (B, L, VOCAB) and out.mtp_logits.shape == (B, L - 1, VOCAB)
    torch.testing.assert_close(out.last_hidden_state, h_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, logits_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mtp_last_hidden_state, m_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mtp_logits, mtp_logits_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.confidence_logits, conf_ref, rtol=0, atol=1e-5)

    # Hand-computed losses: token1 target labels[2j+2], token2 target labels[2j+3], -100 skipped.
    ce1, ce2, conf_terms = [], [], []
    for b in range(B):
        for j in range(L - 1):
            y1, y2 = int(labels[b, 2 * j + 2]), int(labels[b, 2 * j + 3])
            if y1 != IGNORE:
                ce1.append(-torch.log_softmax(out.logits[b, j].double(), -1)[y1])
            if y2 != IGNORE:
                nll = -torch.log_softmax(out.mtp_logits[b, j].double(), -1)[y2]
                ce2.append(nll)
                p = torch.exp(-nll)  # BCE target = p_MTP(gold)
                c = out.confidence_logits[b, j].double()
                conf_terms.append(-(p * F.logsigmoid(c) + (1 - p) * F.logsigmoid(-c)))
    assert (len(ce1), len(ce2)) == (2 * (L - 1) - 3, 2 * (L - 1) - 4)  # prompt slots 2, 3 and the holes are skipped
    backbone_loss, mtp_loss, conf_loss = (torch.stack(v).mean().float() for v in (ce1, ce2, conf_terms))
    torch.testing.assert_close(out.backbone_loss, backbone_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, mtp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.confidence_loss, conf_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, backbone_loss + 0.7 * mtp_loss + 1.3 * conf_loss, rtol=1e-5, atol=1e-6)


def test_losses_without_any_label_are_zero_but_attached():
    model = tiny_pipo("llama").train()
    ids = random_ids(1, 8)
    out = model(ids, labels=torch.full_like(ids, IGNORE))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()  # ghost terms keep every head in the graph
    assert model.confidence_head.fc2.weight.grad is not None and model.mtp.fc.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------------
# Parity rules (DESIGN §1.2)
# ----------------------------------------------------------------------------------------------------------------------


def test_odd_length_gets_pad_appended_with_ignored_label():
    model = tiny_pipo("qwen3")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, PAD_ID]]))
    assert out.pair_input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, PAD_ID]]
    assert out.pair_labels.tolist() == [[IGNORE, IGNORE, 7, 8, 9, 10, 11, IGNORE]]
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.mtp_logits, ref.mtp_logits)
    with torch.no_grad():
        no_labels = model(ids)
    assert no_labels.pair_input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, PAD_ID]]


def test_odd_prompt_boundary_gets_pad_inserted():
    model = tiny_pipo("qwen3")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 8, 9, 10, 11, 12]])  # first label at odd index 3
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = model(torch.tensor([[5, 6, 7, PAD_ID, 8, 9, 10, 11, 12, PAD_ID]]),
                    labels=torch.tensor([[IGNORE] * 4 + [8, 9, 10, 11, 12, IGNORE]]))
    assert out.pair_input_ids.tolist() == [[5, 6, 7, PAD_ID, 8, 9, 10, 11, 12, PAD_ID]]
    assert out.pair_labels.tolist() == [[IGNORE, IGNORE, IGNORE, IGNORE, 8, 9, 10, 11, 12, IGNORE]]
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


def test_aligned_input_is_left_unchanged():
    model = tiny_pipo("qwen3")
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[:, :2] = IGNORE
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert out.pair_input_ids is ids and out.pair_labels is labels


def test_batch_realignment_puts_pads_only_in_odd_slots():
    model = tiny_pipo("qwen3")
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    labels = ids.clone()
    labels[0, :3] = IGNORE  # odd boundary, odd length
    labels[1, :2] = IGNORE  # even boundary, odd length 7
    labels[2, :1] = IGNORE  # odd boundary, length 4
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    pid, plab, pmask = out.pair_input_ids, out.pair_labels, out.pair_attention_mask
    assert pid.shape[1] % 2 == 0
    for b in range(3):
        real = pid[b][pmask[b].bool()] if pmask is not None else pid[b]
        assert len(real) % 2 == 0
        pads = (real == PAD_ID).nonzero().flatten()
        assert (pads % 2 == 1).all(), real
        first = int((plab[b] != IGNORE).nonzero()[0])
        assert first % 2 == 0
        assert torch.equal(real[real != PAD_ID], ids[b][mask[b].bool()])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(3, 120), min_size=1, max_size=24),
    st.integers(0, 24),
    st.lists(st.booleans(), min_size=24, max_size=24),
)
def test_align_row_invariants(ids, prompt, holes):
    prompt = min(prompt, len(ids))
    labels = [IGNORE if (i < prompt or (i > prompt and holes[i])) else t for i, t in enumerate(ids)]
    out_ids, out_labels = align_row(ids, labels, PAD_ID)
    assert len(out_ids) % 2 == 0 and len(out_ids) == len(out_labels)
    assert len(out_ids) - len(ids) in (0, 1, 2)
    pads = [i for i, t in enumerate(out_ids) if t == PAD_ID]
    assert all(i % 2 == 1 for i in pads)
    assert all(out_labels[i] == IGNORE for i in pads)
    assert [t for t in out_ids if t != PAD_ID] == ids
    assert [y for t, y in zip(out_ids, out_labels) if t != PAD_ID] == labels
    first = next((i for i, y in enumerate(out_labels) if y != IGNORE), None)
    assert first is None or first % 2 == 0


# ----------------------------------------------------------------------------------------------------------------------
# Batch vs single
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_rows_alone(family, side):
    model = tiny_pipo(family)
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(3, PAD_ID, (n,), generator=g) for n in (12, 7, 4, 10)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[b, sl], mask[b, sl] = r, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            single = model(r.unsqueeze(0))
            n = single.logits.shape[1]
            sl = slice(0, n) if side == "right" else slice(batch.logits.shape[1] - n, None)
            sl2 = slice(0, n - 1) if side == "right" else slice(batch.logits.shape[1] - n, batch.logits.shape[1] - 1)
            torch.testing.assert_close(batch.logits[b, sl], single.logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.mtp_logits[b, sl2], single.mtp_logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.confidence_logits[b, sl2], single.confidence_logits[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked LM-head losses
# ----------------------------------------------------------------------------------------------------------------------


def test_chunked_loss_equals_unchunked_loss_and_grads():
    model = tiny_pipo("llama").train()
    ids = random_ids(2, 30)
    labels = ids.clone()
    labels[:, :6] = IGNORE
    results = []
    for chunk in (3, 10**9):
        model.zero_grad(set_to_none=True)
        model.config.loss_chunk_size = chunk
        out = model(ids, labels=labels, return_logits=False)
        assert out.logits is None and out.mtp_logits is None
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.backbone_loss, out.mtp_loss, out.confidence_loss, out.loss, grads))
    (*losses_a, grads_a), (*losses_b, grads_b) = results
    for a, b in zip(losses_a, losses_b):
        assert abs(a.item() - b.item()) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


MEMORY_SCRIPT = r"""
import json, re, sys
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers_pipo import PipoForCausalLM

V, T = 32000, 4096
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=2, bos_token_id=1)
model = PipoForCausalLM.from_backbone(AutoModelForCausalLM.from_config(cfg), pad_token_id=V - 1,
                                      loss_chunk_size=256).train()
ids = torch.randint(3, V - 1, (1, T))
labels = ids.clone()
# Warm-up on a short sequence: parameter gradients and lazy buffers belong to the baseline.
model(ids[:, :64], labels=labels[:, :64], return_logits=False).loss.backward()
model.zero_grad(set_to_none=False)

def status_mb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

def start_window():
    # Reset the kernel's RSS high-water mark (VmHWM) so earlier peaks (imports, model building) cannot hide
    # what the measured call allocates; return the resident size it starts from.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")

base = start_window()
out = model(ids, labels=labels, return_logits=False)
out.loss.backward()
chunked_loss = out.loss.item()
chunked = status_mb("VmHWM") - base
del out
# Control: the same measurement with one chunk holding all [L, V] logits (forward only).
model.config.loss_chunk_size = 10**9
base = start_window()
with torch.no_grad():
    full_loss = model(ids, labels=labels, return_logits=False).loss.item()
full = status_mb("VmHWM") - base
print(json.dumps({"chunked_mb": chunked, "full_mb": full, "chunked_loss": chunked_loss, "full_loss": full_loss}))
"""

# Full fp32 logits of one head: L = 2048 latents x V = 32000 x 4 B = 262 MB (the model has two heads).
FULL_LOGITS_MB = 2048 * 32000 * 4 / 1e6
CHUNKED_BOUND_MB = 160


def test_chunked_loss_bounds_peak_memory(tmp_path):
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    # glibc otherwise recycles freed 32 MB chunk buffers inside a fragmented heap, so ru_maxrss would count
    # dead chunks; a fixed mmap threshold returns every large tensor to the OS when it is freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chunked_mb"] < CHUNKED_BOUND_MB < FULL_LOGITS_MB, result
    assert result["full_mb"] > FULL_LOGITS_MB, result  # the measurement does see full logits
    assert abs(result["chunked_loss"] - result["full_loss"]) < 1e-4, result


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_model_construction_requires_pad():
    config = PipoConfig(backbone_config=tiny_backbone_config("qwen3"))
    with pytest.raises(ValueError, match=r"pad_token_id is required"):
        PipoForCausalLM(config)


def test_from_backbone_without_pad_information():
    with pytest.raises(ValueError, match=r"needs a PAD id distinct from EOS"):
        PipoForCausalLM.from_backbone(source_backbone("llama"))
    with pytest.raises(ValueError, match=r"pad_token_id=2 equals an EOS id"):
        PipoForCausalLM.from_backbone(source_backbone("llama"), pad_token_id=EOS_ID)


def test_from_backbone_rejects_pipo_model():
    with pytest.raises(ValueError, match=r"already a PIPO model"):
        PipoForCausalLM.from_backbone(tiny_pipo("llama"), pad_token_id=PAD_ID)


def test_labels_shape_mismatch():
    model = tiny_pipo("qwen3")
    with pytest.raises(ValueError, match=r"labels shape \(1, 4\) does not match input_ids shape \(1, 6\)"):
        model(random_ids(1, 6), labels=random_ids(1, 4))


def test_attention_mask_shape_mismatch():
    model = tiny_pipo("qwen3")
    with pytest.raises(ValueError, match=r"attention_mask shape"):
        model(random_ids(1, 6), attention_mask=torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 0), (2, 0)])
def test_empty_input_ids(shape):
    model = tiny_pipo("qwen3")
    with pytest.raises(ValueError, match=r"input_ids is empty"):
        model(torch.zeros(shape, dtype=torch.long))


def test_input_ids_must_be_2d_and_present():
    model = tiny_pipo("qwen3")
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, seq_len\]"):
        model(torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs input_ids"):
        model(attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_token_level_position_ids_rejected():
    model = tiny_pipo("qwen3")
    with pytest.raises(ValueError, match=r"position_ids must index latents"):
        model(random_ids(1, 8), position_ids=torch.arange(8).unsqueeze(0))


def test_set_attn_implementation_reaches_the_mtp_layer():
    model = tiny_pipo("llama")
    model.set_attn_implementation("eager")
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    assert model.mtp.decoder_layer().self_attn.config._attn_implementation == "eager"
    assert {c._attn_implementation for c in configs.values()} == {"eager"}
    with torch.no_grad():
        eager = model(random_ids(1, 12))
    model.set_attn_implementation("sdpa")
    assert model.mtp.decoder_layer().self_attn.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(random_ids(1, 12))
    torch.testing.assert_close(eager.mtp_logits, sdpa.mtp_logits, rtol=0, atol=1e-5)


def test_pad_is_never_a_training_target():
    # Spec §1.1/§2.2: PAD targets are always masked, so neither head learns to emit PAD even when a collator
    # passes labels = input_ids over PAD-augmented pairs.
    model = tiny_pipo("qwen3")
    ids = torch.tensor([[5, 6, 7, PAD_ID, 9, 10, 11, PAD_ID, 13, 14, 15, 16]])
    labels = ids.clone()
    labels[:, :2] = IGNORE
    masked = labels.masked_fill(labels == PAD_ID, IGNORE)
    with torch.no_grad():
        raw, ref = model(ids, labels=labels), model(ids, labels=masked)
    for name in ("backbone_loss", "mtp_loss", "confidence_loss", "loss"):
        assert torch.equal(getattr(raw, name), getattr(ref, name)), name


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_confidence_head_shape_and_parameter_count(family):
    # Spec §1.6: RMSNorm(2H) -> Linear(2H, H, no bias) -> SiLU -> Linear(H, 1, no bias): 2H^2 + 3H parameters.
    model = tiny_pipo(family)
    h = model.config.hidden_size
    head = model.confidence_head
    assert head.norm.weight.shape == (2 * h,)
    assert head.fc1.weight.shape == (h, 2 * h) and head.fc1.bias is None
    assert head.fc2.weight.shape == (1, h) and head.fc2.bias is None
    assert sum(p.numel() for p in head.parameters()) == 2 * h * h + 3 * h
    # Input order [h ; m]: the backbone hidden comes first.
    hb, m = torch.randn(1, 3, h), torch.randn(1, 3, h)
    with torch.no_grad():
        want = head.fc2(F.silu(head.fc1(head.norm(torch.cat([hb, m], -1))))).squeeze(-1)
        torch.testing.assert_close(head(hb, m), want)
        assert not torch.allclose(head(m, hb), want)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_losses_are_token_weighted_row_means(side):
    model = tiny_pipo("qwen3")
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, PAD_ID, (n,), generator=g) for n in (12, 7, 9)]
    prompts = (3, 2, 5)  # odd and even boundaries
    width = 12
    ids = torch.zeros(3, width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    sums = {"backbone_loss": 0.0, "mtp_loss": 0.0, "confidence_loss": 0.0}
    counts = {"backbone_loss": 0, "mtp_loss": 0, "confidence_loss": 0}
    with torch.no_grad():
        for b, (r, p) in enumerate(zip(rows, prompts)):
            lab = r.clone()
            lab[:p] = IGNORE
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[b, sl], mask[b, sl], labels[b, sl] = r, 1, lab
            single = model(r.unsqueeze(0), labels=lab.unsqueeze(0))
            n1 = int((single.pair_labels[0, 2::2] != IGNORE).sum())
            n2 = int((single.pair_labels[0, 3::2] != IGNORE).sum())
            for name, n in (("backbone_loss", n1), ("mtp_loss", n2), ("confidence_loss", n2)):
                sums[name] += getattr(single, name).item() * n
                counts[name] += n
        batch = model(ids, attention_mask=mask, labels=labels)
    for name in sums:
        assert abs(getattr(batch, name).item() - sums[name] / counts[name]) < 1e-5, name


def test_shortest_inputs():
    model = tiny_pipo("llama").train()
    out = model(torch.tensor([[5]]), labels=torch.tensor([[5]]))  # one token: PAD appended, one latent
    assert out.pair_input_ids.tolist() == [[5, PAD_ID]] and out.logits.shape == (1, 1, VOCAB)
    assert out.mtp_logits is None and torch.isfinite(out.loss)
    out = model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[IGNORE, IGNORE, 7, 8]]))  # two latents
    assert out.mtp_logits.shape == (1, 1, VOCAB) and torch.isfinite(out.loss) and out.mtp_loss > 0
    out.loss.backward()


def test_compressor_gated_init_is_exact_mean():
    model = tiny_pipo("llama", compressor_type="gated")
    ids = random_ids(2, 10)
    emb = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model.embed_pairs(ids), 0.5 * emb[:, 0::2] + 0.5 * emb[:, 1::2], rtol=0, atol=1e-7)


@pytest.mark.parametrize(("scheme", "left", "right"), [("hidden_only", 0.0, 1.0), ("average", 0.5, 0.5)])
def test_mtp_fc_init_schemes(scheme, left, right):
    model = tiny_pipo("qwen3", mtp_fc_init=scheme)
    h = model.config.hidden_size
    eye = torch.eye(h)
    assert torch.equal(model.mtp.fc.weight, torch.cat([left * eye, right * eye], dim=1))
    assert model.mtp.fc.bias is None


def test_from_backbone_rejects_encoder_models():
    from transformers import BertConfig, BertLMHeadModel, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"decoder-only backbone.*encoder-decoder model_type 't5'"):
        PipoForCausalLM.from_backbone(t5, pad_token_id=5)
    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(ValueError, match=r"'bert' is a bidirectional encoder"):
        PipoForCausalLM.from_backbone(bert, pad_token_id=5)


def test_out_of_vocab_input_ids_are_named():
    model = tiny_pipo("llama")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[3, VOCAB + 5]]))


def test_num_mtp_layers_rejects_bool():
    from transformers_pipo import PipoConfig

    with pytest.raises(ValueError, match="num_mtp_layers"):
        PipoConfig(num_mtp_layers=True)


# ----------------------------------------------------------------------------------------------------------------------
# the PAD/EOS rule of from_backbone, as a table (end-to-end layouts: tests/test_real_layouts.py)
# ----------------------------------------------------------------------------------------------------------------------


class _Ids:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    ("config_eos", "gen_eos", "tok_eos", "tok_pad", "explicit", "pad", "add", "new_config_eos", "new_gen_eos"),
    [
        # Qwen3: pad <|endoftext|> is a secondary EOS of the generation config -> removed there
        (151645, [151645, 151643], 151645, 151643, None, 151643, False, 151645, [151645]),
        # Qwen3.5 release: PAD is the config's only EOS -> every list ends on <|im_end|>
        (248044, [248046, 248044], 248046, 248044, None, 248044, False, 248046, [248046]),
        # ... with no generation config of its own: EOS comes from the tokenizer
        (248044, None, 248046, 248044, None, 248044, False, 248046, 248046),
        # pad = the tokenizer's eos (GPT-2 / Llama recipes): never removed, dedicated PAD instead
        (2, 2, 2, 2, None, None, True, 2, 2),
        # no pad at all (Llama 3.2 Instruct): dedicated PAD, EOS untouched
        ([128001, 128008, 128009], [128001, 128008, 128009], 128009, None, None, None, True,
         [128001, 128008, 128009], [128001, 128008, 128009]),
        # an explicit PAD that is an EOS but not the only one: honoured, removed
        ([128001, 128008, 128009], [128001, 128008, 128009], 128009, None, 128008, 128008, False, [128001, 128009],
         [128001, 128009]),
        # a PAD outside every EOS list: nothing changes
        (2, [2], 2, 7, None, 7, False, 2, [2]),
    ],
)
def test_pad_eos_rule_table(config_eos, gen_eos, tok_eos, tok_pad, explicit, pad, add, new_config_eos, new_gen_eos):
    from transformers_pipo.conversion.backbone import resolve_pad_and_eos

    config = _Ids(eos_token_id=config_eos, pad_token_id=None)
    gen = None if gen_eos is None else _Ids(eos_token_id=gen_eos)
    tok = _Ids(eos_token_id=tok_eos, pad_token_id=tok_pad)
    layout = resolve_pad_and_eos(config, gen, tok, pad_token_id=explicit)
    assert (layout.pad_token_id, layout.add_pad_token) == (pad, add)
    assert layout.config_eos == new_config_eos and layout.generation_eos == new_gen_eos
    assert bool(layout.removed) == (pad is not None and new_gen_eos != gen_eos)


def test_pad_eos_rule_refuses_an_explicit_pad_that_is_the_only_eos():
    from transformers_pipo.conversion.backbone import resolve_pad_and_eos

    with pytest.raises(ValueError, match=r"pad_token_id=2 equals an EOS id and is the backbone's only one \(\[2\]\)"):
        resolve_pad_and_eos(_Ids(eos_token_id=2, pad_token_id=None), _Ids(eos_token_id=[2]), None, pad_token_id=2)


# ----------------------------------------------------------------------------------------------------------------------
# The loss under gradient accumulation (DESIGN §2.3): `num_items_in_batch` as in transformers' causal-LM losses
# ----------------------------------------------------------------------------------------------------------------------


def _ga_rows(n: int = 8, width: int = 16) -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths and prompt lengths (odd and even boundaries), right-padded to `width`: the labelled
    token counts differ between micro-batches, which is what a per-micro-batch mean gets wrong."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(n):
        length = int(torch.randint(6, width + 1, (1,), generator=g))
        prompt = 1 + i % 5 if i < n // 2 else length - 2
        ids = torch.full((width,), PAD_ID)
        ids[:length] = torch.randint(3, PAD_ID, (length,), generator=g)
        labels = torch.full((width,), IGNORE)
        labels[prompt:length] = ids[prompt:length]
        mask = torch.zeros(width, dtype=torch.long)
        mask[:length] = 1
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _one_trainer_step(tmp_path, rows, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    from transformers import Trainer, TrainingArguments

    model = tiny_pipo("qwen3", compressor_type="linear").train()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.5, optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        warmup_steps=0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_drop_last=False,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("accumulation", [2, 4])
def test_plain_trainer_gradient_accumulation_equals_one_big_batch(tmp_path, accumulation):
    """`transformers.Trainer` passes `num_items_in_batch`; the PIPO loss normalises by it, so k accumulation steps of
    batch 8/k give the parameters of one step over the 8 rows (fp32, SGD, no clipping)."""
    rows = _ga_rows(8)
    start = {k: v.detach().clone() for k, v in tiny_pipo("qwen3", compressor_type="linear").named_parameters()}
    big = _one_trainer_step(tmp_path / "big", rows, batch_size=8, accumulation=1)
    accumulated = _one_trainer_step(tmp_path / "ga", rows, batch_size=8 // accumulation, accumulation=accumulation)
    moved = 0.0
    for name, value in big.items():
        update_big, update_ga = value - start[name], accumulated[name] - start[name]
        moved = max(moved, float(update_big.abs().max()))
        torch.testing.assert_close(update_ga, update_big, rtol=1e-4, atol=1e-6, msg=name)
    assert moved > 1e-3  # the step really changed the parameters


def test_num_items_in_batch_makes_the_loss_additive_over_micro_batches():
    """Summing the losses of micro-batches normalised by the total count equals the loss of the whole batch."""
    model = tiny_pipo("qwen3")
    batch = {k: torch.stack([r[k] for r in _ga_rows(8)]) for k in ("input_ids", "attention_mask", "labels")}
    total = int((batch["labels"][:, 1:] != IGNORE).sum())  # what Trainer counts for a causal LM
    with torch.no_grad():
        whole = model(**batch, num_items_in_batch=total)
        parts = [model(**{k: v[s] for k, v in batch.items()}, num_items_in_batch=total)
                 for s in (slice(0, 3), slice(3, 8))]
    for name in ("loss", "backbone_loss", "mtp_loss", "confidence_loss"):
        torch.testing.assert_close(sum(getattr(p, name) for p in parts), getattr(whole, name), msg=name)
    # Without num_items_in_batch each term is its own mean (the reference objective): not additive.
    with torch.no_grad():
        means = [model(**{k: v[s] for k, v in batch.items()}).backbone_loss for s in (slice(0, 3), slice(3, 8))]
    assert abs(float(sum(means)) - float(whole.backbone_loss)) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# PipoModel / PipoForCausalLM split and the checkpoint layout (DESIGN §6.1)
# ----------------------------------------------------------------------------------------------------------------------


def test_pipo_model_returns_hidden_states_the_causal_lm_projects():
    model = tiny_pipo("llama")
    ids = random_ids(2, 11)
    with torch.no_grad():
        body = model.model(ids, output_hidden_states=True)
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
    assert type(model.model).__name__ == "PipoModel" and body.pair_input_ids.shape == (2, 12)
    torch.testing.assert_close(full.last_hidden_state, body.last_hidden_state)
    torch.testing.assert_close(full.logits, model.lm_head(body.last_hidden_state))
    torch.testing.assert_close(full.mtp_logits, model.lm_head(body.mtp_last_hidden_state))
    layers = model.config.backbone_config.num_hidden_layers
    assert isinstance(body.hidden_states, tuple) and len(body.hidden_states) == layers + 1
    assert model(ids).hidden_states is None  # only when asked for
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    torch.testing.assert_close(last.mtp_logits, full.mtp_logits[:, -1:])


def _old_layout_key(key: str) -> str:
    """The key a checkpoint saved before the PipoModel split used for `key`."""
    if key.startswith("model.backbone."):
        return "model." + key[len("model.backbone."):]
    for head in ("compressor", "mtp", "confidence_head"):
        if key.startswith(f"model.{head}."):
            return key[len("model."):]
    return key


@pytest.mark.parametrize("family", ["qwen3", "llama"])  # tied and untied LM head
def test_old_layout_checkpoint_loads_and_resaves_in_the_new_layout(tmp_path, family):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_pipo(family, seed=4)
    with torch.no_grad():
        for p in model.confidence_head.parameters():
            p.add_(0.1)  # away from the init, so a head that failed to load is visible
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    old = {_old_layout_key(k): v for k, v in weights.items()}
    assert "compressor.mlp.0.weight" in old and "model.embed_tokens.weight" in old
    save_file(old, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).confidence_logits, model(ids).confidence_logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "model.compressor.mlp.0.weight" in keys and "model.backbone.embed_tokens.weight" in keys
    assert not any(k.startswith(("compressor.", "mtp.", "confidence_head.", "model.layers.")) for k in keys)
