"""PIPO training: data collator, SFT and on-policy-distillation trainers, LoRA helpers.

Not imported by the remote-code files (configuration/modeling/generation); needs the `train` extra
(`pip install transformers-pipo[train]`: peft, trl, datasets; trl only for the OPD teacher and rollouts under
DeepSpeed).
"""

from .collator import PipoDataCollator, augment_response
from .data import PipoDataError, encode_record, load_records
from .opd import PipoOPDConfig, PipoOPDTrainer
from .params import configure_trainable, lora_config, set_trainable
from .sft import PipoSFTConfig, PipoSFTTrainer, save_merged

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
