"""`pipo train sft|opd|accelerate-config`: PIPO training from the command line.

Flags mirror the config dataclasses (`PipoSFTConfig`, `PipoOPDConfig`, i.e. every `TrainingArguments` flag plus the
PIPO ones) through `HfArgumentParser`; `pipo train sft --help` lists them all. Runs unchanged under
`accelerate launch` (see `pipo train accelerate-config`). Checkpoints (`--save_steps`) and the final model are PIPO
folders loadable with `AutoModelForCausalLM.from_pretrained` (LoRA runs save the adapter, plus a merged PIPO folder in
`<output_dir>/merged` unless `--merge_lora false`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

SUBCOMMANDS = {
    "sft": "Supervised fine-tuning on prompt/response JSONL (messages or prompt/response fields).",
    "opd": "On-policy distillation from a frozen teacher on prompt JSONL.",
    "accelerate-config": "Print an accelerate config (cpu, ddp, fsdp, deepspeed-zero2, deepspeed-zero3).",
}


@dataclass
class PipoTrainScriptArguments:
    """Data and model locations for `pipo train`."""

    model: str = field(metadata={"help": "PIPO checkpoint (path or Hub id); a plain causal LM with --from_backbone."})
    train_file: str = field(metadata={"help": "JSONL training records."})
    eval_file: str | None = field(default=None, metadata={"help": "Optional JSONL evaluation records."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path (default: --model)."})
    from_backbone: bool = field(
        default=False, metadata={"help": "Convert a plain causal LM given as --model into a PIPO model first."}
    )
    compressor_type: str = field(default="mlp", metadata={"help": "Compressor for --from_backbone."})
    add_eos: bool = field(default=True, metadata={"help": "Append EOS to string responses of prompt/response records."})
    merge_lora: bool = field(
        default=True, metadata={"help": "With --train_mode lora, also save a merged PIPO folder in <output_dir>/merged."}
    )


@dataclass
class PipoSFTScriptArguments(PipoTrainScriptArguments):
    """`pipo train sft` locations plus the PAD choice of --from_backbone (OPD's trl config owns `--pad_token`)."""

    pad_token_id: int | None = field(
        default=None,
        metadata={"help": "PIPO PAD id for --from_backbone (default: the tokenizer's pad; a PAD that is also an EOS "
                  "id is removed from the EOS lists, see PipoForCausalLM.from_backbone)."},
    )
    pad_token: str = field(
        default="<|pipo_pad|>",
        metadata={"help": "PAD token added by --from_backbone when the tokenizer has no usable pad (an existing "
                  "token, e.g. <|finetune_right_pad_id|>, is reused without growing the vocabulary)."},
    )


@dataclass
class PipoOPDScriptArguments(PipoTrainScriptArguments):
    """`pipo train opd` locations: the training script arguments plus the teacher."""

    teacher: str | None = field(
        default=None, metadata={"help": "Teacher: a causal LM sharing the tokenizer (path or Hub id)."}
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="Train PIPO models: sft, opd (run `pipo train sft --help`).")
    sub = parser.add_subparsers(dest="train_command", metavar="{sft,opd,accelerate-config}")
    for name, text in SUBCOMMANDS.items():
        # Flags are parsed by HfArgumentParser in `run` (keeps `pipo --help` free of heavy imports).
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\x00")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=run)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def run(args: argparse.Namespace) -> int:
    command, rest = args.train_command, list(args.rest)
    if command == "accelerate-config":
        return _accelerate_config(rest)
    return _train(command, rest)


def _accelerate_config(rest: list[str]) -> int:
    from transformers_pipo.training.launch import ACCELERATE_CONFIGS, accelerate_config

    parser = argparse.ArgumentParser(prog="pipo train accelerate-config", description=SUBCOMMANDS["accelerate-config"])
    parser.add_argument("kind", choices=sorted(ACCELERATE_CONFIGS))
    parser.add_argument("--num_processes", type=int, default=None)
    ns = parser.parse_args(rest)
    print(accelerate_config(ns.kind, ns.num_processes), end="")
    return 0


def _train(command: str, rest: list[str]) -> int:
    from transformers import HfArgumentParser

    if command == "sft":
        from transformers_pipo.training import PipoSFTConfig as Config

        Script = PipoSFTScriptArguments
    else:
        from transformers_pipo.training import PipoOPDConfig as Config

        Script = PipoOPDScriptArguments
    parser = HfArgumentParser((Script, Config), prog=f"pipo train {command}",
                              description=SUBCOMMANDS[command])
    script, config = parser.parse_args_into_dataclasses(args=rest)
    if command == "opd":
        return _run_opd(script, config)
    return _run_sft(script, config)


def _load(script: PipoTrainScriptArguments):
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import transformers_pipo  # noqa: F401  (registers the pipo model type)
    from transformers_pipo import PipoForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(script.tokenizer or script.model)
    model_type = AutoConfig.from_pretrained(script.model).model_type
    if model_type == "pipo":
        if script.from_backbone:
            raise SystemExit(f"pipo train: {script.model} is already a PIPO checkpoint; drop --from_backbone.")
        model = AutoModelForCausalLM.from_pretrained(script.model)
    elif script.from_backbone:
        model, tokenizer = PipoForCausalLM.from_backbone(
            script.model, tokenizer, compressor_type=script.compressor_type, return_tokenizer=True,
            pad_token_id=getattr(script, "pad_token_id", None),
            pad_token=getattr(script, "pad_token", "<|pipo_pad|>"),
        )
    else:
        raise SystemExit(
            f"pipo train: {script.model} is a '{model_type}' checkpoint, not a PIPO one; pass --from_backbone to "
            "convert it first."
        )
    pad = model.config.pad_token_id
    if tokenizer.pad_token_id != pad:
        raise SystemExit(
            f"pipo train: the tokenizer's pad token id ({tokenizer.pad_token_id}) differs from the model's PIPO PAD "
            f"({pad}); use the tokenizer saved with the PIPO checkpoint."
        )
    return model, tokenizer


def _records(path, tokenizer, pad, *, require_response, add_eos):
    from transformers_pipo.training import PipoDataError, load_records

    try:
        return load_records(path, tokenizer, require_response=require_response, add_eos=add_eos, pad_token_id=pad)
    except (PipoDataError, OSError) as exc:
        raise SystemExit(f"pipo train: {exc}") from None


def _run_sft(script, config) -> int:
    from transformers_pipo.training import PipoSFTTrainer

    model, tokenizer = _load(script)
    pad = model.config.pad_token_id
    train = _records(script.train_file, tokenizer, pad, require_response=True, add_eos=script.add_eos)
    evaluation = None
    if script.eval_file:
        evaluation = _records(script.eval_file, tokenizer, pad, require_response=True, add_eos=script.add_eos)
    trainer = PipoSFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer)
    return _finish(trainer, script, config)


def _run_opd(script, config) -> int:
    from transformers_pipo.training import PipoOPDTrainer

    teacher = script.teacher or config.teacher_model_name_or_path
    if not teacher:
        raise SystemExit("pipo train opd: pass --teacher (a causal LM sharing the tokenizer).")
    model, tokenizer = _load(script)
    pad = model.config.pad_token_id
    need_response = config.lmbda < 1.0 and not config.seq_kd
    train = _records(script.train_file, tokenizer, pad, require_response=need_response, add_eos=script.add_eos)
    evaluation = None
    if script.eval_file:
        evaluation = _records(script.eval_file, tokenizer, pad, require_response=False, add_eos=script.add_eos)
    trainer = PipoOPDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=train,
                             eval_dataset=evaluation, processing_class=tokenizer)
    return _finish(trainer, script, config)


def _finish(trainer, script, config) -> int:
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    saved = {"model": config.output_dir}
    if config.train_mode == "lora" and script.merge_lora:
        merged = os.path.join(config.output_dir, "merged")
        from transformers_pipo.training.sft import save_merged

        if trainer.args.should_save:
            save_merged(trainer.accelerator.unwrap_model(trainer.model), merged, trainer.processing_class)
        saved["merged"] = merged
    if trainer.is_world_process_zero():
        last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
        summary = {"steps": trainer.state.global_step, "saved": saved,
                   "last_log": {k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}}
        print(json.dumps(summary, indent=2))
    return 0


__all__ = ["register", "run", "PipoTrainScriptArguments", "PipoSFTScriptArguments", "PipoOPDScriptArguments"]
