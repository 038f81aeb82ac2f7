"""The embedded demo models and the arithmetic task they were trained on.

Both models were trained from scratch by the miniature reproduction in `examples/arithmetic` (see docs/RESULTS.md)
and ship inside the package, so `pipo demo` works offline on a fresh machine:

- `PIPO_MODEL_DIR`: the PIPO-SFT+OPD student (its generation_config holds the confidence threshold τ chosen on the
  validation split);
- `BASE_MODEL_DIR`: the ordinary causal LM it was converted from, decoded token by token as the baseline.

They are package data: config, weights, generation config and tokenizer, **no code** (no `.py` files, no
`auto_map`). The `pipo` model type resolves to this package's classes, which `import transformers_pipo` registers, so
both load with `AutoModelForCausalLM.from_pretrained(path)` (with or without `trust_remote_code`) and work with
`pipeline("text-generation")`. [`save_embedded_model`] writes them (the reproduction's export stage calls it); a
checkpoint meant for sharing is written by `save_pretrained`/`push_to_hub`, which add the remote-code files.

This module also holds the task definition, once: prompts `Q: <expression>\\nA:` where the expression has 2 or 3
integers in [0, 999] joined by `+` or `-` (no spaces, evaluated left to right); a response is correct when the integer
after `####` on its last line equals the value (`is_correct`). The reproduction's evaluator imports these same
functions, so the demo and the reported accuracies score alike.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "arithmetic"
PIPO_MODEL_DIR = ASSETS_DIR / "pipo_student"
BASE_MODEL_DIR = ASSETS_DIR / "student_base"
TEST_PROBLEMS_FILE = ASSETS_DIR / "test_problems.jsonl"

# The task (fixed; outside checks draw their own problems): 2 or 3 integer operands in [0, 999] joined by + or -,
# no spaces, evaluated left to right; the value may be negative. The response ends with the line `#### <int>`.
OPERATORS = ("+", "-")
MIN_OPERANDS, MAX_OPERANDS = 2, 3
MAX_OPERAND = 999

_EXPRESSION_RE = re.compile(r"\d{1,3}(?:[+\-]\d{1,3}){1,2}")
_ANSWER_RE = re.compile(r"####\s*(-?\d+)\s*$")


def format_prompt(expression: str) -> str:
    return f"Q: {expression}\nA:"


def is_expression(text: str) -> bool:
    """Whether `text` is a task expression (operands without leading zeros; ``"0"`` itself is fine)."""
    if not isinstance(text, str) or not _EXPRESSION_RE.fullmatch(text):
        return False
    return all(len(part) == 1 or part[0] != "0" for part in re.split(r"[+\-]", text))


def parse_expression(expression: str) -> tuple[list[int], list[str]]:
    """Split ``"123+45-6"`` into operands ``[123, 45, 6]`` and operators ``["+", "-"]``; ValueError if malformed."""
    if not is_expression(expression):
        raise ValueError(
            f"not a task expression: {expression!r} (expected {MIN_OPERANDS}-{MAX_OPERANDS} integers in "
            f"[0, {MAX_OPERAND}] without leading zeros, joined by + or -, no spaces)"
        )
    parts = re.split(r"([+\-])", expression)
    return [int(x) for x in parts[0::2]], parts[1::2]


def evaluate(expression: str) -> int:
    """Exact value of a task expression, left to right."""
    operands, operators = parse_expression(expression)
    total = operands[0]
    for op, value in zip(operators, operands[1:]):
        total = total + value if op == "+" else total - value
    return total


def parse_answer(response: str) -> int | None:
    """The integer after `####` on the last non-empty line, or None."""
    if not isinstance(response, str):
        return None
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_RE.search(lines[-1])
    return int(match.group(1)) if match else None


def is_correct(response: str, expression: str) -> bool:
    """THE scorer of the task: used by `pipo demo` and by the reproduction's evaluator alike. A response is correct
    when the integer after the last line's `####` equals the exact value of `expression`."""
    value = parse_answer(response)
    return value is not None and value == evaluate(expression)


def random_expression(rng: random.Random) -> str:
    """A fresh task expression: 2 or 3 operands drawn uniformly from [0, 999], operators from + and -."""
    parts = [str(rng.randint(0, MAX_OPERAND))]
    for _ in range(rng.randint(MIN_OPERANDS, MAX_OPERANDS) - 1):
        parts += [rng.choice(OPERATORS), str(rng.randint(0, MAX_OPERAND))]
    return "".join(parts)


def held_out_problems(path=None) -> list[str]:
    """Held-out test expressions of the reproduction (never seen in training), shipped with the models."""
    with open(path or TEST_PROBLEMS_FILE) as f:
        return [json.loads(line)["expression"] for line in f if line.strip()]


def fresh_problems(n: int, seed: int | None = None) -> list[str]:
    """`n` distinct fresh expressions of the task family, drawn at random (`seed` for a fixed draw). They are new
    draws, not the shipped test split: with about 2·10⁹ possible expressions a draw almost never repeats a
    training problem."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        expression = random_expression(rng)
        if expression not in out:
            out.append(expression)
    return out


def save_embedded_model(model, folder, tokenizer=None) -> None:
    """Save `model` (and `tokenizer`) as package data: weights, config, generation config, no remote code.

    `save_pretrained` of a PIPO model copies its `.py` files and writes `auto_map`, which a shared checkpoint needs;
    the embedded models are loaded by the installed package instead, so both are left out here (the code exists
    once, in the package). No model card either: the assets' README describes them.
    """
    config = model.config
    # `save_pretrained` ships code when the class is registered for an auto class (`is_remote_code()` reads the
    # class attribute): lift the registration for this one save, and drop an `auto_map` read from a saved folder.
    classes = [(cls, cls.__dict__.get("_auto_class", _UNSET)) for cls in (type(model), type(config))]
    auto_map = config.__dict__.pop("auto_map", _UNSET)
    try:
        for cls, _ in classes:
            cls._auto_class = None
        card = {"model_card": False} if getattr(config, "model_type", None) == "pipo" else {}
        model.save_pretrained(folder, **card)
    finally:
        for cls, value in classes:
            if value is _UNSET:
                del cls._auto_class
            else:
                cls._auto_class = value
        if auto_map is not _UNSET:
            config.auto_map = auto_map
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    leftovers = sorted(p.name for p in Path(folder).glob("*.py"))
    if leftovers:
        raise RuntimeError(f"{folder}: remote-code files written for an embedded model: {leftovers}")


_UNSET = object()


def load_models(pipo_dir=None, base_dir=None):
    """`(pipo_model, base_model, tokenizer)` in eval mode, on CPU, from the embedded folders by default."""
    import transformers_pipo  # noqa: F401  (registers the PIPO classes with the Auto factories)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pipo_dir = Path(pipo_dir or PIPO_MODEL_DIR)
    base_dir = Path(base_dir or BASE_MODEL_DIR)
    if not (pipo_dir / "config.json").exists():
        raise FileNotFoundError(
            f"no model at {pipo_dir}: the embedded demo models are missing from this install (they are written by "
            "`python -m examples.arithmetic.run_pipeline --stages export`)."
        )
    tokenizer = AutoTokenizer.from_pretrained(pipo_dir)
    tokenizer.padding_side = "left"
    pipo = AutoModelForCausalLM.from_pretrained(pipo_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return pipo, base, tokenizer


@dataclass
class Solution:
    expression: str
    expected: int
    response: str
    answer: int | None
    correct: bool
    tokens: int
    backbone_steps: int
    committed_drafts: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def solve(model, tokenizer, expression: str, *, pipo_confidence_threshold: float | None = None,
          max_new_tokens: int = 128, do_sample: bool = False, streamer=None) -> Solution:
    """Answer one problem (batch 1) with `model`: PIPO decoding for a PIPO model (τ = `pipo_confidence_threshold`,
    else the model's generation_config), ordinary decoding otherwise. Timing covers the whole `generate` call."""
    import torch

    enc = tokenizer(format_prompt(expression), return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True, streamer=streamer)
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    pipo = getattr(model.config, "model_type", None) == "pipo"
    if pipo and pipo_confidence_threshold is not None:
        kwargs["pipo_confidence_threshold"] = pipo_confidence_threshold
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    real = [t for t in new if t != tokenizer.pad_token_id]
    text = tokenizer.decode(real, skip_special_tokens=True)
    steps = int(out.decode_steps[0]) if pipo else len(real)
    committed = int(out.committed_drafts[0]) if pipo else 0
    return Solution(expression, evaluate(expression), text, parse_answer(text), is_correct(text, expression),
                    len(real), steps, committed, seconds)


def compare(n: int = 8, *, pipo_confidence_threshold: float | None = None, seed: int | None = None, models=None,
            progress=None):
    """Solve `n` fresh problems with PIPO and with regular decoding of the base model, side by side (greedy).

    Returns `{"threshold", "problems": [{"pipo": Solution, "regular": Solution}], "summary": {...}}`. The first
    problem is solved once by both models before timing starts (warm-up).
    """
    from .generation_pipo import commit_rate

    pipo, base, tok = models or load_models()
    tau = pipo_confidence_threshold if pipo_confidence_threshold is not None else getattr(pipo.generation_config, "pipo_confidence_threshold", None)
    expressions = fresh_problems(n, seed)
    solve(pipo, tok, expressions[0], pipo_confidence_threshold=tau, max_new_tokens=8)  # warm-up
    solve(base, tok, expressions[0], max_new_tokens=8)
    results = []
    iterator = progress(expressions) if progress is not None else expressions
    for expression in iterator:
        results.append({"pipo": solve(pipo, tok, expression, pipo_confidence_threshold=tau),
                        "regular": solve(base, tok, expression)})

    def total(key, attr):
        return sum(getattr(r[key], attr) for r in results)

    pipo_tps = total("pipo", "tokens") / max(1e-9, total("pipo", "seconds"))
    base_tps = total("regular", "tokens") / max(1e-9, total("regular", "seconds"))
    summary = {
        "n": len(results),
        "pipo_accuracy": sum(r["pipo"].correct for r in results) / max(1, len(results)),
        "regular_accuracy": sum(r["regular"].correct for r in results) / max(1, len(results)),
        "commit_rate": commit_rate(total("pipo", "committed_drafts"), total("pipo", "backbone_steps")),
        "tokens_per_backbone_step": total("pipo", "tokens") / max(1, total("pipo", "backbone_steps")),
        "pipo_tokens_per_s": pipo_tps,
        "regular_tokens_per_s": base_tps,
        "speedup": pipo_tps / base_tps if base_tps > 0 else float("nan"),
    }
    return {"threshold": tau, "problems": results, "summary": summary}


def as_json(report: dict) -> dict:
    return {
        "threshold": report["threshold"],
        "summary": report["summary"],
        "problems": [{k: {**asdict(v), "tokens_per_second": v.tokens_per_second} for k, v in r.items()}
                     for r in report["problems"]],
    }


__all__ = ["PIPO_MODEL_DIR", "BASE_MODEL_DIR", "save_embedded_model", "load_models", "solve", "compare", "fresh_problems", "evaluate",
           "parse_answer", "is_correct", "parse_expression", "random_expression", "format_prompt"]
