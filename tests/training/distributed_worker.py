"""Worker for tests/training/test_distributed.py: a few SFT and OPD steps on a saved tiny workspace, run as one
process (`python distributed_worker.py ...`), under `accelerate launch --config_file X.yaml`, or under `torchrun`
with the Trainer's own `fsdp` options.

Everything that decides the numbers is deterministic so the runs can be compared across process counts: rows of
one length (so per-rank means equal the global mean), no PAD augmentation, greedy PIPO rollouts with
`min_new_tokens == max_new_tokens` and τ < 0 (every rollout has the same number of decode steps on every rank, so
sharded rollouts stay in step without relying on synced-GPU handling), and the `full` divergence.
The main process writes `<out>/<stage>/result.json` (per-step losses, distributed setup) and saves the final model.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

import torch

torch.set_num_threads(1)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", required=True, help="Folder with student/, teacher/, sft.jsonl, prompts.jsonl.")
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="sft,opd")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, required=True, help="Per-device batch size.")
    p.add_argument("--max_new_tokens", type=int, default=6)
    p.add_argument("--fsdp", default="", help="TrainingArguments.fsdp (torchrun mode), e.g. 'full_shard auto_wrap'.")
    p.add_argument("--deepspeed", default=None, help="A DeepSpeed JSON config (TrainingArguments.deepspeed).")
    p.add_argument("--use_cpu", default="true")
    p.add_argument("--hang_timeout", type=float, default=240.0,
                   help="Dump every thread's stack and exit after this many seconds (a hung collective fails fast).")
    p.add_argument("--shard_teacher", action="store_true", help="PipoOPDConfig.shard_teacher (FSDP2 only).")
    p.add_argument("--cpu_fsdp", action="store_true", help="Apply the FSDP plugin on CPU (see allow_fsdp_on_cpu).")
    return p.parse_args()


def allow_fsdp_on_cpu() -> None:
    """Let accelerate apply its FSDP plugin to a multi-process CPU (gloo) run.

    accelerate only turns a run into FSDP for GPU-like process groups: on CPU the FSDP plugin (from `accelerate
    launch --config_file fsdp.yaml` or the Trainer's `fsdp` options) is dropped and the run is plain DDP. This lifts
    exactly that gate, keeping the plugin accelerate built, so `Accelerator.prepare` runs the real FSDP2 path
    (`fully_shard` per decoder layer + root) on the gloo process group. Test-only; GPU runs need nothing like it.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_pipo_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: every later `AcceleratorState()` re-reads the type from `PartialState`.
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._pipo_cpu_fsdp = True
    AcceleratorState.__init__ = init


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _common(ns: argparse.Namespace, stage: str) -> dict:
    kw = dict(
        output_dir=os.path.join(ns.out, stage),
        max_steps=ns.steps,
        per_device_train_batch_size=ns.batch,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=ns.use_cpu == "true",
        max_pad_ratio=0.0,
        pad_augmentation="none",
        dataloader_num_workers=0,
    )
    if ns.fsdp:
        kw["fsdp"] = ns.fsdp
        kw["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    if ns.deepspeed:
        kw["deepspeed"] = ns.deepspeed
    return kw


def _setup(trainer) -> dict:
    """What the run actually used: process count, accelerate's distributed type, how student and teacher are held."""
    from torch.distributed.fsdp import FSDPModule

    acc = trainer.accelerator

    def holding(module) -> str:
        if module is None:
            return "none"
        if isinstance(module, FSDPModule):
            return "fsdp2"
        if type(module).__name__ == "DistributedDataParallel":
            return "ddp"
        if type(module).__name__ in ("DeepSpeedEngine", "InferenceEngine"):
            return type(module).__name__
        if any(type(p).__name__ == "DTensor" for p in module.parameters()):
            return "dtensor"
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            return "zero3-partitioned"
        return "plain"

    def local_fraction(module) -> float | None:
        """Elements this rank holds / full elements (1.0 for a replica, ~1/world when fully sharded)."""
        if module is None:
            return None
        held = full = 0
        for p in module.parameters():
            local = p.to_local() if type(p).__name__ == "DTensor" else p
            held, full = held + local.numel(), full + p.numel()
        return held / full

    return {
        "student_local_fraction": local_fraction(trainer.model_wrapped),
        "teacher_local_fraction": local_fraction(getattr(trainer, "teacher_model", None)),
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "student": holding(trainer.model_wrapped),
        "teacher": holding(getattr(trainer, "teacher_model", None)),
    }


def run_sft(ns, tokenizer, records) -> None:
    from transformers_pipo import PipoSFTConfig, PipoSFTTrainer

    args = PipoSFTConfig(**_common(ns, "sft"))
    trainer = PipoSFTTrainer(
        model=os.path.join(ns.workspace, "student"), args=args, train_dataset=records, processing_class=tokenizer
    )
    trainer.train()
    _finish(trainer, args)


def greedy_full_length_rollout(model, input_ids, **kwargs):
    """Greedy PIPO rollout of exactly `max_new_tokens` tokens (min == max): deterministic, and the same number of
    decode steps on every rank."""
    kwargs.update(do_sample=False, min_new_tokens=kwargs["max_new_tokens"])
    for name in ("temperature", "top_k", "top_p"):
        kwargs.pop(name, None)
    return model.generate(input_ids, **kwargs)


def run_opd(ns, tokenizer, records) -> None:
    from transformers_pipo import PipoOPDConfig, PipoOPDTrainer

    args = PipoOPDConfig(
        **_common(ns, "opd"),
        max_new_tokens=ns.max_new_tokens,
        pipo_confidence_threshold=-1.0,
        divergence="full",
        shard_teacher=ns.shard_teacher,
    )
    trainer = PipoOPDTrainer(
        model=os.path.join(ns.workspace, "student"),
        teacher_model=os.path.join(ns.workspace, "teacher"),
        args=args,
        train_dataset=records,
        processing_class=tokenizer,
        rollout_fn=greedy_full_length_rollout,
    )
    trainer.train()
    _finish(trainer, args)


def _finish(trainer, args) -> None:
    setup = _setup(trainer)
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)  # gathers sharded state (FSDP FULL_STATE_DICT / ZeRO-3 16-bit) on the main process
    if trainer.accelerator.is_main_process:
        steps = [
            {k: v for k, v in h.items() if isinstance(v, (int, float))}
            for h in trainer.state.log_history
            if "loss" in h
        ]
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump({"setup": setup, "steps": steps}, f, indent=1)
    trainer.accelerator.wait_for_everyone()


def main() -> int:
    ns = _parse()
    # Rank 0 dumps first, so its stack is printed before the launcher tears the group down.
    faulthandler.dump_traceback_later(ns.hang_timeout + 10 * int(os.environ.get("RANK", "0")), exit=True)
    if ns.cpu_fsdp:
        allow_fsdp_on_cpu()
    from transformers import AutoTokenizer

    import transformers_pipo  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ns.workspace, "student"))
    stages = ns.stages.split(",")
    if "sft" in stages:
        run_sft(ns, tokenizer, _records(os.path.join(ns.workspace, "sft.jsonl")))
    if "opd" in stages:
        run_opd(ns, tokenizer, _records(os.path.join(ns.workspace, "prompts.jsonl")))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
