"""Scale-out with `accelerate launch`: ready-made accelerate configs and what each trainer supports.

Both trainers are plain `transformers.Trainer` subclasses, so they run unchanged under `accelerate launch`; the
device/parallel setup comes only from the accelerate config (or flags), never from the training code:

    pipo train accelerate-config ddp > ddp.yaml            # or: cpu, fsdp, deepspeed-zero2, deepspeed-zero3
    accelerate launch --config_file ddp.yaml -m transformers_pipo.cli train sft --model ckpt ...
    accelerate launch --config_file ddp.yaml $(which pipo) train opd --model ckpt --teacher teacher ...

| config | PipoSFTTrainer | PipoOPDTrainer |
|---|---|---|
| `cpu` (1 process; what the tests run; `--num_processes N`: N gloo processes, train with `--use_cpu true`) | yes | yes |
| `ddp` (one process per GPU) | yes | yes |
| `deepspeed-zero2` (the reference setup) | yes | yes (teacher replicated per rank) |
| `fsdp` (FSDP2, full shard) / `deepspeed-zero3` | yes: every loss is computed inside the model's forward | no: PIPO generation needs the gathered weights (`synced_gpus` is rejected) and the teacher's LM head is applied outside its forward |

Memory at long context is bounded by the chunked LM-head losses: SFT cross-entropies (`loss_chunk_size` tokens per
chunk, checkpointed) and the OPD divergences (student chunk checkpointed, teacher chunk without gradients), so no
`[T, V]` logits tensor is ever materialised. Add `--activation_checkpointing` for the backbone activations.
"""

from __future__ import annotations

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
    "deepspeed-zero2": """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 8
machine_rank: 0
mixed_precision: bf16
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
""",
    "deepspeed-zero3": """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 8
machine_rank: 0
mixed_precision: bf16
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
""",
}


def accelerate_config(kind: str, num_processes: int | None = None) -> str:
    """The YAML text of an accelerate config (`kind` in `ACCELERATE_CONFIGS`), optionally with `num_processes`."""
    if kind not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {kind!r}; choose one of {sorted(ACCELERATE_CONFIGS)}.")
    text = ACCELERATE_CONFIGS[kind]
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
        lines = [f"num_processes: {num_processes}" if ln.startswith("num_processes:") else ln for ln in text.splitlines()]
        if kind == "cpu" and num_processes > 1:
            # accelerate runs a 'NO' config as one process, and its MULTI_CPU type needs mpirun. Several local CPU
            # processes come from its torchrun launcher (type MULTI_GPU, use_cpu false); the training run's
            # `--use_cpu true` then makes them one gloo (MULTI_CPU) group.
            lines = [
                "# %d CPU processes started by accelerate's torchrun launcher (named MULTI_GPU); run the training "
                "with --use_cpu true" % num_processes,
                *("distributed_type: MULTI_GPU" if ln.startswith("distributed_type:") else
                  "use_cpu: false" if ln.startswith("use_cpu:") else ln for ln in lines),
            ]
        text = "\n".join(lines) + "\n"
    return text


__all__ = ["ACCELERATE_CONFIGS", "accelerate_config"]
