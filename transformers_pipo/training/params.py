"""Which PIPO parameters train (DESIGN §1.7): `full`, `heads` or `lora` (peft, new modules as `modules_to_save`).

The input embedding and the LM head (tied or not) are frozen in every mode.
"""

from __future__ import annotations

from torch import nn

from ..modeling_pipo import PIPO_HEADS

TRAIN_MODES = ("full", "heads", "lora")
# Reference LoRA targets (DESIGN §1.7): attention and MLP projections, matched by suffix in the backbone and the MTP layer.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# New PIPO modules trained in full next to the adapters (checkpoint keys `base_model.model.model.<name>`).
DEFAULT_MODULES_TO_SAVE = [
    "compressor",
    "confidence_head",
    "mtp.fc",
    "mtp.pre_fc_norm_embedding",
    "mtp.pre_fc_norm_hidden",
    "mtp.norm",
]


def _frozen_ids(model: nn.Module) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


def set_trainable(model: nn.Module, mode: str) -> dict[str, int]:
    """Set `requires_grad` for `mode` in {"full", "heads"} on a plain PIPO model; returns parameter counts."""
    if mode not in ("full", "heads"):
        raise ValueError(f"set_trainable handles 'full' and 'heads'; got {mode!r} (LoRA goes through apply_lora).")
    frozen = _frozen_ids(model)
    for name, param in model.named_parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
        elif mode == "full":
            param.requires_grad_(True)
        else:
            param.requires_grad_(any(name.startswith(f"model.{head}.") for head in PIPO_HEADS))
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    seen, total, trainable = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable}


def lora_config(
    r: int = 64,
    alpha: int = 128,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
):
    """The reference LoRA setup: adapters on attention/MLP projections, the new PIPO modules fully trained."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(DEFAULT_LORA_TARGETS) if target_modules is None else target_modules,
        modules_to_save=list(DEFAULT_MODULES_TO_SAVE) if modules_to_save is None else list(modules_to_save),
    )


def apply_lora(model: nn.Module, peft_config):
    """Wrap a PIPO model with peft; the embedding and LM head stay frozen (never adapted)."""
    from peft import get_peft_model

    head = model.get_output_embeddings()
    targets = peft_config.target_modules
    if isinstance(targets, (list, set, tuple)) and "lm_head" in targets:
        raise ValueError("LoRA target_modules must not include lm_head: PIPO keeps the LM head frozen (DESIGN §1.7).")
    peft_model = get_peft_model(model, peft_config)
    for param in head.parameters():
        param.requires_grad_(False)
    return peft_model


def configure_trainable(model: nn.Module, mode: str, peft_config=None):
    """Apply `mode` and return the model to train (a `PeftModel` for `lora`)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {mode!r}.")
    if _is_peft(model):
        if mode != "lora":
            raise ValueError(f"train_mode={mode!r} but the model already carries a peft adapter.")
        return model
    if mode == "lora":
        if peft_config is None:
            raise ValueError("train_mode='lora' needs a peft config (see lora_config()).")
        return apply_lora(model, peft_config)
    if peft_config is not None:
        raise ValueError(f"a peft config was given but train_mode={mode!r}; use train_mode='lora'.")
    set_trainable(model, mode)
    return model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


__all__ = [
    "TRAIN_MODES",
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_MODULES_TO_SAVE",
    "set_trainable",
    "count_parameters",
    "lora_config",
    "apply_lora",
    "configure_trainable",
]
