"""The hub_configs/ presets: consistent with their generator, loadable, and of the right size.

Sizes are checked three ways on the meta device (no memory, no weights): the backbone built by transformers has the
parameter count of an analytic formula of its published config and matches the published nominal size; the PIPO
model built from the preset has exactly that backbone count plus the analytic size of the PIPO heads (compressor,
MTP decoder layer, mtp.fc and its norms, confidence head `2H² + 3H`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import transformers_pipo  # noqa: F401  (registers the "pipo" model type)
from transformers_pipo import PipoConfig, PipoForCausalLM

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_presets", HUB_CONFIGS / "build_presets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
PRESETS = {p.name: p for p in builder.PRESETS}
REQUIRED = {
    "Qwen3-0.6B-PIPO", "Qwen3-1.7B-PIPO", "Qwen3-4B-PIPO", "Llama-3.2-1B-PIPO", "Llama-3.2-3B-PIPO",
    "Qwen3.5-4B-PIPO", "Qwen3.5-9B-PIPO",
}


# ------------------------------------------------------------------------------------------------------------------
# analytic parameter counts (from the config alone, never from a module)
# ------------------------------------------------------------------------------------------------------------------


def _head_dim(bb) -> int:
    return getattr(bb, "head_dim", None) or bb.hidden_size // bb.num_attention_heads


def full_attention_layer_params(bb) -> int:
    """One softmax-attention decoder layer: q/k/v/o (+ Qwen3.5's output gate in q_proj, + q/k norms), MLP, 2 norms."""
    h, hd = bb.hidden_size, _head_dim(bb)
    nh, nkv = bb.num_attention_heads, bb.num_key_value_heads
    gated = bb.model_type == "qwen3_5_text"
    q_out = nh * hd * (2 if gated else 1)
    n = h * q_out + 2 * h * nkv * hd + nh * hd * h
    if getattr(bb, "attention_bias", False):
        n += q_out + 2 * nkv * hd + h
    if bb.model_type in ("qwen3", "qwen3_5_text"):
        n += 2 * hd  # q_norm, k_norm over the head dim
    n += 3 * h * bb.intermediate_size
    if getattr(bb, "mlp_bias", False):
        n += 2 * bb.intermediate_size + h
    return n + 2 * h


def linear_attention_layer_params(bb) -> int:
    """One Qwen3.5 Gated-DeltaNet layer: in_proj_{qkv,z,b,a}, depthwise conv, dt_bias, A_log, gated norm, out_proj."""
    h = bb.hidden_size
    key_dim = bb.linear_num_key_heads * bb.linear_key_head_dim
    value_dim = bb.linear_num_value_heads * bb.linear_value_head_dim
    nv = bb.linear_num_value_heads
    conv_dim = 2 * key_dim + value_dim
    n = h * conv_dim + h * value_dim + 2 * h * nv
    n += conv_dim * bb.linear_conv_kernel_dim + 2 * nv + bb.linear_value_head_dim + value_dim * h
    return n + 3 * h * bb.intermediate_size + 2 * h


def backbone_params(bb) -> int:
    h, v = bb.hidden_size, bb.vocab_size
    types = getattr(bb, "layer_types", None) or ["full_attention"] * bb.num_hidden_layers
    layers = sum(
        linear_attention_layer_params(bb) if t == "linear_attention" else full_attention_layer_params(bb) for t in types
    )
    lm_head = 0 if bb.tie_word_embeddings else v * h
    return v * h + layers + h + lm_head


def pipo_head_params(config: PipoConfig) -> int:
    bb = config.backbone_config
    h = bb.hidden_size
    hc = config.confidence_hidden_size or h
    compressor = {"linear": 2 * h * h + h, "mlp": (4 * h * h + 2 * h) + (2 * h * h + h)}[config.compressor_type]
    mtp = 2 * h * h + 2 * h + full_attention_layer_params(bb) + h  # fc, pre-fc norms, layer, final norm
    confidence = 2 * h + 2 * h * hc + hc  # = 2H² + 3H when Hc = H
    return compressor + mtp + confidence


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are counted once


# ------------------------------------------------------------------------------------------------------------------


def test_every_required_preset_is_defined_and_committed():
    assert REQUIRED <= set(PRESETS)
    for name in PRESETS:
        assert (HUB_CONFIGS / name / "config.json").is_file(), name
        assert (HUB_CONFIGS / name / "generation_config.json").is_file(), name


def test_committed_presets_match_the_generator():
    assert builder.check(HUB_CONFIGS) == [], "run `python hub_configs/build_presets.py` to refresh the presets"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_files(name):
    preset = PRESETS[name]
    raw = json.loads((HUB_CONFIGS / name / "config.json").read_text())
    assert raw["model_type"] == "pipo"
    assert raw["architectures"] == ["PipoForCausalLM"]
    assert raw["auto_map"] == {
        "AutoConfig": "configuration_pipo.PipoConfig",
        "AutoModelForCausalLM": "modeling_pipo.PipoForCausalLM",
    }
    # the full backbone config is inside, with its published shape fields
    bb_raw = raw["backbone_config"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rope_parameters", "tie_word_embeddings"):
        assert key in bb_raw, key
    assert bb_raw["_name_or_path"] == preset.base_model

    config = AutoConfig.from_pretrained(HUB_CONFIGS / name)
    assert config.model_type == "pipo"
    assert config.backbone_config.model_type == preset.family
    assert config.compressor_type == "mlp"
    assert config.tie_word_embeddings == config.backbone_config.tie_word_embeddings

    gen = GenerationConfig.from_pretrained(HUB_CONFIGS / name)
    assert gen.pad_token_id == config.pad_token_id == preset.pad_token_id
    assert gen.pipo_confidence_threshold == 0.95
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos and config.pad_token_id not in eos  # PAD must never stop generation
    assert 0 <= config.pad_token_id < config.vocab_size


def test_published_shapes_of_the_paper_backbones():
    q4 = AutoConfig.from_pretrained(HUB_CONFIGS / "Qwen3.5-4B-PIPO")
    q9 = AutoConfig.from_pretrained(HUB_CONFIGS / "Qwen3.5-9B-PIPO")
    for cfg in (q4, q9):
        bb = cfg.backbone_config
        assert bb.model_type == "qwen3_5_text" and bb.vocab_size == 248320 and cfg.pad_token_id == 248044
        assert bb.layer_types.count("full_attention") == 8 and bb.layer_types[3] == "full_attention"
        assert cfg.mtp_init == "native" and cfg.norm_style == "one_plus_w"
    assert q4.tie_word_embeddings and not q9.tie_word_embeddings
    small = {n: AutoConfig.from_pretrained(HUB_CONFIGS / n).backbone_config for n in
             ("Qwen3-0.6B-PIPO", "Qwen3-1.7B-PIPO", "Qwen3-4B-PIPO", "Llama-3.2-1B-PIPO", "Llama-3.2-3B-PIPO")}
    expected = {  # (tied, layers, hidden)
        "Qwen3-0.6B-PIPO": (True, 28, 1024), "Qwen3-1.7B-PIPO": (True, 28, 2048), "Qwen3-4B-PIPO": (True, 36, 2560),
        "Llama-3.2-1B-PIPO": (True, 16, 2048), "Llama-3.2-3B-PIPO": (True, 28, 3072),
    }
    for name, (tied, layers, hidden) in expected.items():
        bb = small[name]
        assert (bb.tie_word_embeddings, bb.num_hidden_layers, bb.hidden_size) == (tied, layers, hidden), name
    assert small["Llama-3.2-1B-PIPO"].vocab_size == 128256


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_parameter_counts(name):
    preset = PRESETS[name]
    config = AutoConfig.from_pretrained(HUB_CONFIGS / name)
    with torch.device("meta"):
        model = PipoForCausalLM(config)
        backbone = AutoModelForCausalLM.from_config(config.backbone_config)
    assert next(model.parameters()).device.type == "meta"

    n_backbone = n_params(backbone)
    assert n_backbone == backbone_params(config.backbone_config)
    assert n_backbone == pytest.approx(preset.nominal_params, rel=0.02)

    assert n_params(model) == n_backbone + pipo_head_params(config)
    h = config.hidden_size
    assert n_params(model.confidence_head) == 2 * h * h + 3 * h
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        assert model.lm_head.weight is not model.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------------------------------
# loadable as the README says: remote code shipped in every folder
# ------------------------------------------------------------------------------------------------------------------


def test_every_preset_ships_the_packages_current_remote_code():
    """The code files are links to the package's modules (never stale copies committed twice)."""
    package = HUB_CONFIGS.parent / "transformers_pipo"
    for name in PRESETS:
        folder = HUB_CONFIGS / name
        shipped = sorted(p.name for p in folder.glob("*.py"))
        assert shipped == ["configuration_pipo.py", "generation_pipo.py", "modelcard_pipo.py", "modeling_pipo.py"]
        for file in shipped:
            assert (folder / file).is_symlink(), f"{name}/{file} is a copy, not a link"
            assert (folder / file).resolve() == (package / file).resolve(), f"{name}/{file}"
            assert (folder / file).read_text() == (package / file).read_text(), f"{name}/{file}"


def test_check_names_stale_missing_and_foreign_code(tmp_path):
    builder.build(tmp_path)
    assert builder.check(tmp_path) == []
    target = tmp_path / "Qwen3-0.6B-PIPO" / "modeling_pipo.py"
    text = target.read_text()
    target.unlink()
    target.write_text(text + "\n# edited by hand\n")  # a hand-edited copy instead of the link
    (tmp_path / "Llama-3.2-1B-PIPO" / "generation_pipo.py").unlink()
    (tmp_path / "Qwen3.5-4B-PIPO" / "helpers.py").write_text("x = 1\n")
    stale = builder.check(tmp_path)
    assert any(s.startswith(str(target)) for s in stale)
    assert any(s.startswith(str(tmp_path / "Llama-3.2-1B-PIPO" / "generation_pipo.py")) for s in stale)
    assert any("helpers.py (not written by build_presets.py)" in s for s in stale)
    assert len(stale) == 3


def test_presets_load_with_remote_code_without_the_package_and_with_it_on_meta():
    """`AutoConfig.from_pretrained(folder, trust_remote_code=True)` in a process where transformers_pipo cannot be
    imported, then with it imported; `AutoModelForCausalLM.from_config` on the meta device both ways, with the
    analytic parameter count."""
    problems, report = builder.check_loads(HUB_CONFIGS)
    assert problems == []
    for name in PRESETS:
        config = AutoConfig.from_pretrained(HUB_CONFIGS / name)
        expected = backbone_params(config.backbone_config) + pipo_head_params(config)
        for mode in ("remote", "package"):
            entry = report[f"{mode}:{HUB_CONFIGS / name}"]
            assert entry["class"] == "PipoForCausalLM" and entry["device"] == "meta"
            assert entry["params"] == expected, (name, mode)
        assert report[f"remote:{HUB_CONFIGS / name}"]["module"].startswith("transformers_modules.")


# ------------------------------------------------------------------------------------------------------------------
# Qwen3.5: fields as published
# ------------------------------------------------------------------------------------------------------------------

QWEN35_PUBLISHED = {"attn_output_gate": True, "full_attention_interval": 4, "mtp_num_hidden_layers": 1,
                    "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32"}


@pytest.mark.parametrize("name", ["Qwen3.5-4B-PIPO", "Qwen3.5-9B-PIPO"])
def test_qwen35_presets_carry_the_published_fields(name):
    raw = json.loads((HUB_CONFIGS / name / "config.json").read_text())
    bb_raw = raw["backbone_config"]
    assert bb_raw.get("bos_token_id") is None  # the published config has none; the tokenizer's BOS is null
    for key, value in QWEN35_PUBLISHED.items():
        assert bb_raw[key] == value, key
    # a stock config rebuilt from the nested dict keeps them (engines read mtp_num_hidden_layers, default 0)
    stock = AutoConfig.for_model(**{k: v for k, v in bb_raw.items() if k != "_name_or_path"})
    for key, value in QWEN35_PUBLISHED.items():
        assert getattr(stock, key) == value, key
    loaded = AutoConfig.from_pretrained(HUB_CONFIGS / name).backbone_config
    assert loaded.mtp_num_hidden_layers == 1 and loaded.attn_output_gate is True

    gen_raw = json.loads((HUB_CONFIGS / name / "generation_config.json").read_text())
    assert "bos_token_id" not in gen_raw
    # the authors' evaluation sampling; presence penalty 1.5 has no transformers field (README says why)
    assert (gen_raw["do_sample"], gen_raw["temperature"], gen_raw["top_p"], gen_raw["top_k"]) == (True, 1.0, 0.95, 20)
    assert "presence_penalty" not in gen_raw
    assert "presence_penalty" not in GenerationConfig().to_dict()  # if transformers grows one, use it
