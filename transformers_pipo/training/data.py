"""Reading PIPO training records: JSONL with `messages` (chat template) or `prompt` + `response` fields.

Every record becomes `{"prompt_ids": [...], "response_ids": [...]}` (token ids, no PIPO PAD yet). Records that cannot be
used are reported with their line number; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

RESPONSE_KEYS = ("response", "completion")


class PipoDataError(ValueError):
    """A training record (or a whole file) cannot be turned into a PIPO example; the message says which and why."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, chat_template_kwargs: dict | None) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise PipoDataError(
            "record has 'messages' but the tokenizer has no chat_template; set tokenizer.chat_template or use "
            "'prompt'/'response' fields"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
    )


def _encode_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise PipoDataError("'messages' must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PipoDataError(f"messages[{i}] must be a dict with 'role' and 'content'")


def encode_record(
    record: dict,
    tokenizer,
    *,
    require_response: bool = True,
    add_eos: bool = True,
    chat_template_kwargs: dict | None = None,
    pad_token_id: int | None = None,
) -> dict[str, list[int]]:
    """Tokenise one record into `prompt_ids` and `response_ids`.

    Accepted layouts:

    - `{"messages": [...]}`: the last message is the response when its role is `assistant`; the prompt is the chat
      template applied to the earlier messages with `add_generation_prompt=True` (so it ends with the generation
      prefix, e.g. `<|im_start|>assistant\\n<think>\\n`). The response is the rest of the full rendering, which must
      start with the prompt rendering. Without a final assistant message the record is prompt-only.
    - `{"prompt": str | messages, "response" | "completion": str | messages}`: a string prompt is tokenised as is
      (with the tokenizer's special tokens), a message list through the chat template with a generation prompt; a
      string response is tokenised without special tokens and gets EOS appended (`add_eos`).
    - already tokenised `{"prompt_ids": [...], "response_ids": [...]}` is passed through.

    Prompt-only records are accepted when `require_response=False` (on-policy distillation needs prompts only);
    their `response_ids` is `[]`. Raises [`PipoDataError`] naming the problem.
    """
    if not isinstance(record, dict):
        raise PipoDataError(f"record must be a JSON object, got {type(record).__name__}")
    if "prompt_ids" in record:
        prompt_ids = [int(t) for t in record["prompt_ids"]]
        response_ids = [int(t) for t in (record.get("response_ids") or [])]
    elif "messages" in record:
        messages = record["messages"]
        _check_messages(messages)
        if messages[-1]["role"] == "assistant":
            if len(messages) < 2:
                raise PipoDataError("'messages' holds only an assistant message; there is no prompt")
            prompt_text = _render(tokenizer, messages[:-1], True, chat_template_kwargs)
            full_text = _render(tokenizer, messages, False, chat_template_kwargs)
            if not full_text.startswith(prompt_text):
                raise PipoDataError(
                    "the chat template renders the prompt (add_generation_prompt=True) differently from the start of "
                    "the full conversation, so the prompt/response boundary is ambiguous; fix the template or use "
                    "'prompt'/'response' fields"
                )
            prompt_ids = _encode_text(tokenizer, prompt_text, add_special_tokens=False)
            response_ids = _encode_text(tokenizer, full_text[len(prompt_text) :], add_special_tokens=False)
        else:
            prompt_ids = _encode_text(
                tokenizer, _render(tokenizer, messages, True, chat_template_kwargs), add_special_tokens=False
            )
            response_ids = []
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt_ids = _encode_text(tokenizer, prompt, add_special_tokens=True)
        else:
            _check_messages(prompt)
            prompt_ids = _encode_text(
                tokenizer, _render(tokenizer, prompt, True, chat_template_kwargs), add_special_tokens=False
            )
        key = next((k for k in RESPONSE_KEYS if k in record), None)
        response = None if key is None else record[key]
        if response is None:
            response_ids = []
        elif isinstance(response, str):
            response_ids = _encode_text(tokenizer, response, add_special_tokens=False)
            if add_eos and response_ids is not None:
                if tokenizer.eos_token_id is None:
                    raise PipoDataError("add_eos=True but the tokenizer has no eos_token_id")
                response_ids = response_ids + [tokenizer.eos_token_id]
        elif isinstance(response, list) and response and isinstance(response[0], dict):
            _check_messages(response)
            if not isinstance(prompt, list):
                raise PipoDataError(f"'{key}' is a message list but 'prompt' is a string; use the same layout for both")
            prompt_text = _render(tokenizer, prompt, True, chat_template_kwargs)
            full_text = _render(tokenizer, prompt + response, False, chat_template_kwargs)
            if not full_text.startswith(prompt_text):
                raise PipoDataError(
                    "the chat template renders the prompt differently from the start of the full conversation"
                )
            response_ids = _encode_text(tokenizer, full_text[len(prompt_text) :], add_special_tokens=False)
        else:
            raise PipoDataError(f"'{key}' must be a string or a list of messages, got {type(response).__name__}")
    else:
        raise PipoDataError(
            "record has none of 'messages', 'prompt' or 'prompt_ids' (keys: " + ", ".join(sorted(record)) + ")"
        )
    if not prompt_ids:
        raise PipoDataError("the prompt is empty after tokenisation")
    if require_response and not response_ids:
        raise PipoDataError("the record has no response (or it is empty after tokenisation)")
    if pad_token_id is not None and (pad_token_id in prompt_ids or pad_token_id in response_ids):
        raise PipoDataError(
            f"the record contains the PIPO PAD token (id {pad_token_id}); PAD is reserved for rejected drafts"
        )
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """`(line_number, parsed_object)` for every non-blank line; malformed JSON raises with all bad line numbers."""
    rows, errors = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                errors.append((number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
    if errors:
        raise PipoDataError(_format_errors(path, errors))
    return rows


def _format_errors(path, errors: Sequence[tuple[int, str]], limit: int = 20) -> str:
    lines = [f"{path}: {len(errors)} bad record(s):"]
    lines += [f"  line {n}: {msg}" for n, msg in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def read_rows(
    name: str | os.PathLike, config: str | None = None, split: str = "train"
) -> tuple[str, list[tuple[int, Any]]]:
    """`(what, [(row_number, record), ...])` from data as trl users bring it.

    `name` is a JSON Lines file (`.jsonl`, or `.json` holding JSON Lines or one JSON array), a `.parquet` file, a
    folder written by `datasets` `save_to_disk` (a `Dataset`, or a `DatasetDict` from which `split` is taken), or a
    Hub data set id loaded with `datasets.load_dataset(name, config, split=split)`. Row numbers are file lines for
    JSON Lines and 1-based row indices otherwise; `what` names the source in error messages.
    """
    path = os.fspath(name)
    lower = path.lower()
    if os.path.isfile(path):
        if lower.endswith(".parquet"):
            from datasets import Dataset

            return path, _numbered(Dataset.from_parquet(path))
        if lower.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                head = handle.read(4096).lstrip()
            if head.startswith("["):
                with open(path, encoding="utf-8") as handle:
                    try:
                        data = json.load(handle)
                    except json.JSONDecodeError as exc:
                        raise PipoDataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
                return path, list(enumerate(data, start=1))
        return path, read_jsonl(path)
    if os.path.isdir(path):
        from datasets import Dataset, DatasetDict, load_from_disk

        if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json",
                                                                      "state.json")):
            raise PipoDataError(f"{path}: a folder, but not one written by datasets' save_to_disk")
        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PipoDataError(f"{path}: no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
        assert isinstance(data, Dataset)
        return f"{path} [{split}]", _numbered(data)
    if path.startswith((".", "/", "~")) or lower.endswith((".json", ".jsonl", ".parquet", ".csv")):
        raise PipoDataError(f"{path}: no such file or folder")
    from datasets import load_dataset

    data = load_dataset(path, config, split=split)
    return f"{path} [{split}]", _numbered(data)


def _numbered(dataset) -> list[tuple[int, Any]]:
    return [(i, dict(row)) for i, row in enumerate(dataset, start=1)]


def load_records(
    path: str | os.PathLike,
    tokenizer,
    *,
    require_response: bool = True,
    add_eos: bool = True,
    chat_template_kwargs: dict | None = None,
    pad_token_id: int | None = None,
    progress: bool = True,
    dataset_config: str | None = None,
    split: str = "train",
) -> list[dict]:
    """Read and tokenise records into `{"prompt_ids", "response_ids", "line"}` records.

    `path` is anything [`read_rows`] reads: a JSONL/JSON/parquet file, a `save_to_disk` folder or a Hub data set id
    (with `dataset_config` and `split`).

    All problems are collected and raised together as one [`PipoDataError`] listing each line number and reason, so
    a file is either fully usable or rejected with a complete report.
    """
    what, rows = read_rows(path, dataset_config, split)
    path = what
    iterator: Iterable = rows
    if progress and len(rows) > 1000:
        from tqdm.auto import tqdm

        iterator = tqdm(rows, desc=f"tokenising {os.path.basename(str(path))}", unit="rec")
    records, errors = [], []
    for number, obj in iterator:
        try:
            encoded = encode_record(
                obj,
                tokenizer,
                require_response=require_response,
                add_eos=add_eos,
                chat_template_kwargs=chat_template_kwargs,
                pad_token_id=pad_token_id,
            )
        except PipoDataError as exc:
            errors.append((number, str(exc)))
            continue
        encoded["line"] = number
        records.append(encoded)
    if errors:
        raise PipoDataError(_format_errors(path, errors))
    if not records:
        raise PipoDataError(f"{path}: no records found")
    return records


__all__ = ["PipoDataError", "encode_record", "load_records", "read_jsonl", "read_rows"]
