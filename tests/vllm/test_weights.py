"""The vLLM plugin's checkpoint-key mapping (no vLLM needed) and the plugin staying out of `import transformers_pipo`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transformers_pipo.serving.vllm.weights import group_pipo_weights, split_pipo_weight_name

FLAT_TO_NESTED = {
    "model.embed_tokens.weight": "model.backbone.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight": "model.backbone.layers.0.self_attn.q_proj.weight",
    "model.norm.weight": "model.backbone.norm.weight",
    "compressor.mlp.0.weight": "model.compressor.mlp.0.weight",
    "mtp.fc.weight": "model.mtp.fc.weight",
    "mtp.layers.0.mlp.up_proj.weight": "model.mtp.layers.0.mlp.up_proj.weight",
    "confidence_head.fc2.weight": "model.confidence_head.fc2.weight",
    "lm_head.weight": "lm_head.weight",
}
EXPECTED = {
    "model.embed_tokens.weight": ("backbone", "embed_tokens.weight"),
    "model.layers.0.self_attn.q_proj.weight": ("backbone", "layers.0.self_attn.q_proj.weight"),
    "model.norm.weight": ("backbone", "norm.weight"),
    "compressor.mlp.0.weight": ("compressor", "mlp.0.weight"),
    "mtp.fc.weight": ("mtp", "fc.weight"),
    "mtp.layers.0.mlp.up_proj.weight": ("mtp", "layers.0.mlp.up_proj.weight"),
    "confidence_head.fc2.weight": ("confidence_head", "fc2.weight"),
    "lm_head.weight": ("lm_head", "weight"),
}


@pytest.mark.parametrize("flat", sorted(FLAT_TO_NESTED))
def test_both_layouts_map_to_the_same_component_and_key(flat):
    assert split_pipo_weight_name(flat) == EXPECTED[flat]
    assert split_pipo_weight_name(FLAT_TO_NESTED[flat]) == EXPECTED[flat]


def test_real_saved_checkpoint_keys_are_all_mapped(tmp_path):
    """Every key `save_pretrained` writes lands in a component, and every PIPO component is present."""
    from safetensors import safe_open

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from checkpoints import build_pipo, save

    for layout in ("flat", "nested"):
        folder = save(build_pipo("llama"), tmp_path / layout, layout=layout)
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            keys = list(f.keys())
        groups = group_pipo_weights((k, None) for k in keys)
        assert all(groups[c] for c in ("backbone", "compressor", "mtp", "confidence_head", "lm_head")), layout
        assert sum(len(v) for v in groups.values()) == len(keys)
        assert ("fc.weight", None) in groups["mtp"] and ("embed_tokens.weight", None) in groups["backbone"]


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="visual.patch"):
        split_pipo_weight_name("visual.patch.weight")


def test_plugin_is_not_imported_with_the_package():
    code = ("import sys, transformers_pipo; transformers_pipo.PipoConfig; "
            "print(any(m.startswith(('vllm', 'transformers_pipo.serving')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
