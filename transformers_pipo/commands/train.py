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
    """Data and model locations for `pipo train` (trl's `--dataset_name`/`--model_name_or_path` spellings work)."""

    model: str | None = field(
        default=None,
        metadata={"help": "PIPO checkpoint (path or Hub id); a plain causal LM with --from_backbone.",
                  "aliases": ["--model_name_or_path"]},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a JSON Lines / JSON / parquet file, a datasets save_to_disk folder or a "
                  "Hub data set id (records with messages, prompt/completion or prompt/response).",
                  "aliases": ["--train_file"]},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub data set."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of --dataset_name used for evaluation (or give --eval_file)."}
    )
    eval_file: str | None = field(default=None, metadata={"help": "Optional evaluation data (same forms)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path (default: --model)."})
    from_backbone: bool = field(
        default=False, metadata={"help": "Convert a plain causal LM given as --model into a PIPO model first."}
    )
    compressor_type: str = field(default="mlp", metadata={"help": "Compressor for --from_backbone."})
    add_eos: bool = field(default=True, metadata={"help": "Append EOS to string responses of prompt/response records."})
    merge_lora: bool = field(
        default=True, metadata={"help": "With --train_mode lora, also save a merged PIPO folder in <output_dir>/merged."}
    )
    commit_rate_prompts: int = field(
        default=8,
        metadata={"help": "After training, measure the commit rate (greedy, the saved τ) on this many training "
                  "prompts and record it in the model card (0: skip)."},
    )


@dataclass
class PipoSFTScriptArguments(PipoTrainScriptArguments):
    """`pipo train sft` locations plus the PAD choice of --from_backbone."""

    pad_token_id: int | None = field(
        default=None,
        metadata={"help": "PIPO PAD id for --from_backbone (default: the tokenizer's pad; a PAD that is also an EOS "
                  "id is removed from the EOS lists, see PipoForCausalLM.from_backbone)."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "PAD token added by --from_backbone when the tokenizer has no usable pad (default: "
                  "from_backbone's <|pipo_pad|>; an existing token, e.g. <|finetune_right_pad_id|>, is reused without "
                  "growing the vocabulary)."},
    )


@dataclass
class PipoOPDScriptArguments(PipoSFTScriptArguments):
    """`pipo train opd` locations: the SFT script arguments (PAD choice of --from_backbone included) plus the
    teacher."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: a causal LM whose vocabulary is the student's, or a prefix of it when "
                  "from_backbone added a PAD (path or Hub id)."},
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
    return _train(command, rest, args)


def _accelerate_config(rest: list[str]) -> int:
    from transformers_pipo.cli import PipoArgumentParser, positive_int, suggest_options, UsageError
    from transformers_pipo.training.launch import ACCELERATE_CONFIGS, accelerate_config

    parser = PipoArgumentParser(prog="pipo train accelerate-config", description=SUBCOMMANDS["accelerate-config"])
    parser.add_argument("kind", choices=sorted(ACCELERATE_CONFIGS))
    parser.add_argument("--num_processes", "--num-processes", type=positive_int, default=None,
                        help="Processes to launch (default: 1 for cpu, 8 otherwise).")
    ns, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UsageError(suggest_options(unknown, list(parser._option_string_actions)), prog=parser.prog)
    print(accelerate_config(ns.kind, ns.num_processes), end="")
    return 0


def _pipo_fields(script_cls, config_cls) -> tuple[set[str], set[str]]:
    """(data/model flags, PIPO training flags): the fields that are not plain TrainingArguments ones."""
    from dataclasses import fields

    from transformers import TrainingArguments

    inherited = {f.name for f in fields(TrainingArguments)}
    return {f.name for f in fields(script_cls)}, {f.name for f in fields(config_cls)} - inherited


def build_train_parser(command: str):
    """The `HfArgumentParser` of `pipo train sft|opd`: PIPO's own flags first in --help, one-line errors."""
    from transformers import HfArgumentParser

    from transformers_pipo.cli import PipoArgumentParser

    if command == "sft":
        from transformers_pipo.training import PipoSFTConfig as Config

        Script = PipoSFTScriptArguments
    else:
        from transformers_pipo.training import PipoOPDConfig as Config

        Script = PipoOPDScriptArguments

    class Parser(HfArgumentParser):
        error = PipoArgumentParser.error

    teacher = " --teacher TEACHER" if command == "opd" else ""
    parser = Parser((Script, Config), prog=f"pipo train {command}",
                    usage=f"pipo train {command} --model MODEL --dataset_name DATA{teacher} --output_dir DIR [options]",
                    description=SUBCOMMANDS[command] + " Flags may also come from a YAML file given with --config "
                    "(keys are flag names without dashes; flags on the command line win), as in trl.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (as trl's --config).")
    script_fields, pipo_fields = _pipo_fields(Script, Config)
    groups = {
        "script": parser.add_argument_group("data and model"),
        "pipo": parser.add_argument_group("PIPO training"),
        "rest": parser.add_argument_group("Trainer options"),
    }
    for action in list(parser._optionals._group_actions):
        if action.dest in ("help", "config"):
            continue
        key = "script" if action.dest in script_fields else "pipo" if action.dest in pipo_fields else "rest"
        parser._optionals._group_actions.remove(action)
        groups[key]._group_actions.append(action)
    order = {id(a): i for i, a in enumerate(a for g in parser._action_groups for a in g._group_actions)}
    parser._actions.sort(key=lambda a: order.get(id(a), -1))
    return parser, Script, Config


def _apply_yaml_config(parser, rest: list[str]) -> list[str]:
    """Consume `--config FILE.yaml` from `rest` and make its keys the parser's defaults (trl's TrlParser rule)."""
    from transformers_pipo.cli import UsageError, suggest_options

    if "--config" not in rest and not any(a.startswith("--config=") for a in rest):
        return rest
    out, path = [], None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest):
                raise UsageError("--config needs a YAML file", prog=parser.prog)
            path = rest[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as err:
        raise UsageError(f"--config {path}: {err.strerror or err}", prog=parser.prog) from None
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})", prog=parser.prog) from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values", prog=parser.prog)
    if "env" in values:
        raise UsageError(f"--config {path}: the 'env' section is not supported; configure with flags", prog=parser.prog)
    options = parser._option_string_actions
    unknown = [k for k in values if f"--{k}" not in options]
    if unknown:
        message = suggest_options([f"--{unknown[0]}"], list(options))
        raise UsageError(f"--config {path}: {message.replace('option', 'key', 1)}", prog=parser.prog)
    defaults = {options[f"--{k}"].dest: v for k, v in values.items()}  # aliases (model_name_or_path) included
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)
    return out


def _train(command: str, rest: list[str], args: argparse.Namespace | None = None) -> int:
    from transformers_pipo.cli import UsageError, suggest_options

    parser, _, _ = build_train_parser(command)
    rest = _apply_yaml_config(parser, rest)
    outputs = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    script, config, remaining = outputs[0], outputs[1], outputs[-1]  # (a namespace holding --config in between)
    if remaining:
        raise UsageError(suggest_options(remaining, list(parser._option_string_actions)), prog=parser.prog)
    if not script.model:
        raise UsageError("--model (or --model_name_or_path) is required", prog=parser.prog)
    if not script.dataset_name:
        raise UsageError("--dataset_name (or --train_file) is required", prog=parser.prog)
    if args is not None:  # where `pipo` looks for a corrupt .safetensors file if loading fails
        args.model_folders = [script.model, script.tokenizer, getattr(script, "teacher", None)]
    for flag, value in (("--dataset_name", script.dataset_name), ("--eval_file", script.eval_file)):
        _check_data_location(flag, value)
    config.resume_from_checkpoint = _resume_target(config)
    if command == "opd":
        return _run_opd(script, config)
    return _run_sft(script, config)


def _check_data_location(flag: str, value: str | None) -> None:
    """Before any model is loaded: a data location that is clearly local (a path or a file name) must exist."""
    from transformers_pipo.cli import UsageError

    if value is None or os.path.exists(value):
        return
    if value.startswith((".", "/", "~")) or value.lower().endswith((".json", ".jsonl", ".parquet", ".csv", ".txt")):
        raise UsageError(f"{flag} {value}: no such file or folder")


def _resume_target(config):
    """`--resume_from_checkpoint true|last` → the last checkpoint in output_dir; `false` → None; a folder as given."""
    from transformers_pipo.cli import UsageError

    value = config.resume_from_checkpoint
    if value is None or isinstance(value, bool):
        return value or None
    if str(value).lower() in ("false", "no", "0", "none", ""):
        return None
    if str(value).lower() in ("true", "yes", "1", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if last is None:
            raise UsageError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {config.output_dir}")
        return last
    if not os.path.isdir(value):
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def _load(script: PipoTrainScriptArguments):
    from transformers_pipo.cli import check_model_path

    check_model_path(script.model, "--model")
    check_model_path(script.tokenizer, "--tokenizer")
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
        pad_token = getattr(script, "pad_token", None)
        model, tokenizer = PipoForCausalLM.from_backbone(
            script.model, tokenizer, compressor_type=script.compressor_type, return_tokenizer=True,
            pad_token_id=getattr(script, "pad_token_id", None), **({"pad_token": pad_token} if pad_token else {}),
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


def _records(script, tokenizer, pad, *, require_response, add_eos, evaluation=False):
    from transformers_pipo.training import PipoDataError, load_records

    if evaluation:
        if script.eval_file:
            name, split = script.eval_file, "train"
        elif script.dataset_test_split:
            name, split = script.dataset_name, script.dataset_test_split
        else:
            return None
    else:
        name, split = script.dataset_name, script.dataset_train_split
    try:
        return load_records(name, tokenizer, require_response=require_response, add_eos=add_eos, pad_token_id=pad,
                            dataset_config=script.dataset_config, split=split)
    except (PipoDataError, OSError) as exc:
        raise SystemExit(f"pipo train: {exc}") from None


def _run_sft(script, config) -> int:
    from transformers_pipo.training import PipoSFTTrainer

    model, tokenizer = _load(script)
    pad = model.config.pad_token_id
    train = _records(script, tokenizer, pad, require_response=True, add_eos=script.add_eos)
    evaluation = _records(script, tokenizer, pad, require_response=True, add_eos=script.add_eos, evaluation=True)
    trainer = PipoSFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer)
    return _finish(trainer, script, config, "sft", train)


def _run_opd(script, config) -> int:
    from transformers_pipo.cli import check_model_path
    from transformers_pipo.training import PipoOPDTrainer

    teacher = script.teacher or config.teacher_model_name_or_path
    if not teacher:
        raise SystemExit("pipo train opd: pass --teacher (a causal LM sharing the tokenizer).")
    check_model_path(teacher, "--teacher")
    model, tokenizer = _load(script)
    pad = model.config.pad_token_id
    need_response = config.lmbda < 1.0 and not config.seq_kd
    train = _records(script, tokenizer, pad, require_response=need_response, add_eos=script.add_eos)
    evaluation = _records(script, tokenizer, pad, require_response=False, add_eos=script.add_eos, evaluation=True)
    trainer = PipoOPDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=train,
                             eval_dataset=evaluation, processing_class=tokenizer)
    return _finish(trainer, script, config, "opd", train)


def _stage(command: str, script, config, trainer) -> str:
    """One line for the model card's training stages (data named by Hub id or file name, never a local path)."""
    data = script.dataset_name
    if os.path.exists(data):
        data = os.path.basename(os.path.normpath(data))
    mode = config.train_mode + (f" r={config.lora_r}" if config.train_mode == "lora" else "")
    steps = trainer.state.global_step
    if command == "sft":
        return f"SFT ({mode}, {steps} steps, data {data}, PAD augmentation {config.pad_augmentation})"
    return (f"OPD ({mode}, {steps} steps, data {data}, divergence {config.divergence}, rollout "
            f"τ={config.pipo_confidence_threshold:g})")


def _finish(trainer, script, config, command: str, train_records) -> int:
    from transformers_pipo.training.sft import measure_commit_rate, pipo_base, record_stage

    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    base = pipo_base(trainer.accelerator.unwrap_model(trainer.model))
    card = record_stage(base, _stage(command, script, config, trainer))
    if script.commit_rate_prompts > 0 and trainer.is_world_process_zero():
        prompts = [r["prompt_ids"] for r in train_records[: script.commit_rate_prompts]]
        rate, setting = measure_commit_rate(trainer.accelerator.unwrap_model(trainer.model), prompts,
                                            pad_token_id=base.config.pad_token_id)
        card.update(commit_rate=rate, commit_rate_setting=f"{setting}, prompts from the training data")
    trainer.save_model(config.output_dir)
    saved = {"model": config.output_dir}
    if config.train_mode == "lora":
        saved["model"] = config.output_dir + " (peft adapter)"
        if script.merge_lora:
            merged = os.path.join(config.output_dir, "merged")
            from transformers_pipo.training.sft import save_merged

            if trainer.args.should_save:
                save_merged(trainer.accelerator.unwrap_model(trainer.model), merged, trainer.processing_class)
            saved["merged"] = merged
        if trainer.args.should_save:
            import glob

            from transformers_pipo.training.sft import scrub_adapter_card

            for folder in [config.output_dir, *glob.glob(os.path.join(config.output_dir, "checkpoint-*"))]:
                scrub_adapter_card(folder)
        lora_base = getattr(base, "pipo_lora_base_dir", None)
        if lora_base:
            saved["base"] = lora_base
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        last = next((h for h in reversed(history) if "loss" in h), None)  # the last step log (loss components)
        last = last or next((h for h in reversed(history) if "train_loss" in h), {})  # else the run's summary
        summary = {"steps": trainer.state.global_step, "saved": saved,
                   "last_log": {k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}}
        if card.get("commit_rate") is not None:
            summary["commit_rate"] = round(float(card["commit_rate"]), 4)
        print(json.dumps(summary, indent=2))
    return 0


__all__ = [
    "register", "run", "build_train_parser", "PipoTrainScriptArguments", "PipoSFTScriptArguments",
    "PipoOPDScriptArguments",
]
