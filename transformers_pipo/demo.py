"""The embedded demo models: a PIPO student and its base model for integer arithmetic.

Both were trained from scratch by the miniature reproduction in `examples/arithmetic` (see docs/RESULTS.md) and ship
inside the package, so `pipo demo` works offline on a fresh machine:

- `PIPO_MODEL_DIR`: the PIPO-SFT+OPD student (its generation_config holds the confidence threshold τ chosen on the
  validation split);
- `BASE_MODEL_DIR`: the ordinary causal LM it was converted from, decoded token by token as the baseline.

Both load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and work with
`pipeline("text-generation")`. Prompts use the task format `Q: <expression>\\nA:`; the answer is the integer after
`####` on the last line.
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

_EXPRESSION_RE = re.compile(r"\d{1,2}(?:[+\-*]\d{1,2}){1,3}")
_ANSWER_RE = re.compile(r"####\s*(-?\d+)\s*$")


def format_prompt(expression: str) -> str:
    return f"Q: {expression}\nA:"


def is_expression(text: str) -> bool:
    return bool(_EXPRESSION_RE.fullmatch(text))


def evaluate(expression: str) -> int:
    """Exact value of a task expression (`*` before `+`/`-`, left to right)."""
    if not is_expression(expression):
        raise ValueError(f"not a task expression: {expression!r}")
    parts = re.split(r"([+\-*])", expression)
    total, sign, product = 0, 1, int(parts[0])
    for op, value in zip(parts[1::2], parts[2::2]):
        if op == "*":
            product *= int(value)
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), int(value)
    return total + sign * product


def parse_answer(response: str) -> int | None:
    """The integer after `####` on the last non-empty line, or None."""
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_RE.search(lines[-1])
    return int(match.group(1)) if match else None


def held_out_problems(path=None) -> list[str]:
    """Held-out test expressions of the reproduction (never seen in training), shipped with the models."""
    with open(path or TEST_PROBLEMS_FILE) as f:
        return [json.loads(line)["expression"] for line in f if line.strip()]


def random_expression(rng: random.Random) -> str:
    """A task expression: 2-4 operands in [0, 99], operators from + - *."""
    parts = [str(rng.randint(0, 99))]
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice("+-*"), str(rng.randint(0, 99))]
    return "".join(parts)


def fresh_problems(n: int, seed: int | None = None, path=None) -> list[str]:
    """`n` distinct held-out problems drawn at random from the shipped test split (`seed` for a fixed draw); when no
    test split is available (e.g. custom models), new random expressions."""
    rng = random.Random(seed)
    file = Path(path) if path is not None else TEST_PROBLEMS_FILE
    if file.exists():
        pool = held_out_problems(file)
        return rng.sample(pool, min(n, len(pool)))
    return [random_expression(rng) for _ in range(n)]


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


def solve(model, tokenizer, expression: str, *, threshold: float | None = None, max_new_tokens: int = 256,
          do_sample: bool = False, streamer=None) -> Solution:
    """Answer one problem (batch 1) with `model`: PIPO decoding for a PIPO model (τ = `threshold`, else the
    model's generation_config), ordinary decoding otherwise. Timing covers the whole `generate` call."""
    import torch

    enc = tokenizer(format_prompt(expression), return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True, streamer=streamer)
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    pipo = getattr(model.config, "model_type", None) == "pipo"
    if pipo and threshold is not None:
        kwargs["pipo_confidence_threshold"] = threshold
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    real = [t for t in new if t != tokenizer.pad_token_id]
    text = tokenizer.decode(real, skip_special_tokens=True)
    answer = parse_answer(text)
    expected = evaluate(expression)
    steps = int(out.decode_steps[0]) if pipo else len(real)
    committed = int(out.committed_drafts[0]) if pipo else 0
    return Solution(expression, expected, text, answer, answer == expected, len(real), steps, committed, seconds)


def compare(n: int = 6, *, threshold: float | None = None, seed: int | None = None, models=None, progress=None,
            problems_file=None):
    """Solve `n` fresh problems with PIPO and with regular decoding of the base model, side by side (greedy).

    Returns `{"threshold", "problems": [{"pipo": Solution, "regular": Solution}], "summary": {...}}`. The first
    problem is solved once by both models before timing starts (warm-up).
    """
    pipo, base, tok = models or load_models()
    tau = threshold if threshold is not None else getattr(pipo.generation_config, "pipo_confidence_threshold", None)
    expressions = fresh_problems(n, seed, problems_file)
    solve(pipo, tok, expressions[0], threshold=tau, max_new_tokens=8)  # warm-up
    solve(base, tok, expressions[0], max_new_tokens=8)
    results = []
    iterator = progress(expressions) if progress is not None else expressions
    for expression in iterator:
        results.append({"pipo": solve(pipo, tok, expression, threshold=tau),
                        "regular": solve(base, tok, expression)})

    def total(key, attr):
        return sum(getattr(r[key], attr) for r in results)

    pipo_tps = total("pipo", "tokens") / max(1e-9, total("pipo", "seconds"))
    base_tps = total("regular", "tokens") / max(1e-9, total("regular", "seconds"))
    summary = {
        "n": len(results),
        "pipo_accuracy": sum(r["pipo"].correct for r in results) / max(1, len(results)),
        "regular_accuracy": sum(r["regular"].correct for r in results) / max(1, len(results)),
        "commit_rate": total("pipo", "committed_drafts") / max(1, total("pipo", "backbone_steps")),
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


__all__ = ["PIPO_MODEL_DIR", "BASE_MODEL_DIR", "load_models", "solve", "compare", "fresh_problems", "evaluate",
           "parse_answer", "format_prompt"]
