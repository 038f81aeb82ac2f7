"""`--fast-path` for the CLI commands: which of transformers' decoding paths `generate` takes.

- `eager`: dynamic caches, no compilation (transformers' default);
- `static`: static caches (PIPO: sized in latents), eager;
- `compiled`: static caches + `torch.compile` of the decode step (PIPO: the two-phase step), also on CPU;
- `auto` (default): `compiled` on CUDA, where decode is launch-bound and CUDA graphs pay off at once; `eager` on CPU,
  where a cold compile costs about a minute and saves a few ms per token, so it only pays off after tens of
  thousands of tokens (see the README's benchmark table).

The choice is written into each model's `generation_config` (`cache_implementation`, `compile_config`,
`disable_compile`), the same switches a Python user sets.
"""

from __future__ import annotations

import argparse

FAST_PATHS = ("auto", "eager", "static", "compiled")


def add_fast_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fast-path", choices=FAST_PATHS, default="auto",
        help="Decoding path: eager (dynamic cache), static (static cache), compiled (static cache + torch.compile); "
             "auto = compiled on CUDA, eager on CPU (default).",
    )


def resolve_fast_path(choice: str, device) -> str:
    if choice == "auto":
        return "compiled" if str(device).startswith("cuda") else "eager"
    return choice


def apply_fast_path(models, choice: str) -> str:
    """Set the generation-config switches of `models` for `choice`; returns the resolved path."""
    from transformers.generation.configuration_utils import CompileConfig

    resolved = resolve_fast_path(choice, next(models[0].parameters()).device)
    for model in models:
        config = model.generation_config
        if resolved == "eager":
            config.cache_implementation = None
            continue
        config.cache_implementation = "static"
        config.disable_compile = resolved != "compiled"
        if resolved == "compiled":
            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers compiles on CPU only when told to
            config.compile_config = compile_config
    return resolved
