"""The `pipo` command line: `pipo --help` lists the subcommands.

Each subcommand lives in `transformers_pipo.commands.<name>` and exposes `register(subparsers)`, which adds its parser
and sets `func` (called with the parsed namespace, returning an exit code).

User errors (unknown flags, missing or broken model folders, bad values, unreadable data) end with one line on stderr
and exit code 2; `--debug` (anywhere on the command line) shows the traceback and the warnings of optional
dependencies that are silenced otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
import warnings

# Subcommand modules, in the order `pipo --help` shows them.
COMMAND_MODULES = ["info", "convert_reference", "demo", "generate", "train"]
# Namespace attributes holding a model location, checked locally before anything is loaded.
MODEL_PATH_ARGS = ("model", "pipo_model", "base_model")
# Loggers of optional dependencies that print import-time noise (torchao's missing CUDA `.so` files, torch's pytree
# deprecation of Enum constants registered by torchao, bitsandbytes' optional `kernels` package).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes", "accelerate.utils.modeling")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line on stderr with exit code 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class PipoArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and a closest-match hint for unknown options."""

    def error(self, message: str):  # noqa: D401  (argparse API)
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]!r}?"
        raise UsageError(message, prog=self.prog)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def max_prompt_tokens(config) -> int | None:
    """How many tokens the model can hold: 2 × the backbone's positions for PIPO (one position per pair), the
    position limit for a plain causal LM; None when the config sets none."""
    is_pipo = getattr(config, "model_type", None) == "pipo"
    backbone = config.get_text_config() if hasattr(config, "get_text_config") else config
    if is_pipo and getattr(config, "backbone_config", None) is not None:
        backbone = config.backbone_config
    positions = getattr(backbone, "max_position_embeddings", None) or getattr(backbone, "n_positions", None)
    if not positions:
        return None
    return 2 * int(positions) if is_pipo else int(positions)


def check_prompt_length(n_tokens: int, config) -> None:
    """Refuse a prompt longer than the model can hold (see `max_prompt_tokens`)."""
    limit = max_prompt_tokens(config)
    if limit is not None and n_tokens > limit:
        what = ("a PIPO model holds 2 × max_position_embeddings tokens (one position per pair)"
                if getattr(config, "model_type", None) == "pipo" else "its max_position_embeddings")
        raise UsageError(f"the prompt has {n_tokens} tokens but the model holds at most {limit} ({what}); "
                         "shorten the prompt")


def suggest_options(unknown: list[str], known: list[str]) -> str:
    """`unknown option --max-new-token (did you mean --max-new-tokens?)` for the first unknown flag."""
    flags = [u for u in unknown if u.startswith("-")]
    if not flags:
        return "unexpected argument(s): " + " ".join(unknown)
    flag = flags[0].split("=", 1)[0]
    candidates = [k for k in known if k.startswith("--")]
    # Compare without dashes and with '-'/'_' unified, so '--max_new_tokens' finds '--max-new-tokens'.
    norm: dict[str, str] = {}
    for k in candidates:  # the first spelling registered (the underscore one for HfArgumentParser flags) wins
        norm.setdefault(re.sub(r"[-_]", "", k).lower(), k)
    close = difflib.get_close_matches(re.sub(r"[-_]", "", flag).lower(), list(norm), n=1, cutoff=0.6)
    hint = f" (did you mean {norm[close[0]]}?)" if close else ""
    more = f" and {len(flags) - 1} more" if len(flags) > 1 else ""
    return f"unknown option {flag}{hint}{more}"


def quiet_optional_dependencies(loading_bars: bool = False) -> None:
    """Silence import-time warnings of optional dependencies and library deprecation chatter (and, unless
    `loading_bars`, transformers' weight-loading progress bars; training keeps its progress bar either way)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers' own warnings and its weight-loading bars, once it is imported (not before: keeps --help fast).
    from transformers_pipo import after_transformers_import

    after_transformers_import(lambda module: _quiet_transformers(module, loading_bars))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")


def _quiet_transformers(transformers, loading_bars: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not loading_bars:
        hf_logging.disable_progress_bar()


def check_model_path(value: str | None, flag: str) -> None:
    """Fail early, without a Hub call, on a model location that cannot be right.

    A local folder must hold `config.json` (or a peft `adapter_config.json`); a value that is clearly a path (starts
    with `.`, `/` or `~`, or its first component is an existing folder) and does not exist is an error; a Hub id that
    is not in the local cache is an error while the Hub is offline (`HF_HUB_OFFLINE`) or its host does not resolve.
    """
    if value is None:
        return
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
            raise UsageError(f"{flag} {value}: the folder has no config.json, so it is not a saved model")
        return
    if os.path.exists(path):
        raise UsageError(f"{flag} {value} is a file; pass the folder that holds config.json")
    first = path.replace("\\", "/").split("/", 1)[0]
    is_path = value.startswith((".", "/", "~")) or (bool(first) and os.path.isdir(first) and "/" in path)
    if not is_path and _HUB_ID.match(value) and _in_hub_cache(value):
        return  # a Hub id already downloaded: loads from the cache, offline too
    offline = _hub_offline()
    if is_path or offline or not _HUB_ID.match(value):
        parent = os.path.dirname(os.path.abspath(path))
        hint = ""
        if os.path.isdir(parent):
            close = difflib.get_close_matches(os.path.basename(path.rstrip("/")), os.listdir(parent), n=1)
            if close:
                hint = f" (did you mean {os.path.join(os.path.dirname(value.rstrip('/')), close[0])}?)"
        why = "" if is_path or not offline else " and the Hub is offline (HF_HUB_OFFLINE)"
        raise UsageError(f"{flag} {value}: no such folder{why}{hint}")
    if not _hub_reachable():
        # Without this, huggingface_hub retries for about a minute before saying the same.
        raise UsageError(f"{flag} {value}: no such local folder, and the Hub cannot be reached to look it up")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001  (an id the cache cannot even parse is not in it)
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host name resolves (a cheap, bounded probe; no request is sent)."""
    import socket
    import threading
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:  # pragma: no cover
        host = "huggingface.co"
    result: list[bool] = []

    def probe():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0]) if result else True  # undecided within the timeout: let the Hub call try


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def corrupt_safetensors(folders: list[str]) -> str | None:
    """The first `.safetensors` file under `folders` that does not open, with the reason; None when all open."""
    from safetensors import safe_open

    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".safetensors"):
                continue
            file = os.path.join(folder, name)
            try:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_slice(key)
            except Exception as err:  # noqa: BLE001  (any failure to read is what we report)
                return f"{file} is not a readable safetensors file ({err}); re-save or re-download it"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = PipoArgumentParser(
        prog="pipo",
        description="PIPO (Pair-In, Pair-Out) tools for Hugging Face causal LMs.",
        epilog="Add --debug anywhere to see tracebacks and the warnings of optional dependencies.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=PipoArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"transformers_pipo.commands.{name}").register(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest:
            return action.option_strings[-1] if action.option_strings else dest.upper()
    return f"--{dest}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if type(err).__name__ == "PipoDataError":  # a per-line report of a data file: keep it whole
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [text]
    out = lines[0]
    for line in lines[1:3]:  # "... from one of:" / "... the following:" continue on the next line(s)
        if not out.endswith(":"):
            break
        out = f"{out} {line}"
    return out


def _model_folders(args: argparse.Namespace | None) -> list[str]:
    folders = []
    for attr in (*MODEL_PATH_ARGS, "model_folders"):
        value = getattr(args, attr, None) if args is not None else None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and os.path.isdir(os.path.expanduser(v)):
                folders.append(os.path.expanduser(v))
    return folders


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    prog, args = "pipo", None
    try:
        args, unknown = parser.parse_known_args(argv)
        command = getattr(args, "command", None)
        if not debug:  # before any heavy import
            quiet_optional_dependencies(loading_bars=command == "train")
        prog = f"pipo {command}" if command else "pipo"
        if getattr(args, "train_command", None):
            prog += f" {args.train_command}"
        if unknown and command != "train":
            sub = _subparser(parser, command)
            raise UsageError(suggest_options(unknown, list(sub._option_string_actions)))
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        args.debug = debug
        sub = _subparser(parser, command)
        for attr in MODEL_PATH_ARGS:
            if isinstance(getattr(args, attr, None), str):
                check_model_path(getattr(args, attr), _flag(sub, attr))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code in (0, None):  # --help / --version: argparse's own clean exit
            raise
        if isinstance(exc.code, str):  # `raise SystemExit("message")` in a command: a user error
            message = exc.code
            for prefix in (f"{prog}: ", "pipo train: ", "pipo: "):
                message = message[len(prefix):] if message.startswith(prefix) else message
            if debug:
                raise
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        return exc.code or 0
    except Exception as exc:  # noqa: BLE001  (every failure ends in one readable line)
        if debug:
            raise
        broken = corrupt_safetensors(_model_folders(args)) if _looks_like_file_error(exc) else None
        if isinstance(exc, UsageError) and exc.prog:
            prog = exc.prog
        if broken:
            print(f"{prog}: error: {broken}", file=sys.stderr)
            return 2
        if isinstance(exc, (UsageError, ValueError, OSError)):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(exc).__name__}: {_one_line(exc)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _looks_like_file_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("safetensor", "deserializ", "header", "metadata", "incomplete"))


if __name__ == "__main__":
    sys.exit(main())
