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


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import transformers_pipo

    info = {
        "transformers_pipo": transformers_pipo.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        if config.model_type != "pipo":
            raise SystemExit(f"pipo info: {args.model} is a '{config.model_type}' checkpoint, not a PIPO one.")
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
        }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:<{width}} {v}")
            else:
                print(f"{key:<{width}} {value}")
    return 0
