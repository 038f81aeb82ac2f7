"""PIPO supervised fine-tuning (DESIGN §2.2-2.4) on `transformers.Trainer`.

`loss = backbone CE + mtp_loss_weight · MTP CE + confidence_loss_weight · confidence BCE`, each term a mean over its
own labelled positions, computed inside the model's forward with chunked LM-head losses (memory bounded at long
context) — so the trainer runs unchanged under `accelerate launch` with DDP, FSDP or DeepSpeed.

Which parameters train is explicit (`train_mode`): `full` (everything but the embedding/LM head), `heads`
(compressor, MTP head, confidence head) or `lora` (peft adapters on the attention/MLP projections of the backbone
and the MTP layer, the new PIPO modules as `modules_to_save`). A LoRA run saves adapter folders; `save_merged`
(or `merge_and_unload()` on the model) gives a plain, loadable PIPO folder.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..generation_pipo import commit_rate
from .collator import IGNORE_INDEX, PAD_AUGMENTATIONS, IndexedDataset, PipoDataCollator
from .launch import check_distributed_launch
from .params import TRAIN_MODES, configure_trainable, count_parameters, lora_config


@dataclass
class PipoTrainingMixinArguments:
    """Fields shared by [`PipoSFTConfig`] and [`PipoOPDConfig`]: loss weights, trainable groups, LoRA, data layout."""

    mtp_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the MTP (token2) loss, written to the model config (None: keep the config's)."},
    )
    confidence_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the confidence-head BCE, written to the model config (None: keep the config's)."},
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per LM-head chunk in the losses (None: the model config's loss_chunk_size)."},
    )
    train_mode: str = field(
        default="full",
        metadata={
            "help": "Which parameters train: 'full' (all but embeddings/LM head), 'heads' (compressor, MTP, "
            "confidence head) or 'lora' (peft adapters + the PIPO modules as modules_to_save).",
            "choices": list(TRAIN_MODES),
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA target module suffixes (default: q/k/v/o/gate/up/down_proj; 'all-linear' works too)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full next to the adapters (default: compressor, confidence_head, mtp.fc, "
            "mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, mtp.norm)."
        },
    )
    max_pad_ratio: float = field(
        default=0.25, metadata={"help": "PAD augmentation: r ~ U[0, max_pad_ratio] of eligible response pairs."}
    )
    pad_augmentation: str = field(
        default="split",
        metadata={
            "help": "'split' ((a,b) -> (a,PAD),(b,PAD), spec 2.2), 'shift' (inference-style rejection that re-pairs "
            "the rest, spec 4.9) or 'none'.",
            "choices": list(PAD_AUGMENTATIONS),
        },
    )
    min_split_pairs: int = field(
        default=0,
        metadata={"help": "Minimum PAD insertions per row (the reference always splits 1; default 0)."},
    )
    mask_response_prefix: str | None = field(
        default=None,
        metadata={"help": "Response prefix moved into the (masked) prompt when present, e.g. '<think>\\n'."},
    )

    def validate_pipo_fields(self) -> None:
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}.")
        if self.pad_augmentation not in PAD_AUGMENTATIONS:
            raise ValueError(f"pad_augmentation must be one of {PAD_AUGMENTATIONS}, got {self.pad_augmentation!r}.")
        if not 0.0 <= self.max_pad_ratio <= 1.0:
            raise ValueError(f"max_pad_ratio must lie in [0, 1], got {self.max_pad_ratio}.")
        for name in ("mtp_loss_weight", "confidence_loss_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size must be positive, got {self.loss_chunk_size}.")

    def make_lora_config(self):
        if isinstance(self.lora_target_modules, list) and self.lora_target_modules == ["all-linear"]:
            targets = "all-linear"
        else:
            targets = self.lora_target_modules
        return lora_config(self.lora_r, self.lora_alpha, self.lora_dropout, targets, self.lora_modules_to_save)


@dataclass
class PipoSFTConfig(PipoTrainingMixinArguments, TrainingArguments):
    """`TrainingArguments` plus the PIPO SFT knobs (loss weights, trainable groups, LoRA, PAD augmentation).

    `remove_unused_columns` defaults to False: the collator reads the raw record fields.
    """

    max_length: int | None = field(
        default=None, metadata={"help": "Right-truncate training rows to this many tokens (rounded down to even)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: PipoDataCollator reads prompt/response fields."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_pipo_fields()


def apply_loss_settings(model, args: PipoTrainingMixinArguments) -> None:
    """Write the loss settings given in `args` (weights, chunk size) into the PIPO config, the one place the losses
    read them from (and that a saved checkpoint records); fields left at None keep the config's values."""
    config = pipo_base(model).config
    for name in ("mtp_loss_weight", "confidence_loss_weight", "loss_chunk_size"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)


def _check_pipo_model(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) != "pipo":
        raise ValueError(
            f"expected a PIPO model (config.model_type 'pipo'), got {type(base).__name__}; convert a backbone with "
            "PipoForCausalLM.from_backbone first."
        )


def load_pipo_model(model):
    """Accept a PIPO model object or a path/Hub id of a PIPO checkpoint."""
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        import transformers_pipo  # noqa: F401  (registers the pipo model type)

        model = AutoModelForCausalLM.from_pretrained(model)
    _check_pipo_model(model)
    return model


def prepare_lora_base(model, output_dir: str, tokenizer=None, should_save: bool = True) -> str:
    """Make sure a LoRA run's adapters name a base that loads offline, and return it.

    peft writes `model.name_or_path` as the adapter's `base_model_name_or_path`. A model loaded from a local PIPO
    folder keeps that folder (made absolute, so the adapter loads from any working directory) and a Hub id is kept;
    a model that exists only in memory (e.g. fresh from `from_backbone`) is saved to `<output_dir>/base` first.
    """
    import json
    import os

    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or ""
    # Keep `name` only when it holds a PIPO config: from_backbone leaves the *backbone's* folder or Hub id there.
    config_file = os.path.join(name, "config.json") if os.path.isdir(name) else None
    if config_file is None and name and not os.path.exists(name):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            config_file = cached if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001  (not a valid repo id: treat as in-memory)
            config_file = None
    target = None
    if config_file is not None:
        try:
            with open(config_file, encoding="utf-8") as handle:
                if json.load(handle).get("model_type") == "pipo":
                    target = os.path.abspath(name) if os.path.isdir(name) else name
        except (OSError, ValueError):
            target = None
    if target is None:
        target = os.path.abspath(os.path.join(output_dir, "base"))
        if should_save:
            model.save_pretrained(target)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
        model.pipo_lora_base_dir = target
    model.name_or_path = target
    model.config._name_or_path = target
    return target


def scrub_adapter_card(folder: str) -> None:
    """Drop a local base path from the README peft writes next to an adapter (`base_model: /home/...` is meaningless
    on the Hub and leaks the trainer's file system); a Hub id is kept. `adapter_config.json` keeps the path."""
    import os
    import re

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    local = re.compile(r"^(\s*-?\s*)(base_model(?::adapter)?:)\s*(\S+)\s*$")
    out = []
    for line in text.splitlines():
        match = local.match(line)
        if match and (os.path.isabs(match.group(3).split(":")[-1]) or os.path.exists(match.group(3))):
            continue
        out.append(line)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(out) + "\n")


def record_stage(model, stage: str) -> dict:
    """Append `stage` to the model's training history (`config.pipo_training_stages`, saved in config.json) and to
    its model card info; returns the card info dict (add e.g. the measured commit rate to it)."""
    stages = list(getattr(model.config, "pipo_training_stages", None) or []) + [stage]
    model.config.pipo_training_stages = stages
    info = dict(getattr(model, "pipo_model_card_info", None) or {})
    info["training_stages"] = stages
    model.pipo_model_card_info = info
    return info


@torch.no_grad()
def measure_commit_rate(model, prompts: list[list[int]], pad_token_id: int, max_new_tokens: int = 64):
    """`(rate, setting)`: committed drafts / decode steps of greedy PIPO decoding from `prompts` (batch 1 each) at the
    model's saved τ."""
    base = pipo_base(model)
    tau = getattr(base.generation_config, "pipo_confidence_threshold", None)
    device = next(base.parameters()).device
    was_training = model.training
    model.eval()
    committed = steps = 0
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                 return_dict_in_generate=True)
            committed += int(out.committed_drafts.sum())
            steps += int(out.decode_steps.sum())
    finally:
        model.train(was_training)
    rate = commit_rate(committed, steps)
    setting = f"greedy, τ={tau:g}" if tau is not None else "greedy, default τ"
    return rate, f"{setting}, {len(prompts)} prompts, up to {max_new_tokens} new tokens"


def pipo_base(model):
    """The `PipoForCausalLM` under any peft/accelerate wrapping."""
    while hasattr(model, "module") and not hasattr(model, "embed_pairs"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class _ComponentLogging:
    """Collects per-step loss components (gathered across processes) and adds their means to each log line."""

    def _init_components(self):
        self._components = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record(self, values: dict[str, torch.Tensor | float], mode: str | None = None) -> None:
        if mode is None:
            mode = "train" if self.model.training else "eval"
        names = list(values)
        device = self.accelerator.device
        stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float32, device=device).detach().reshape(())
                               for n in names])
        gathered = self.accelerator.gather(stacked.unsqueeze(0)).reshape(-1, len(names))  # one row per process
        means = torch.nanmean(gathered, dim=0) if gathered.numel() else stacked
        for name, value in zip(names, means.tolist()):
            self._components[mode][name].append(value)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resume without a false alarm: a tied LM head is not saved (it *is* the embedding), so it is "missing"."""
        model = self.accelerator.unwrap_model(self.model)
        by_tensor: dict[int, list[str]] = defaultdict(list)
        for name, param in model.named_parameters(remove_duplicate=False):
            by_tensor[id(param)].append(name)
        missing = set(load_result.missing_keys)
        tied = {name for names in by_tensor.values() if len(names) > 1 and not set(names) <= missing
                for name in names if name in missing}
        if tied:
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._components[mode].items():
            finite = [v for v in values if v == v]  # NaN marks a step where the quantity was undefined
            if finite:
                logs[f"{prefix}{name}"] = sum(finite) / len(finite)
        self._components[mode].clear()
        super().log(logs, start_time)


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch (part of its augmentation RNG key) at the start of every epoch, resumed or not."""

    def __init__(self, collator: PipoDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch + 1e-6) if state.epoch else 0


class PipoSFTTrainer(_ComponentLogging, Trainer):
    """`Trainer` for PIPO SFT; logs `backbone_loss`, `mtp_loss`, `confidence_loss`, `mean_confidence` and
    `pad_fraction` next to the total `loss`.

    Args:
        model: a `PipoForCausalLM` (or a path to one). It is wrapped/frozen according to `args.train_mode`.
        args: a [`PipoSFTConfig`].
        data_collator: defaults to a [`PipoDataCollator`] built from `args` and `processing_class`.
        train_dataset / eval_dataset: records (`prompt_ids`/`response_ids`, `messages` or `prompt`/`response`),
            e.g. from [`load_records`].
        processing_class: the tokenizer (required for raw records; saved with checkpoints).
        peft_config: a custom peft config for `train_mode="lora"` (default: built from the `lora_*` fields).
    """

    def __init__(
        self,
        model=None,
        args: PipoSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = PipoSFTConfig(output_dir="pipo-sft")
        if not isinstance(args, PipoSFTConfig):
            raise TypeError(f"PipoSFTTrainer needs a PipoSFTConfig, got {type(args).__name__}.")
        model = load_pipo_model(model)
        apply_loss_settings(model, args)
        args.remove_unused_columns = False
        if args.train_mode == "lora" and peft_config is None:
            peft_config = args.make_lora_config()
        if args.train_mode == "lora" and not hasattr(model, "peft_config"):
            prepare_lora_base(model, args.output_dir, processing_class, args.should_save)
        model = configure_trainable(model, args.train_mode, peft_config)
        if data_collator is None:
            data_collator = PipoDataCollator(
                tokenizer=processing_class,
                pad_token_id=pipo_base(model).config.pad_token_id,
                max_length=args.max_length,
                max_pad_ratio=args.max_pad_ratio,
                pad_augmentation=args.pad_augmentation,
                min_split_pairs=args.min_split_pairs,
                mask_response_prefix=args.mask_response_prefix,
            )
        if isinstance(data_collator, PipoDataCollator) and train_dataset is not None and hasattr(train_dataset,
                                                                                                   "__getitem__"):
            # Augmentation keyed by (seed, epoch, record indices): a resumed run repeats an uninterrupted one exactly.
            train_dataset = IndexedDataset(train_dataset)
            data_collator.record_seed = args.seed
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _CollatorEpoch(data_collator)]
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        check_distributed_launch(self.accelerator)
        self._init_components()
        self.parameter_counts = count_parameters(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The model's own loss (`pipo_sft_loss`), normalised by `num_items_in_batch` like transformers' causal-LM
        # losses, so gradient accumulation gives the update of one step over the whole accumulated batch.
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs["labels"],
            return_logits=False,
            use_cache=False,
            num_items_in_batch=num_items_in_batch,
        )
        loss = out.loss
        scale = 1  # per-micro-batch share of the step's loss -> the step's value, for logging
        if num_items_in_batch is not None:
            if self.args.average_tokens_across_devices:
                # Trainer's convention for token-averaged losses: DDP/FSDP average the ranks' gradients.
                loss = loss * self.accelerator.num_processes
                scale = self.accelerator.num_processes
            scale *= getattr(self, "current_gradient_accumulation_steps", 1) or 1
        with torch.no_grad():
            stats = {
                "backbone_loss": out.backbone_loss * scale,
                "mtp_loss": out.mtp_loss * scale,
                "confidence_loss": out.confidence_loss * scale,
            }
            labels = out.pair_labels
            if out.confidence_logits is not None:
                valid = labels[:, 3::2] != IGNORE_INDEX
                conf = torch.sigmoid(out.confidence_logits[valid])
                stats["mean_confidence"] = conf.mean() if conf.numel() else torch.tensor(float("nan"))
            ids, mask = out.pair_input_ids, out.pair_attention_mask
            pad = pipo_base(model).config.pad_token_id
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            stats["pad_fraction"] = ((ids == pad) & real).sum() / real.sum().clamp(min=1)
        self._record(stats)
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def save_merged(self, output_dir: str):
        """After training: merge LoRA adapters into the base in place (`merge_and_unload`), save a plain PIPO folder
        (+ tokenizer) from the main process, and return the merged model (see [`save_merged`])."""
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:
            return save_merged(model, output_dir, self.processing_class)
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_merged(model, output_dir: str, tokenizer=None):
    """Save `model` as a plain PIPO folder and return the plain model.

    A peft model is merged **in place** first (`merge_and_unload()`: the LoRA deltas are added to the base weights
    and the `modules_to_save` copies replace the originals), so use the returned model afterwards. The folder loads
    with `AutoModelForCausalLM.from_pretrained(output_dir)` (remote code included) and needs no peft.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    _check_pipo_model(model)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return model


__all__ = [
    "PipoSFTConfig",
    "apply_loss_settings",
    "PipoSFTTrainer",
    "save_merged",
    "load_pipo_model",
    "prepare_lora_base",
    "record_stage",
    "scrub_adapter_card",
    "measure_commit_rate",
]
