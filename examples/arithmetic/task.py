"""The arithmetic task of the miniature PIPO reproduction (fixed format; other checks rely on it).

- Problems: integer expressions with 2 to 4 operands in [0, 99], operators from {+, -, *}, usual precedence, no
  parentheses, no spaces. The value may be negative.
- Prompt: ``Q: <expression>\\nA:``.
- Response: a step-by-step chain of thought ending with the line ``#### <integer result>`` (EOS is appended by the
  tokenizer side, not here). A response is correct when the integer after the last ``####`` equals the exact value.

The chain of thought first folds every multiplication chain left to right. A product whose right factor has two
digits is split into tens and units (``47*83=47*80+47*3``), so that every line a model must compute is a product by a
single digit, a product by a multiple of ten, or an addition. Then the remaining sum is folded left to right.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPERATORS = ("+", "-", "*")
MIN_OPERANDS, MAX_OPERANDS = 2, 4
MAX_OPERAND = 99

_EXPRESSION_RE = re.compile(r"^\d{1,2}(?:[+\-*]\d{1,2})*$")
_ANSWER_RE = re.compile(r"####\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    expression: str
    answer: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.expression)


def format_prompt(expression: str) -> str:
    return f"Q: {expression}\nA:"


def tokenize_expression(expression: str) -> tuple[list[int], list[str]]:
    """Split ``"47*83-5"`` into operands ``[47, 83, 5]`` and operators ``["*", "-"]``; raise ValueError if malformed.

    Operands must be integers in [0, 99] written without sign, spaces or leading zeros (``"0"`` itself is fine).
    """
    if not isinstance(expression, str) or not _EXPRESSION_RE.fullmatch(expression):
        raise ValueError(f"not a task expression: {expression!r}")
    operands: list[int] = []
    operators: list[str] = []
    for part in re.split(r"([+\-*])", expression):
        if part in OPERATORS:
            operators.append(part)
            continue
        if len(part) > 1 and part[0] == "0":
            raise ValueError(f"operand with a leading zero in {expression!r}")
        operands.append(int(part))
    if not MIN_OPERANDS <= len(operands) <= MAX_OPERANDS:
        raise ValueError(f"{expression!r} has {len(operands)} operands; the task uses {MIN_OPERANDS}..{MAX_OPERANDS}")
    return operands, operators


def _terms(operands: list[int], operators: list[str]) -> list[tuple[int, list[int]]]:
    """Group into signed product terms: ``47*83-5`` -> ``[(+1, [47, 83]), (-1, [5])]``."""
    terms = [(1, [operands[0]])]
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1][1].append(value)
        else:
            terms.append((1 if op == "+" else -1, [value]))
    return terms


def evaluate(expression: str) -> int:
    """Exact value with the usual precedence (``*`` before ``+``/``-``, left to right); independent of ``eval``."""
    total = 0
    for sign, factors in _terms(*tokenize_expression(expression)):
        product = 1
        for factor in factors:
            product *= factor
        total += sign * product
    return total


def _multiply_lines(left: int, right: int) -> list[str]:
    """Lines computing ``left*right``: one line when a factor is a single digit or ``right`` is a multiple of ten,
    else the tens/units split."""
    product = left * right
    tens, units = divmod(right, 10)
    if left < 10 or right < 10 or units == 0:
        return [f"{left}*{right}={product}"]
    high, low = left * tens * 10, left * units
    return [
        f"{left}*{right}={left}*{tens}0+{left}*{units}",
        f"{left}*{tens}0={high}",
        f"{left}*{units}={low}",
        f"{high}+{low}={product}",
    ]


def chain_of_thought(expression: str) -> str:
    """The reference response (without EOS) for an expression, ending with ``#### <value>``."""
    operands, operators = tokenize_expression(expression)
    lines: list[str] = []
    values: list[tuple[int, int]] = []
    for sign, factors in _terms(operands, operators):
        acc = factors[0]
        for factor in factors[1:]:
            lines.extend(_multiply_lines(acc, factor))
            acc *= factor
        values.append((sign, acc))
    if len(values) > 1:
        reduced = str(values[0][1]) + "".join(("+" if s > 0 else "-") + str(v) for s, v in values[1:])
        if "*" in operators:
            lines.append(reduced)
        acc = values[0][1]
        for sign, value in values[1:]:
            new = acc + sign * value
            lines.append(f"{acc}{'+' if sign > 0 else '-'}{value}={new}")
            acc = new
    else:
        acc = values[0][1]
    assert acc == evaluate(expression)
    lines.append(f"#### {acc}")
    return " " + "\n".join(lines)


def parse_answer(response: str) -> int | None:
    """The integer after the last ``####`` on the final non-empty line, or None when there is none."""
    if not isinstance(response, str):
        return None
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_RE.search(lines[-1])
    return int(match.group(1)) if match else None


def is_correct(response: str, answer: int) -> bool:
    value = parse_answer(response)
    return value is not None and value == answer


def random_expression(rng: random.Random) -> str:
    n = rng.randint(MIN_OPERANDS, MAX_OPERANDS)
    parts = [str(rng.randint(0, MAX_OPERAND))]
    for _ in range(n - 1):
        parts.append(rng.choice(OPERATORS))
        parts.append(str(rng.randint(0, MAX_OPERAND)))
    return "".join(parts)


def make_splits(
    seed: int = 0, n_train: int = 100_000, n_val: int = 500, n_test: int = 500
) -> dict[str, list[Problem]]:
    """Seeded, disjoint train/validation/test splits (no expression appears in two splits or twice in one).

    The evaluation splits are drawn first from their own streams, so they do not change when ``n_train`` does.
    """
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for offset, (name, size) in enumerate((("test", n_test), ("validation", n_val), ("train", n_train))):
        rng = random.Random(f"pipo-arithmetic/{seed}/{offset}")
        problems: list[Problem] = []
        while len(problems) < size:
            expression = random_expression(rng)
            if expression in seen:
                continue
            seen.add(expression)
            problems.append(Problem(expression, evaluate(expression)))
        splits[name] = problems
    return splits


# Every character the task's texts can contain (the tokenizer vocabulary is trained on the corpus and must cover it).
ALPHABET = tuple("0123456789+-*=#QA: \n")
