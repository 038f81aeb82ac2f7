"""SFT and OPD on 2 CPU processes (gloo) under DDP and FSDP2 full shard, launched with `accelerate launch` and the
configs `transformers_pipo.training.launch.accelerate_config` writes, compared step by step with a 1-process run of
the same global batch; the gathered checkpoints load as `PipoForCausalLM` and generate like the 1-process model.

How each mode runs here (see `distributed_worker.py`):
- DDP: `accelerate_config("cpu", 2)` (torchrun-launched CPU ranks, `use_cpu=True` in the trainer).
- FSDP: `accelerate_config("fsdp", 2, use_cpu=True)`, OPD with `shard_teacher=True` (the teacher sharded too). accelerate only applies FSDP on GPU-like devices, so the
  worker lifts that one gate (`--cpu_fsdp`, test-only) and accelerate's own FSDP2 preparation runs on gloo; without
  it the PIPO trainers refuse the launch instead of silently running DDP (tested too).
- Rollouts are greedy, exactly `max_new_tokens` long (min == max) with τ < 0, so every rank takes the same number
  of decode steps: these tests do not rely on uneven-length rollout synchronisation.
Tolerance: per-step losses and gradient norms within 1e-4 relative of the 1-process run (measured: ~1e-7).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import BOS_ID, tiny_backbone_config
from pipo_task import pad_tokenizer, pattern_pipo, pattern_sequence
from transformers_pipo.training.launch import accelerate_config

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("loss", "grad_norm", "backbone_loss", "mtp_loss", "confidence_loss")
OPD_COMPARED = ("divergence_backbone", "divergence_mtp", "alpha_mean", "rollout_length")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    return proc


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny PIPO student, a tiny teacher, and 16 SFT rows / prompts of one length (so per-rank means of the
    losses equal the global mean and DDP/FSDP gradients equal the 1-process gradient)."""
    root = tmp_path_factory.mktemp("distributed")
    tok = pad_tokenizer()
    pattern_pipo(seed=0).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")).save_pretrained(root / "teacher")
    rng = random.Random(3)
    with open(root / "sft.jsonl", "w") as sft, open(root / "prompts.jsonl", "w") as prompts:
        for _ in range(16):
            seq = pattern_sequence(rng, 16)
            prompt = [BOS_ID, 5] + seq[:2]
            sft.write(json.dumps({"prompt_ids": prompt, "response_ids": seq[2:]}) + "\n")
            prompts.write(json.dumps({"prompt_ids": prompt}) + "\n")
    (root / "ddp.yaml").write_text(accelerate_config("cpu", 2))
    (root / "fsdp.yaml").write_text(accelerate_config("fsdp", 2, use_cpu=True))
    return root


def _free_port() -> int:
    """A free TCP port for the rendezvous (other suites on the machine may hold torchrun's default 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_args(workspace: Path, out: Path, batch: int) -> list[str]:
    return [str(WORKER), "--workspace", str(workspace), "--out", str(out), "--batch", str(batch)]


def _launch(workspace: Path, config: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(workspace / config),
           "--main_process_port", str(_free_port()), *_worker_args(workspace, out, 2), *extra]
    return _run(cmd)


@pytest.fixture(scope="module")
def single(workspace):
    out = workspace / "single"
    _check(_run([sys.executable, *_worker_args(workspace, out, 4)]))
    return out


@pytest.fixture(scope="module")
def ddp(workspace):
    out = workspace / "ddp"
    _check(_launch(workspace, "ddp.yaml", out))
    return out


@pytest.fixture(scope="module")
def fsdp(workspace):
    out = workspace / "fsdp"
    _check(_launch(workspace, "fsdp.yaml", out, "--cpu_fsdp", "--shard_teacher"))
    return out


def _result(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "result.json").read_text())


def _assert_same_steps(reference: dict, other: dict, keys) -> None:
    assert len(other["steps"]) == len(reference["steps"]) == 3
    for step, (a, b) in enumerate(zip(reference["steps"], other["steps"]), start=1):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (step, key, a[key], b[key])


def _assert_checkpoint_matches(reference_dir: Path, other_dir: Path) -> None:
    """The gathered checkpoint is a full PIPO folder (remote code, PIPO auto_map) whose weights and greedy PIPO
    generation match the 1-process model's."""
    config = json.loads((other_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pipo.PipoForCausalLM"
    assert (other_dir / "modeling_pipo.py").exists() and (other_dir / "generation_pipo.py").exists()
    ref = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    assert type(model).__name__ == "PipoForCausalLM"
    ref_state, state = ref.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    worst = max((ref_state[k] - state[k]).abs().max().item() for k in ref_state)
    assert worst < 1e-4, worst
    prompt = torch.tensor([[BOS_ID, 5, 10, 11, 12]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pipo_confidence_threshold=0.5)
    assert model.generate(prompt, **kwargs).tolist() == ref.generate(prompt, **kwargs).tolist()


@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_ddp_two_cpu_processes_match_one_process(single, ddp, stage):
    result = _result(ddp, stage)
    assert result["setup"]["num_processes"] == 2 and result["setup"]["backend"] == "gloo"
    assert result["setup"]["distributed_type"] == "MULTI_CPU" and result["setup"]["student"] == "ddp"
    if stage == "opd":
        assert result["setup"]["teacher"] == "plain"  # replicated on every rank
        assert result["setup"]["teacher_local_fraction"] == 1.0
    _assert_same_steps(_result(single, stage), result, COMPARED + (OPD_COMPARED if stage == "opd" else ()))
    _assert_checkpoint_matches(single / stage / "final", ddp / stage / "final")


@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_fsdp2_full_shard_two_cpu_processes_match_one_process(single, fsdp, stage):
    result = _result(fsdp, stage)
    assert result["setup"]["num_processes"] == 2 and result["setup"]["backend"] == "gloo"
    assert result["setup"]["distributed_type"] == "FSDP" and result["setup"]["student"] == "fsdp2"
    assert result["setup"]["student_local_fraction"] < 0.55  # each rank holds about half of the student
    if stage == "opd":
        # shard_teacher=True: the teacher is sharded like the student and stays sharded between steps
        assert result["setup"]["teacher"] == "fsdp2", result["setup"]
        assert result["setup"]["teacher_local_fraction"] < 0.55, result["setup"]
    _assert_same_steps(_result(single, stage), result, COMPARED + (OPD_COMPARED if stage == "opd" else ()))
    _assert_checkpoint_matches(single / stage / "final", fsdp / stage / "final")


def test_fsdp_config_on_cpu_is_refused_not_silently_ddp(workspace):
    """Without the test-only gate lift, accelerate would run the FSDP config on CPU as DDP; the trainer refuses."""
    proc = _launch(workspace, "fsdp.yaml", workspace / "refused", "--stages", "sft", "--steps", "1")
    assert proc.returncode != 0
    assert "accelerate applies FSDP only on GPU-like devices" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["cpu", "ddp", "fsdp"])
def test_multi_process_cpu_configs_parse(tmp_path, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / "c.yaml"
    path.write_text(accelerate_config(kind, 2, use_cpu=True))
    config = load_config_from_file(str(path))
    assert config.num_processes == 2 and config.use_cpu is True and config.mixed_precision == "no"
    # accelerate launches local CPU ranks through torchrun only for GPU-type distributed types
    assert str(config.distributed_type).split(".")[-1] == ("FSDP" if kind == "fsdp" else "MULTI_GPU")


def test_deepspeed_has_no_cpu_config():
    with pytest.raises(ValueError, match="accelerate launches DeepSpeed only on GPUs"):
        accelerate_config("deepspeed-zero2", 2, use_cpu=True)


def test_check_distributed_launch_refuses_silent_fallbacks(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from transformers_pipo.training.launch import check_distributed_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(RuntimeError, match="pass use_cpu=True"):
        check_distributed_launch(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    check_distributed_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="FSDP only on GPU-like devices"):
        check_distributed_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    check_distributed_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP))


def test_shard_teacher_needs_an_fsdp2_launch(workspace):
    from transformers import AutoTokenizer

    from transformers_pipo import PipoOPDConfig, PipoOPDTrainer

    args = PipoOPDConfig(output_dir=str(workspace / "x"), shard_teacher=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="shard_teacher=True needs an FSDP2 launch"):
        PipoOPDTrainer(model=str(workspace / "student"), teacher_model=str(workspace / "teacher"), args=args,
                       train_dataset=[{"prompt_ids": [1, 5, 10, 11]}],
                       processing_class=AutoTokenizer.from_pretrained(workspace / "student"))
