"""The `pipo` command line: `pipo --help` lists the subcommands.

Each subcommand lives in `transformers_pipo.commands.<name>` and exposes `register(subparsers)`, which adds its parser
and sets `func` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `pipo --help` shows them.
COMMAND_MODULES = ["info", "convert_reference", "demo", "generate", "train"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipo",
        description="PIPO (Pair-In, Pair-Out) tools for Hugging Face causal LMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"transformers_pipo.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
