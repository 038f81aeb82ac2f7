"""transformers-pipo: Pair-In, Pair-Out decoding for any Hugging Face decoder-only LM."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pipo import PipoConfig
from .modeling_pipo import PipoCausalLMOutput, PipoForCausalLM, PipoPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("pipo", PipoConfig, exist_ok=True)
AutoModelForCausalLM.register(PipoConfig, PipoForCausalLM, exist_ok=True)
PipoConfig.register_for_auto_class()
PipoForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PipoConfig", "PipoForCausalLM", "PipoPreTrainedModel", "PipoCausalLMOutput", "__version__"]
