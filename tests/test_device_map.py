"""`from_pretrained(..., device_map="auto", max_memory=...)` on PIPO checkpoints: the PIPO heads are never split
across devices, part of the backbone is offloaded to disk, and forward and PIPO generation equal the undispatched
model's."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import infer_auto_device_map
from transformers import AutoModelForCausalLM

from conftest import PAD_ID, tiny_backbone_config
from transformers_pipo import PipoForCausalLM

HEADS = ("compressor", "mtp", "confidence_head")


def _pipo(family: str, layers: int = 4) -> PipoForCausalLM:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config(family, layers=layers))
    return PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID).eval()


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("compressor_type", ["linear", "mlp", "gated"])
def test_auto_device_map_never_splits_a_pipo_head(compressor_type):
    """Sweep the memory budget of the first device across the whole model: every boundary falls between whole
    heads and whole decoder layers, never inside the compressor, the MTP head or the confidence head."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", layers=2))
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID, compressor_type=compressor_type)
    assert {"PipoMTPHead", "PipoConfidenceHead", "Qwen3DecoderLayer"} <= set(model._no_split_modules)
    total = _bytes(model)
    seen_split_points = set()
    for fraction in [i / 40 for i in range(1, 40)]:
        device_map = infer_auto_device_map(
            model, max_memory={0: int(total * fraction), "cpu": 4 * total},
            no_split_module_classes=list(model._no_split_modules),
        )
        for name in device_map:
            assert not any(name.startswith(head + ".") for head in HEADS), (fraction, name, device_map)
            assert not name.startswith("mtp.layers.0."), (fraction, name)
        seen_split_points.add(tuple(sorted(device_map.items())))
    assert len(seen_split_points) > 3  # the sweep really moved the boundary around


@pytest.mark.parametrize("family", ["qwen3", "llama", "gpt2"])
def test_device_map_auto_with_disk_offload_matches_undispatched(tmp_path, family):
    model = _pipo(family)
    model.save_pretrained(tmp_path / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    # 60% of the weights: the embeddings/LM head and some decoder layers stay in memory (accelerate also reserves
    # room for the largest no-split unit), the other layers and the PIPO heads go to disk.
    budget = int(0.6 * _bytes(reference))
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "offload")
    ).eval()
    device_map = dispatched.hf_device_map
    placed = {name: device for name, device in device_map.items()}
    layer_devices = {d for n, d in placed.items() if ".layers." in n or ".h." in n or n.endswith((".layers", ".h"))}
    assert "disk" in set(placed.values()), placed
    assert "cpu" in layer_devices and "disk" in layer_devices, placed  # the backbone itself is split cpu / disk
    for name in placed:
        assert not any(name.startswith(head + ".") for head in HEADS), placed

    ids = torch.tensor([[1, 5, 10, 11, 12, 13, 14, 15, 16, 10], [1, 5, 20, 21, 22, 23, 24, 25, 26, 27]])
    with torch.no_grad():
        ref_out = reference(input_ids=ids, labels=ids)
        out = dispatched(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.mtp_logits, ref_out.mtp_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.confidence_logits, ref_out.confidence_logits, rtol=0, atol=1e-6)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), abs=1e-6)

    prompt = torch.tensor([[1, 5, 10, 11, 12], [1, 5, 20, 21, 22]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pipo_confidence_threshold=0.5, return_dict_in_generate=True)
    ref_gen, gen = reference.generate(prompt, **kwargs), dispatched.generate(prompt, **kwargs)
    assert gen.sequences.tolist() == ref_gen.sequences.tolist()
    assert gen.pipo_slot_ids.tolist() == ref_gen.pipo_slot_ids.tolist()
    assert gen.committed_drafts.tolist() == ref_gen.committed_drafts.tolist()
