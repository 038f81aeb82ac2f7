"""`pipo info`: versions of the stack, and a summary of a PIPO checkpoint when one is given."""

from __future__ import annotations

import argparse
import json
import platform


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="Show versions, devices and (optionally) a PIPO checkpoint summary.")
    parser.add_argument("model", nargs="?", help="Path or Hub id of a PIPO checkpoint to summarise (config only).")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    parser.set_defaults(func=run)


# Distributions whose versions matter for loading, training and quantizing PIPO models.
STACK = ("transformers", "torch", "peft", "trl", "accelerate", "bitsandbytes", "safetensors", "datasets")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import transformers_pipo

    # Versions come from the installed metadata: importing trl/bitsandbytes just to read a string would be slow.
    info = {"transformers_pipo": transformers_pipo.__version__}
    info.update({dist: _version(dist) for dist in STACK})
    info["python"] = platform.python_version()
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if args.model:
        from transformers import AutoConfig

        from transformers import GenerationConfig

        config = AutoConfig.from_pretrained(args.model)
        if config.model_type != "pipo":
            raise SystemExit(f"pipo info: {args.model} is a '{config.model_type}' checkpoint, not a PIPO one.")
        try:
            generation = GenerationConfig.from_pretrained(args.model)
        except OSError:  # no generation_config.json: the decoder's default applies
            generation = None
        tau = getattr(generation, "pipo_confidence_threshold", None)
        backbone = config.backbone_config
        info["model"] = {
            "path": args.model,
            "backbone_model_type": backbone.model_type,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": backbone.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "compressor_type": config.compressor_type,
            "pad_token_id": config.pad_token_id,
            "eos_token_ids": config.eos_token_ids,
            "norm_style": config.norm_style,
            "confidence_threshold": tau if tau is not None else "not set (decoder default)",
            "max_prompt_tokens": 2 * backbone.max_position_embeddings
            if getattr(backbone, "max_position_embeddings", None) else "unknown",
        }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in [*info, *info.get("model", {})]) + 2
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:<{width}} {v}")
            else:
                print(f"{key:<{width}} {value}")
    return 0
