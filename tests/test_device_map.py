"""Multi-device inference on PIPO checkpoints: `from_pretrained(..., device_map="auto", max_memory=...)` (the PIPO
heads are never split across devices, part of the backbone is offloaded to disk, forward and PIPO generation equal
the undispatched model's) and `tp_plan="auto"` tensor parallelism on 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import infer_auto_device_map
from transformers import AutoModelForCausalLM

from conftest import PAD_ID, tiny_backbone_config
from transformers_pipo import PipoForCausalLM

HEADS = ("model.compressor", "model.mtp", "model.confidence_head")


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
            assert not name.startswith("model.mtp.layers.0."), (fraction, name)
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


TP_WORKER = """
import json, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
import transformers_pipo  # noqa: F401
from transformers import AutoModelForCausalLM

folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
reference = AutoModelForCausalLM.from_pretrained(folder).eval()
rank = dist.get_rank()
sharded = sorted(n for n, p in model.named_parameters() if "DTensor" in (type(p).__name__, type(p.data).__name__))
ids = torch.tensor([[1, 5, 10, 11, 12, 13, 14, 15, 16, 10], [1, 5, 20, 21, 22, 23, 24, 25, 26, 27]])
with torch.no_grad():
    a, b = reference(input_ids=ids), model(input_ids=ids)
diff = {k: (getattr(a, k) - getattr(b, k)).abs().max().item() for k in ("logits", "mtp_logits", "confidence_logits")}
prompt = torch.tensor([[1, 5, 10, 11, 12], [1, 5, 20, 21, 22]])
kw = dict(max_new_tokens=12, do_sample=False, pipo_confidence_threshold=0.5, return_dict_in_generate=True)
ga, gb = reference.generate(prompt, **kw), model.generate(prompt, **kw)
result = {"sharded": sharded, "diff": diff, "plan": dict(model.tp_plan), "world": dist.get_world_size(),
          "same_generation": ga.sequences.tolist() == gb.sequences.tolist()
          and ga.pipo_slot_ids.tolist() == gb.pipo_slot_ids.tolist()}
with open(f"{out}.{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_tensor_parallel_tp_plan_auto_on_two_gloo_processes(tmp_path):
    """`from_pretrained(..., tp_plan="auto")` on 2 CPU processes: backbone layers, the MTP layer and the LM head are
    sharded, and forward outputs and PIPO generation equal the unsharded model's on every rank."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", layers=2))
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID)
    with torch.no_grad():  # peaked, input-dependent distributions, so greedy decoding is a sharp comparison
        model.get_input_embeddings().weight.mul_(25.0)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "worker.py").write_text(TP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(tmp_path / "worker.py"), str(tmp_path / "ckpt"), str(tmp_path / "result")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]

    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        assert result["world"] == 2
        assert result["plan"]["lm_head"] == "colwise_gather_output"
        # (the LM head is tied to the vocabulary-sharded embedding, so it is listed once, as the embedding)
        expected = {"model.backbone.embed_tokens.weight", "model.backbone.layers.1.mlp.down_proj.weight",
                    "model.mtp.layers.0.self_attn.q_proj.weight", "model.mtp.layers.0.mlp.down_proj.weight"}
        assert expected <= set(result["sharded"]), result["sharded"]
        assert all(value < 1e-5 for value in result["diff"].values()), result["diff"]
        assert result["same_generation"]
