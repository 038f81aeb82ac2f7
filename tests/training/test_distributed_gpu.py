"""The GPU counterpart of test_distributed.py: SFT and OPD under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on 2 GPUs,
launched with `accelerate launch` and the shipped configs (fp32, so the steps compare with a 1-GPU run).

Marked `gpu`: skipped without 2 CUDA devices (and the DeepSpeed cases without `deepspeed` installed). Run with
`python -m pytest -q tests/training/test_distributed_gpu.py` on a 2-GPU machine.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from test_distributed import (  # noqa: F401  (the workspace fixture is shared)
    COMPARED,
    OPD_COMPARED,
    WORKER,
    _assert_checkpoint_matches,
    _assert_same_steps,
    _check,
    _free_port,
    _result,
    _run,
    workspace,
)
from transformers_pipo.training.launch import accelerate_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

EXPECTED = {  # accelerate's distributed type, how the student and the teacher are held
    "ddp": ("MULTI_GPU", "ddp", "plain"),
    "fsdp": ("FSDP", "fsdp2", "plain"),
    "deepspeed-zero2": ("DEEPSPEED", "DeepSpeedEngine", "DeepSpeedEngine"),
    "deepspeed-zero3": ("DEEPSPEED", "DeepSpeedEngine", "DeepSpeedEngine"),
}


def _gpu_run(workspace, kind: str, processes: int, batch: int):
    out = workspace / f"gpu-{kind}-{processes}"
    config = workspace / f"gpu-{kind}-{processes}.yaml"
    config.write_text(accelerate_config(kind, processes, mixed_precision="no"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), str(WORKER), "--workspace", str(workspace), "--out", str(out),
           "--batch", str(batch), "--use_cpu", "false"]
    _check(_run(cmd, timeout=900))
    return out


@pytest.fixture(scope="module")
def single_gpu(workspace):
    return _gpu_run(workspace, "ddp", 1, 4)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_two_gpus_match_one_gpu(workspace, single_gpu, kind):
    if kind.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    out = _gpu_run(workspace, kind, 2, 2)
    for stage in ("sft", "opd"):
        result = _result(out, stage)
        distributed_type, student, teacher = EXPECTED[kind]
        assert result["setup"]["num_processes"] == 2
        assert result["setup"]["distributed_type"] == distributed_type and result["setup"]["student"] == student
        if stage == "opd":
            assert result["setup"]["teacher"] == teacher, result["setup"]
        _assert_same_steps(_result(single_gpu, stage), result, COMPARED + (OPD_COMPARED if stage == "opd" else ()))
        _assert_checkpoint_matches(single_gpu / stage / "final", out / stage / "final")
