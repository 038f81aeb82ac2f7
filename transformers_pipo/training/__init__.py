"""PIPO training: data collator, SFT and on-policy-distillation trainers, LoRA helpers.

Not imported by the remote-code files (configuration/modeling/generation); needs the `train` extra
(`pip install transformers-pipo[train]`: peft, trl, datasets). `PipoOPDTrainer` is imported lazily because it pulls
in trl.
"""

from .collator import PipoDataCollator, augment_response
from .data import PipoDataError, encode_record, load_records
from .params import configure_trainable, lora_config, set_trainable
from .sft import PipoSFTConfig, PipoSFTTrainer, save_merged

_LAZY = {"PipoOPDConfig": "opd", "PipoOPDTrainer": "opd"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PipoDataCollator",
    "PipoDataError",
    "PipoSFTConfig",
    "PipoSFTTrainer",
    "PipoOPDConfig",
    "PipoOPDTrainer",
    "augment_response",
    "configure_trainable",
    "encode_record",
    "load_records",
    "lora_config",
    "save_merged",
    "set_trainable",
]
