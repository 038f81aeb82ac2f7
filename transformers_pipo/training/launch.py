"""Scale-out with `accelerate launch`: ready-made accelerate configs and what each trainer supports.

Both trainers are plain `transformers.Trainer` subclasses, so they run unchanged under `accelerate launch`; the
device/parallel setup comes only from the accelerate config (or flags), never from the training code:

    pipo train accelerate-config ddp > ddp.yaml            # or: cpu, fsdp, deepspeed-zero2, deepspeed-zero3
    accelerate launch --config_file ddp.yaml -m transformers_pipo.cli train sft --model ckpt ...
    accelerate launch --config_file ddp.yaml $(which pipo) train opd --model ckpt --teacher teacher ...

Several CPU processes (gloo): `accelerate_config("cpu", num_processes=2)` and `--use_cpu true` for the trainer.

What was run where (tests/training/test_distributed.py, tests/test_device_map.py; "2 CPU" = 2 processes, gloo,
per-step losses within 1e-4 of a 1-process run with the same global batch, gathered checkpoints reload and generate
like the 1-process model):

| mode | PipoSFTTrainer | PipoOPDTrainer | inference |
|---|---|---|---|
| `cpu` (1 process) | tested | tested | tested |
| `ddp` | tested, 2 CPU | tested, 2 CPU; teacher replicated | - |
| `fsdp` (FSDP2 full shard) | tested, 2 CPU (see below); `FULL_STATE_DICT` checkpoints gathered on save | tested, 2 CPU, rollouts of equal length on every rank; teacher sharded with `shard_teacher=True` (tested), else a full replica per rank | - |
| `deepspeed-zero2` (the reference setup) | GPU test only (tests/training/test_distributed_gpu.py) | GPU test only; teacher replicated (trl's `prepare_deepspeed` drops it to stage 0) | - |
| `deepspeed-zero3` | GPU test only | GPU test only; rollouts on gathered weights (trl's `unwrap_model_for_generation`), teacher partitioned | - |
| `from_pretrained(device_map="auto", max_memory=...)` | - | - | tested on CPU + disk offload: PIPO heads never split, output equals the undispatched model's |
| `from_pretrained(tp_plan="auto")` | not run | not run | tested, 2 CPU: backbone, MTP layer and LM head sharded, output equals the unsharded model's |

DeepSpeed cannot run on CPU here: its CPU accelerator does initialise over gloo (after JIT-compiling a shared-memory
op), but accelerate counts a CPU DeepSpeed launch as one process (each rank would see the whole dataset), and the
trainers refuse that launch. accelerate turns a run into FSDP only on GPU-like devices: on CPU an `fsdp` config would silently train full replicas
(DDP). `check_distributed_launch` (called by both trainers) refuses that, and a launch whose processes did not form a
process group; the CPU FSDP test lifts exactly that device gate and runs accelerate's own FSDP2 preparation.

Memory at long context is bounded by the chunked LM-head losses: SFT cross-entropies (`loss_chunk_size` tokens per
chunk, checkpointed) and the OPD divergences (student chunk checkpointed, teacher chunk without gradients), so no
`[T, V]` logits tensor is ever materialised. Add `--activation_checkpointing` for the backbone activations.
"""

from __future__ import annotations

import os

def _deepspeed_config(stage: int) -> str:
    """The DeepSpeed ZeRO-`stage` template (stage 3 also initialises sharded and saves a gathered 16-bit model)."""
    zero3 = "  zero3_init_flag: true\n  zero3_save_16bit_model: true\n" if stage == 3 else "  zero3_init_flag: false\n"
    return f"""\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 8
machine_rank: 0
mixed_precision: bf16
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: none
  offload_param_device: none
{zero3}"""


ACCELERATE_CONFIGS: dict[str, str] = {
    "cpu": """\
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
""",
    "ddp": """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 8
machine_rank: 0
gpu_ids: all
mixed_precision: bf16
""",
    "fsdp": """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 8
machine_rank: 0
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
  fsdp_activation_checkpointing: false
""",
    "deepspeed-zero2": _deepspeed_config(2),
    "deepspeed-zero3": _deepspeed_config(3),
}


def accelerate_config(
    kind: str,
    num_processes: int | None = None,
    *,
    use_cpu: bool = False,
    mixed_precision: str | None = None,
) -> str:
    """The YAML text of an accelerate config (`kind` in `ACCELERATE_CONFIGS`).

    Args:
        kind: `cpu`, `ddp`, `fsdp`, `deepspeed-zero2` or `deepspeed-zero3`.
        num_processes: processes to launch (default: the config's own, 8 for the GPU configs, 1 for `cpu`).
        use_cpu: run the `ddp`/`fsdp` layout on CPU processes (gloo). `cpu` with `num_processes > 1` implies it.
        mixed_precision: override the config's `mixed_precision` (`no`, `bf16`, `fp16`); CPU configs default to `no`.

    `accelerate launch` starts several local processes (through torchrun) only for GPU-type configs, so a
    multi-process CPU config keeps `distributed_type: MULTI_GPU` and adds `use_cpu: true`; the trainers then need
    `use_cpu=True` (`--use_cpu true`) to join a gloo process group. accelerate itself applies FSDP only on GPU-like
    devices: an `fsdp` config on CPU is refused by the PIPO trainers (see `check_distributed_launch`) instead of
    silently running as DDP.
    """
    if kind not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {kind!r}; choose one of {sorted(ACCELERATE_CONFIGS)}.")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if mixed_precision is not None and mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}.")
    if use_cpu and kind.startswith("deepspeed"):
        raise ValueError(f"{kind!r} has no CPU form here: accelerate launches DeepSpeed only on GPUs.")
    text = ACCELERATE_CONFIGS[kind]
    if kind == "cpu" and num_processes is not None and num_processes > 1:
        text = ACCELERATE_CONFIGS["ddp"]
        use_cpu = True
    replace = {}
    if num_processes is not None:
        replace["num_processes"] = str(num_processes)
    if use_cpu:
        replace["mixed_precision"] = "'no'" if mixed_precision is None else mixed_precision
        replace["fsdp_cpu_ram_efficient_loading"] = "false"
    elif mixed_precision is not None:
        replace["mixed_precision"] = mixed_precision if mixed_precision != "no" else "'no'"
    lines = []
    for line in text.splitlines():
        key = line.strip().split(":", 1)[0]
        if use_cpu and key == "gpu_ids":
            continue
        if key in replace:
            line = line[: len(line) - len(line.lstrip())] + f"{key}: {replace[key]}"
        lines.append(line)
        if use_cpu and key == "mixed_precision" and line == line.lstrip():
            lines.append("use_cpu: true  # CPU processes (gloo); pass use_cpu=True / --use_cpu true to the trainer")
    return "\n".join(lines) + "\n"


def check_distributed_launch(accelerator) -> None:
    """Refuse launches that would silently train something other than what was asked for.

    - Several processes were started (`WORLD_SIZE > 1`) but accelerate runs undistributed: every process would train
      the whole model alone and write the same outputs (on CPU: the trainer lacks `use_cpu=True`).
    - An FSDP launch (`ACCELERATE_USE_FSDP`) that accelerate did not turn into FSDP (it does so only on GPU-like
      devices; on CPU the run would be plain DDP with full replicas).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"{world} processes were launched but accelerate counts one (distributed type "
            f"{accelerator.distributed_type}), so every process would train on the whole dataset: on CPU pass "
            "use_cpu=True (--use_cpu true) so the processes join a gloo process group (DeepSpeed on CPU is not "
            "supported by accelerate)."
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and str(accelerator.distributed_type).split(".")[-1] != "FSDP":
        raise RuntimeError(
            f"FSDP was requested but accelerate set up {accelerator.distributed_type}: accelerate applies FSDP only "
            "on GPU-like devices, so this run would train full replicas (DDP). Use a GPU FSDP launch, or the `ddp` "
            "config on CPU."
        )


__all__ = ["ACCELERATE_CONFIGS", "accelerate_config", "check_distributed_launch"]
