"""PIPO on-policy distillation (DESIGN §2.5) on `transformers.Trainer`.

Each step (with probability `lmbda`, 1.0 by default) the student rolls out in PIPO mode (`model.generate`, batched,
sampling, confidence threshold τ), the rollout is laid out exactly as the model saw it (parity-aligned prompt +
raw slots, PADs included), and:

- the student runs the training forward (compressor → backbone → MTP, token1 teacher-forced);
- the frozen teacher (any causal LM with the student's vocabulary) scores the PAD-compacted sequence, and its hidden
  states are mapped back to full length (`compact_pads` / `map_back`, DESIGN §2.5d);
- divergences at backbone slots (teacher positions 1, 3, …) and MTP slots (2, 4, …) with `divergence` = `full`,
  `topk` or `sampled` (a correct score-function estimator, DESIGN §2.5f), in LM-head chunks;
- the confidence head regresses α = min(1, p_t(y)/p_s(y)) (1 − TV for `full`), detached; MTP labels at PAD slots
  can be filled from the student (DESIGN §2.5e).

The trainer is a plain `Trainer` subclass: `training_step` swaps the batch for a rollout before the ordinary step,
`compute_loss` is the OPD loss. The knobs that on-policy distillation trainers share keep their usual names and
meaning (`lmbda`, `beta`, `temperature`, `max_new_tokens`, `seq_kd`, `teacher_model_name_or_path`,
`teacher_model_init_kwargs`, `disable_dropout`), so configs written for trl's GKD trainer carry over. From trl only
two public helpers are used, both for DeepSpeed: `prepare_deepspeed` (teacher placement) and
`unwrap_model_for_generation` (ZeRO-3 rollouts on gathered weights).
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..modeling_pipo import align_row
from .collator import IGNORE_INDEX, PipoDataCollator
from .launch import check_distributed_launch
from .losses import DIVERGENCES, opd_loss
from .sft import (
    PipoTrainingMixinArguments,
    _ComponentLogging,
    apply_loss_settings,
    load_pipo_model,
    pipo_base,
    prepare_lora_base,
)


@dataclass
class PipoOPDConfig(PipoTrainingMixinArguments, TrainingArguments):
    """`TrainingArguments` plus the PIPO OPD knobs.

    Defaults follow DESIGN §2.5: fully on-policy (`lmbda=1`), reverse KL (`beta=1`), rollout temperature 1.0,
    rollout confidence threshold τ = 0.95, `topk` divergence with K = 32, PAD labels filled. Rollouts sample from the
    full distribution (`top_k=0`, `top_p=1.0`); the reference used 20 / 0.95 (with truncation the `sampled`
    estimator is no longer exactly unbiased for the untruncated KL). `learning_rate` (2e-5) and `logging_steps` (10)
    default as in trl's trainers; `remove_unused_columns` is False because the collator reads the raw prompt fields.
    """

    divergence: str = field(
        default="topk",
        metadata={"help": "'full' (reverse KL / JSD over the vocabulary), 'topk' (over student∪teacher top-k∪{y}, "
                  "renormalised) or 'sampled' (score-function estimator).", "choices": list(DIVERGENCES)},
    )
    divergence_topk: int = field(
        default=32, metadata={"help": "K for divergence='topk' (not to be confused with the rollout's --top_k)."}
    )
    divergence_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of both softmaxes in the divergence (τ_T)."}
    )
    pipo_confidence_threshold: float = field(
        default=0.95,
        metadata={"help": "Rollout confidence threshold τ: <0 commits every draft, >=1 never drafts (always PAD)."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Rollout sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Rollout sampling top-k (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Rollout sampling top-p (1.0 = off)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum new tokens per rollout."})
    fill_pad_labels: bool = field(
        default=True,
        metadata={"help": "Supervise the MTP and confidence head at PAD draft slots with a label drawn from the "
                  "student (argmax; a sample for divergence='sampled')."},
    )
    lmbda: float = field(default=1.0, metadata={"help": "Probability of an on-policy (student rollout) step."})
    beta: float = field(
        default=1.0, metadata={"help": "Generalised JSD interpolation: 1 = reverse KL (default), 0 = forward KL."}
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "On off-policy steps (probability 1 - lmbda), train on the teacher's own generations "
                  "(sequence-level KD) instead of the dataset responses."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher path or Hub id when the trainer is given none."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (a dict, or JSON on the command line) for "
                  "AutoModelForCausalLM.from_pretrained when the teacher is given by name, e.g. '{\"dtype\": "
                  "\"bfloat16\"}'."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code when loading the teacher by name."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout of the student (LoRA dropout included) to 0."}
    )
    max_pad_ratio: float = field(
        default=0.0, metadata={"help": "PAD augmentation of dataset responses (only used when lmbda < 1)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Right-truncate dataset rows (off-policy steps only) to this many tokens."}
    )
    shard_teacher: bool = field(
        default=False,
        metadata={"help": "Under FSDP2, shard the teacher like the student (decoder layers + embedding/head units) "
                  "instead of keeping a full replica on every rank. Under DeepSpeed the stage decides (ZeRO-3 "
                  "partitions the teacher, ZeRO-2 replicates it)."},
    )
    # TrainingArguments fields whose defaults differ here.
    learning_rate: float = field(default=2e-5, metadata={"help": "The initial learning rate for the optimizer."})
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (an integer, or a float in (0, 1): ratio of steps)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: PipoDataCollator reads the prompt fields."}
    )

    def __post_init__(self):
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"teacher_model_init_kwargs must be a JSON object, got {self.teacher_model_init_kwargs!r}"
                                 f" ({err.msg}).") from None
            if not isinstance(self.teacher_model_init_kwargs, dict):
                raise ValueError("teacher_model_init_kwargs must be a JSON object (a mapping of keyword arguments).")
        super().__post_init__()
        self.validate_pipo_fields()
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}.")
        if self.divergence == "sampled" and self.beta != 1.0:
            raise ValueError("divergence='sampled' estimates the reverse KL only; set beta=1.0.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must lie in [0, 1], got {self.lmbda}.")
        if self.divergence_topk <= 0:
            raise ValueError(f"divergence_topk must be positive, got {self.divergence_topk}.")
        if self.divergence_temperature <= 0 or self.temperature <= 0:
            raise ValueError("temperature and divergence_temperature must be positive.")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")


# ----------------------------------------------------------------------------------------------------------------------
# Rollout → training rows
# ----------------------------------------------------------------------------------------------------------------------


def rollout_rows(output, pad_token_id: int) -> list[tuple[list[int], list[int]]]:
    """Training rows `(ids, labels)` from a PIPO `generate` output.

    Row = `pipo_prompt_ids[b]` (the parity-aligned prompt the model saw) + the raw slots `pipo_slot_ids[b, :len]`
    (+ one PAD when the slot count is odd). Labels: -100 on the prompt and on every PAD, the ids elsewhere.
    """
    rows = []
    for b, prompt in enumerate(output.pipo_prompt_ids):
        prompt = [int(t) for t in prompt]
        if len(prompt) % 2:
            raise ValueError(f"rollout row {b}: pipo_prompt_ids has odd length {len(prompt)}; the parity rule failed.")
        n = int(output.pipo_slot_lengths[b])
        slots = [int(t) for t in output.pipo_slot_ids[b, :n]]
        if n % 2:
            slots.append(pad_token_id)
        for i in range(0, len(slots), 2):
            if slots[i] == pad_token_id:
                raise ValueError(f"rollout row {b}: PAD emitted as token1 at slot {i}; PAD may only fill draft slots.")
        ids = prompt + slots
        labels = [IGNORE_INDEX] * len(prompt) + [t if t != pad_token_id else IGNORE_INDEX for t in slots]
        rows.append((ids, labels))
    return rows


def sequence_rows(sequences, prompt_width: int, prompt_mask, pad_token_id: int, eos_token_ids) -> list:
    """Training rows from a plain (non-PIPO) `generate` output (e.g. a teacher with `seq_kd`): prompt + tokens up to
    and including the first EOS, laid out by `align_row` (PAD after an odd prompt, even total)."""
    eos = set(eos_token_ids or [])
    rows = []
    for b in range(sequences.shape[0]):
        prompt = [int(t) for t, m in zip(sequences[b, :prompt_width], prompt_mask[b]) if int(m)]
        response = []
        for t in sequences[b, prompt_width:].tolist():
            if t == pad_token_id:
                break
            response.append(t)
            if t in eos:
                break
        rows.append(align_row(prompt + response, [IGNORE_INDEX] * len(prompt) + response, pad_token_id))
    return rows


def pad_rows(rows, pad_token_id: int, device=None):
    """Right-pad `(ids, labels)` rows (each of even length) into `input_ids`, `attention_mask`, `labels`."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        if len(ids) % 2:
            raise ValueError(f"row {b} has odd length {len(ids)}; PIPO rows are laid out in whole pairs.")
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    if device is not None:
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
    return input_ids, mask, labels


def _default_rollout(model, input_ids, **kwargs):
    return model.generate(input_ids, **kwargs)


def call_through_wrapper(wrapper: torch.nn.Module, module: torch.nn.Module, fn, *args):
    """`fn(*args)`, run as the forward of `module` by calling `wrapper` (DDP, FSDP or DeepSpeed around `module`; or
    `module` itself when FSDP2 shards it in place).

    Whatever the wrapper does around a forward (DDP's gradient-sync bookkeeping, FSDP's parameter gathering and
    resharding, DeepSpeed's ZeRO-3 fetches) then covers the whole computation in `fn`, which may call `module`'s
    real forward and other modules (the teacher) on the way.
    """
    patched = "forward" in module.__dict__
    original = module.__dict__.get("forward")

    def restore():
        if patched:
            module.forward = original
        else:
            module.__dict__.pop("forward", None)

    def redirected(*inner_args):
        restore()  # `fn` may call the module's real forward
        return fn(*inner_args)

    module.forward = redirected
    try:
        return wrapper(*args)
    finally:
        restore()


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


class PipoOPDTrainer(_ComponentLogging, Trainer):
    """On-policy distillation of a PIPO student from a frozen causal-LM teacher (see the module docstring).

    Logs (per logging window): `loss`, `backbone_loss` / `mtp_loss` (divergences as optimised), `confidence_loss`,
    `divergence_backbone` / `divergence_mtp` (divergence values; single-sample KL estimates for `sampled`),
    `alpha_mean`, `mean_confidence` (predicted, at supervised MTP slots), `fill_fraction`, and for rollout steps
    `rollout_commit_rate`, `rollout_length` (real tokens), `rollout_slots`, `rollout_confidence`.

    Args:
        model: a `PipoForCausalLM` or a path to one.
        teacher_model: a causal LM (object or path) with the same vocabulary; never a PIPO model.
        args: a [`PipoOPDConfig`].
        train_dataset: records with prompts (`messages`, `prompt`, or `prompt_ids`); responses are only needed
            when `lmbda < 1`. Lists are converted to a `datasets.Dataset`.
        processing_class: the tokenizer.
        peft_config: custom peft config for `train_mode="lora"` (default: from the `lora_*` fields).
        rollout_fn: `fn(model, input_ids, **generate_kwargs)` returning an output with the PIPO generate fields
            (`pipo_slot_ids`, `pipo_slot_lengths`, `pipo_prompt_ids`, ...); defaults to `model.generate`. Hook
            for an external rollout engine.
    """

    # `opd_loss` is a per-micro-batch mean: Trainer divides by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args: PipoOPDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        rollout_fn=None,
    ):
        if args is None:
            args = PipoOPDConfig(output_dir="pipo-opd")
        if not isinstance(args, PipoOPDConfig):
            raise TypeError(f"PipoOPDTrainer needs a PipoOPDConfig, got {type(args).__name__}.")
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("PipoOPDTrainer needs a teacher_model (object or path), or teacher_model_name_or_path.")
        if not isinstance(teacher_model, str) and getattr(teacher_model.config, "model_type", None) == "pipo":
            raise ValueError("the teacher must be an ordinary causal LM, not a PIPO model (it scores PAD-free text).")
        if args.teacher_model_init_kwargs and not isinstance(teacher_model, str):
            raise ValueError("teacher_model_init_kwargs only apply to a teacher given by name; this one is already "
                             "instantiated.")
        model = load_pipo_model(model)
        apply_loss_settings(model, args)  # weights and chunk size live in the model config
        pad = pipo_base(model).config.pad_token_id
        if args.train_mode == "lora":
            if peft_config is None and not hasattr(model, "peft_config"):
                peft_config = args.make_lora_config()
            if not hasattr(model, "peft_config"):
                prepare_lora_base(model, args.output_dir, processing_class, args.should_save)
        from transformers import set_seed

        from .params import configure_trainable

        set_seed(args.seed)  # peft draws the adapter init: reproducible from the config's seed
        model = configure_trainable(model, args.train_mode, peft_config)
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if data_collator is None:
            data_collator = PipoDataCollator(
                tokenizer=processing_class,
                pad_token_id=pad,
                max_length=args.max_length,
                max_pad_ratio=args.max_pad_ratio,
                pad_augmentation=args.pad_augmentation,
                min_split_pairs=args.min_split_pairs,
                mask_response_prefix=args.mask_response_prefix,
                require_response=args.lmbda < 1.0 and not args.seq_kd,
                return_prompts=True,
            )
        if isinstance(teacher_model, str):
            teacher_model = _load_teacher(teacher_model, args)
        check_teacher_vocabulary(pipo_base(model), teacher_model, processing_class)
        args.remove_unused_columns = False
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=_as_dataset(train_dataset),
            eval_dataset=_as_dataset(eval_dataset),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        check_distributed_launch(self.accelerator)
        self.teacher_model = self._prepare_teacher(teacher_model)
        for param in self.teacher_model.parameters():
            param.requires_grad_(False)
        self.pad_token_id = pad
        self.rollout_fn = rollout_fn or _default_rollout
        self._init_components()
        self._evaluating = False

    def _prepare_teacher(self, teacher):
        """Place the frozen teacher like the student: a replica on every rank (DDP, FSDP2 without `shard_teacher`,
        ZeRO-2), partitioned under ZeRO-3, or sharded by FSDP2 with `shard_teacher`."""
        if self.args.shard_teacher and not getattr(self.accelerator, "is_fsdp2", False):
            raise ValueError("shard_teacher=True needs an FSDP2 launch (e.g. the `fsdp` accelerate config).")
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)  # on the device, unwrapped
        if self.args.shard_teacher:
            from accelerate.utils import fsdp2_prepare_model

            # The teacher only runs forward under no_grad: each unit gathers its shard in its own forward hook.
            teacher = fsdp2_prepare_model(self.accelerator, teacher)
        return teacher

    # -- rollout ----------------------------------------------------------------------------------------------------

    def rollout_kwargs(self) -> dict:
        args = self.args
        return {
            "do_sample": True,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "pad_token_id": self.pad_token_id,
        }

    @contextmanager
    def _generation_model(self, model):
        """The bare model for `generate`; under ZeRO-3 with its partitioned weights gathered for the rollout."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
            from trl.models import unwrap_model_for_generation

            with unwrap_model_for_generation(model, self.accelerator) as unwrapped:
                yield unwrapped
        else:
            yield self.accelerator.unwrap_model(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With probability `lmbda` replace the batch by a student rollout (else, with `seq_kd`, by teacher
        generations; else keep the dataset rows), then take an ordinary `Trainer` step on it."""
        if random.random() <= self.args.lmbda:
            with self._generation_model(model) as student:
                rows = self.generate_on_policy_outputs(student, inputs)
        elif self.args.seq_kd:
            with self._generation_model(self.teacher_model) as teacher:
                rows = self.generate_on_policy_outputs(teacher, inputs)
        else:
            rows = None
        if rows is not None:
            inputs = {**inputs, "input_ids": rows[0], "attention_mask": rows[1], "labels": rows[2]}
        return super().training_step(model, inputs, num_items_in_batch)

    def generate_on_policy_outputs(self, model, inputs):
        """Roll out from `inputs["prompts"]` and return `(input_ids, attention_mask, labels)` PIPO rows.

        A PIPO model (the student) rolls out in PIPO mode with τ = `pipo_confidence_threshold`; a plain causal LM
        (the teacher, for `seq_kd`) generates ordinarily and its text is laid out with the parity rules. Sampling
        settings come from the config.
        """
        if "prompts" not in inputs:
            raise ValueError("on-policy steps need 'prompts' in the batch (PipoDataCollator(return_prompts=True)).")
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        kwargs = {**self.rollout_kwargs(), "attention_mask": prompt_mask, "return_dict_in_generate": True}
        is_pipo = hasattr(pipo_base(model), "embed_pairs")
        if is_pipo:
            kwargs["pipo_confidence_threshold"] = self.args.pipo_confidence_threshold
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = self.rollout_fn(model, prompts, **kwargs)
        finally:
            model.train(was_training)
        device = prompts.device
        if is_pipo:
            if getattr(out, "pipo_slot_ids", None) is None:
                raise ValueError(
                    "the student's generate did not return PIPO rollout fields (pipo_slot_ids, pipo_slot_lengths, "
                    "pipo_prompt_ids); it must decode in PIPO mode with return_dict_in_generate=True."
                )
            rows = rollout_rows(out, self.pad_token_id)
            lengths = out.pipo_slot_lengths.float()
            real = torch.tensor(
                [sum(1 for t in out.pipo_slot_ids[b, : int(n)].tolist() if t != self.pad_token_id)
                 for b, n in enumerate(out.pipo_slot_lengths)],
                dtype=torch.float32,
            )
            stats = {"rollout_slots": lengths.mean(), "rollout_length": real.mean()}
            if getattr(out, "committed_drafts", None) is not None and getattr(out, "decode_steps", None) is not None:
                stats["rollout_commit_rate"] = out.commit_rate.mean()
            if getattr(out, "mean_confidence", None) is not None:
                stats["rollout_confidence"] = torch.nanmean(out.mean_confidence.float())
            self._record(stats, mode="eval" if self._evaluating else "train")
        else:
            sequences = out.sequences if hasattr(out, "sequences") else out
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            rows = sequence_rows(sequences, prompts.shape[1], prompt_mask, self.pad_token_id, eos)
        return pad_rows(rows, self.pad_token_id, device=device)

    # -- loss -------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("PipoOPDTrainer.compute_loss needs rollout rows (input_ids, attention_mask, labels).")
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP/FSDP/DeepSpeed see the whole student computation.
        loss, stats = call_through_wrapper(model, unwrapped, self._opd_loss, unwrapped, inputs)
        self._record(stats, mode="eval" if self._evaluating else "train")
        return (loss, None) if return_outputs else loss

    def _opd_loss(self, student, inputs):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.teacher_model, FSDPModule):
            # A sharded teacher runs inside its own root forward, so FSDP initialises and gathers it as one tree.
            return call_through_wrapper(
                self.teacher_model, self.teacher_model, self._opd_loss_with_teacher, student, inputs
            )
        return self._opd_loss_with_teacher(student, inputs)

    def _opd_loss_with_teacher(self, student, inputs):
        args = self.args
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        out = opd_loss(
            student,
            teacher,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["labels"],
            divergence=args.divergence,
            beta=args.beta,
            topk=args.divergence_topk,
            temperature=args.divergence_temperature,
            fill_pad_labels=args.fill_pad_labels,
        )
        with torch.no_grad():
            stats = {
                "backbone_loss": out.backbone_loss,
                "mtp_loss": out.mtp_loss,
                "confidence_loss": out.confidence_loss,
                "divergence_backbone": torch.nanmean(out.backbone_divergence),
                "divergence_mtp": torch.nanmean(out.mtp_divergence),
                "alpha_mean": torch.nanmean(out.alpha),
                "mean_confidence": torch.nanmean(out.confidence),
                "fill_fraction": out.filled.sum() / out.mtp_valid.sum().clamp(min=1),
            }
        return out.loss, stats

    # -- evaluation -------------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation = one on-policy rollout per batch + the OPD loss on it."""
        device = self.accelerator.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        unwrapped = self.accelerator.unwrap_model(model)
        self._evaluating = True
        try:
            ids, mask, labels = self.generate_on_policy_outputs(unwrapped, inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        finally:
            self._evaluating = False
        return loss.detach(), None, None


def _load_teacher(name: str, args: PipoOPDConfig):
    """Load a teacher given by path/Hub id with `teacher_model_init_kwargs` (a `dtype` may be named by string)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    teacher = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if getattr(teacher.config, "model_type", None) == "pipo":
        raise ValueError("the teacher must be an ordinary causal LM, not a PIPO model (it scores PAD-free text).")
    return teacher


def check_teacher_vocabulary(student, teacher, tokenizer=None) -> None:
    """Accept a teacher whose vocabulary is the student's or a prefix of it; refuse anything else, saying what to do.

    A prefix arises when `from_backbone` appended a PAD to the tokenizer: the teacher (same tokenizer, without the
    PAD) has fewer rows, and the student-only ids get `-inf` teacher logits in the loss (the PAD is never a target).
    When the teacher folder ships a tokenizer, every teacher token must have the same id in the student's.
    """
    from .losses import vocab_rows

    s_rows, t_rows = vocab_rows(student), vocab_rows(teacher)
    name = getattr(teacher, "name_or_path", "") or type(teacher).__name__
    if t_rows > s_rows:
        raise ValueError(
            f"the teacher {name} has {t_rows} vocabulary rows but the student only {s_rows}: OPD compares both models' "
            "next-token distributions id by id, so the teacher must use the student's tokenizer. Use a teacher of "
            "the student's model family, or convert the student (from_backbone) from a backbone with the "
            "teacher's tokenizer."
        )
    if t_rows == s_rows or tokenizer is None or not name or not isinstance(name, str):
        return
    try:
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001  (no tokenizer next to the teacher: nothing more to compare)
        return
    student_vocab = tokenizer.get_vocab()
    for token, index in teacher_tokenizer.get_vocab().items():
        if index < t_rows and student_vocab.get(token) != index:
            raise ValueError(
                f"the teacher {name} has {t_rows} vocabulary rows, fewer than the student's {s_rows}, but its "
                f"tokenizer is not a prefix of the student's (token {token!r} is id {index} for the teacher and "
                f"{student_vocab.get(token)} for the student). Use a teacher that shares the student's tokenizer."
            )


def _as_dataset(data):
    if data is None or not isinstance(data, list):
        return data
    from datasets import Dataset

    return Dataset.from_list(data)


__all__ = [
    "PipoOPDConfig",
    "PipoOPDTrainer",
    "rollout_rows",
    "sequence_rows",
    "pad_rows",
    "check_teacher_vocabulary",
]
