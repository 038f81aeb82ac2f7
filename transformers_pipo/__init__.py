"""transformers-pipo: Pair-In, Pair-Out decoding for any Hugging Face decoder-only LM."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pipo import PipoConfig
from .generation_pipo import PipoGenerateOutput
from .modeling_pipo import PipoCausalLMOutput, PipoForCausalLM, PipoPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("pipo", PipoConfig, exist_ok=True)
AutoModelForCausalLM.register(PipoConfig, PipoForCausalLM, exist_ok=True)
PipoConfig.register_for_auto_class()
PipoForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# Training classes load on first use, so importing the package never pulls in peft/trl.
_TRAINING_EXPORTS = ("PipoDataCollator", "PipoSFTConfig", "PipoSFTTrainer", "PipoOPDConfig", "PipoOPDTrainer")


def __getattr__(name):
    if name in _TRAINING_EXPORTS:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PipoConfig",
    "PipoForCausalLM",
    "PipoPreTrainedModel",
    "PipoCausalLMOutput",
    "PipoGenerateOutput",
    "__version__",
]
