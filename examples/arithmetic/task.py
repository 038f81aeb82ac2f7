"""The arithmetic task of the miniature PIPO reproduction (fixed format; outside checks draw their own problems).

- Problems: 2 or 3 integer operands in [0, 999] joined by ``+`` or ``-``, no spaces, evaluated left to right; the
  value may be negative.
- Prompt: ``Q: <expression>\\nA:``.
- Response: a chain of thought ending with the line ``#### <integer result>`` (EOS is appended by the tokenizer side,
  not here). The task definition itself (generator, exact evaluator, answer parser and THE scorer `is_correct`) lives
  in `transformers_pipo.demo`, so that `pipo demo` and this pipeline's evaluator score with one function.

The chain of thought is designed for a tiny character-level transformer with rotary positions: one line per
operation, fixed width, and every digit a function of a few tokens at *constant* distances before it (no counting).
Numbers are written as a sign and 4 digits least-significant first ("rev4": 123 -> ``3210``). A line is

    <sign><|acc| rev4><op><operand rev4>:<carries rev4><digits rev4>[~<carries rev4><digits rev4>]=<sign><|result| rev4>

When the sign of the running value and the sign the operator gives the operand agree, the magnitudes are added;
otherwise the operand's magnitude is subtracted from the running magnitude. ``<carries>`` holds each column's
carry (addition) or borrow (subtraction) out, ``<digits>`` each column's result digit; column i's carry sits 10 tokens
after the running value's digit i and its result digit 14 tokens after it. A subtraction whose last column borrows
went below zero: a ``~`` follows and the reverse subtraction (operand minus running magnitude) is written, whose
result takes the operand's sign. The result is copied at the end of the line, so the next line copies it from 6
tokens back. Zero is always ``+0000``. The last two lines give the value with 4 digits in normal order and the answer
``#### <value>``.

    Q: 123+456-789
    A: +3210+6540:00009750=+9750
    +9750-9870:01110979~00000120=-0120
    -0210
    #### -210
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers_pipo.demo import (  # the task definition shared with `pipo demo`
    MAX_OPERAND,
    MAX_OPERANDS,
    MIN_OPERANDS,
    OPERATORS,
    evaluate,
    format_prompt,
    is_correct,
    parse_answer,
    parse_expression,
    random_expression,
)

WIDTH = 4  # digits of every magnitude in the chain of thought (|running value| ≤ 2997)


@dataclass(frozen=True)
class Problem:
    expression: str
    answer: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.expression)


def tokenize_expression(expression: str) -> tuple[list[int], list[str]]:
    """Operands and operators of `expression` (ValueError when it is not a task expression)."""
    return parse_expression(expression)


def rev4(n: int) -> str:
    """``n`` (0 ≤ n < 10⁴) as 4 digits, least-significant first."""
    return f"{n:0{WIDTH}d}"[::-1]


def _columns(a: int, b: int, subtract: bool) -> tuple[str, str, int]:
    """``a ± b`` column by column, least-significant first: (carries/borrows out, result digits, final carry)."""
    carries, digits, c = [], [], 0
    for i in range(WIDTH):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        d = da - db - c if subtract else da + db + c
        c = int(d < 0) if subtract else int(d >= 10)
        carries.append(str(c))
        digits.append(str(d % 10))
    return "".join(carries), "".join(digits), c


def step_line(acc: int, op: str, operand: int) -> tuple[str, int]:
    """One chain-of-thought line computing ``acc op operand``; returns the line and the new running value."""
    sign_acc = "-" if acc < 0 else "+"
    sign_operand = "+" if op == "+" else "-"
    magnitude = abs(acc)
    line = f"{sign_acc}{rev4(magnitude)}{op}{rev4(operand)}:"
    if sign_acc == sign_operand:
        carries, digits, _ = _columns(magnitude, operand, subtract=False)
        line += carries + digits
        result, sign = magnitude + operand, sign_acc
    else:
        carries, digits, borrow = _columns(magnitude, operand, subtract=True)
        line += carries + digits
        if borrow:
            carries, digits, _ = _columns(operand, magnitude, subtract=True)
            line += "~" + carries + digits
            result, sign = operand - magnitude, sign_operand
        else:
            result, sign = magnitude - operand, sign_acc
    if result == 0:
        sign = "+"
    return f"{line}={sign}{rev4(result)}", result if sign == "+" else -result


def chain_of_thought(expression: str) -> str:
    """The reference response (without EOS) for an expression, ending with ``#### <value>``."""
    operands, operators = parse_expression(expression)
    lines, acc = [], operands[0]
    for op, operand in zip(operators, operands[1:]):
        line, acc = step_line(acc, op, operand)
        lines.append(line)
    assert acc == evaluate(expression)
    lines.append(f"{'-' if acc < 0 else '+'}{abs(acc):0{WIDTH}d}")
    lines.append(f"#### {acc}")
    return " " + "\n".join(lines)


def make_splits(
    seed: int = 0, n_train: int = 100_000, n_val: int = 500, n_test: int = 500
) -> dict[str, list[Problem]]:
    """Seeded, disjoint train/validation/test splits (no expression appears in two splits or twice in one).

    The evaluation splits are drawn first from their own streams, so they do not change when ``n_train`` does.
    """
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for offset, (name, size) in enumerate((("test", n_test), ("validation", n_val), ("train", n_train))):
        rng = random.Random(f"pipo-arithmetic-v2/{seed}/{offset}")
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
ALPHABET = tuple("0123456789+-=:~#QA \n")

__all__ = [
    "ALPHABET", "MAX_OPERAND", "MAX_OPERANDS", "MIN_OPERANDS", "OPERATORS", "Problem", "WIDTH", "chain_of_thought",
    "evaluate", "format_prompt", "is_correct", "make_splits", "parse_answer", "random_expression", "rev4", "step_line",
    "tokenize_expression",
]
