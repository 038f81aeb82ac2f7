"""The arithmetic task of examples/arithmetic: generator, exact evaluator, chain of thought, answer parser/scorer."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.arithmetic import task  # noqa: E402

operand = st.integers(min_value=0, max_value=999)
operator = st.sampled_from(task.OPERATORS)


@st.composite
def expressions(draw):
    n = draw(st.integers(min_value=2, max_value=3))
    parts = [str(draw(operand))]
    for _ in range(n - 1):
        parts += [draw(operator), str(draw(operand))]
    return "".join(parts)


def reference_value(expression: str) -> int:
    """Python's own integer evaluation (+ and - are left-associative there too) as an independent oracle."""
    return eval(expression, {"__builtins__": {}}, {})  # only digits and + - reach here


@pytest.mark.parametrize(
    "expression,value",
    [("123+456-789", -210), ("0-999-999", -1998), ("999+999+999", 2997), ("5-3", 2), ("10-20-30", -40),
     ("1-2+3", 2), ("0+0", 0), ("500-500", 0), ("7-900+893", 0)],
)
def test_evaluate_left_to_right(expression, value):
    assert task.evaluate(expression) == value


@pytest.mark.parametrize(
    "bad", ["", "47", "1+2+3+4", "1000+1", "1++2", "-1+2", "1+2-", "1 + 2", "01+2", "1*2", "1/2", "(1+2)", "1+2\n",
            None]
)
def test_tokenize_rejects_malformed(bad):
    with pytest.raises(ValueError):
        task.tokenize_expression(bad)


@given(expressions())
@settings(max_examples=300, deadline=None)
def test_evaluate_matches_python(expression):
    assert task.evaluate(expression) == reference_value(expression)


LINE_RE = re.compile(r"^([+-])(\d{4})([+-])(\d{4}):(\d{4})(\d{4})(?:~(\d{4})(\d{4}))?=([+-])(\d{4})$")


def _rev(digits: str) -> int:
    return int(digits[::-1])


def _check_columns(carries: str, digits: str, a: int, b: int, subtract: bool) -> tuple[int, int]:
    """Re-derive every column independently: carry/borrow out and result digit; returns (value mod 10^4, last c)."""
    c = 0
    for i in range(4):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        raw = da - db - c if subtract else da + db + c
        c = int(raw < 0) if subtract else int(raw >= 10)
        assert int(carries[i]) == c and int(digits[i]) == raw % 10, (carries, digits, a, b, i)
    return _rev(digits), c


@given(expressions())
@settings(max_examples=400, deadline=None)
def test_chain_of_thought_lines_are_exact(expression):
    """Every line: the running value and the operand copied right (reversed, 4 digits), each column's carry/borrow
    and digit right, the reverse subtraction exactly when the first one borrows out, the result signed and copied
    right; then the value in normal order and the answer line."""
    cot = task.chain_of_thought(expression)
    value = task.evaluate(expression)
    assert cot.startswith(" ") and task.parse_answer(cot) == value
    assert task.is_correct(cot, expression)
    assert not task.is_correct(cot.replace(f"#### {value}", f"#### {value + 1}"), expression)
    operands, operators = task.tokenize_expression(expression)
    lines = cot.strip().split("\n")
    assert len(lines) == len(operands) + 1 and lines[-1] == f"#### {value}"
    assert lines[-2] == ("-" if value < 0 else "+") + f"{abs(value):04d}"
    acc = operands[0]
    for line, op, b in zip(lines[:-2], operators, operands[1:]):
        m = LINE_RE.match(line)
        assert m, line
        sa, mag, lop, bb, carries, digits, carries2, digits2, sr, res = m.groups()
        assert (sa == "-") == (acc < 0) and _rev(mag) == abs(acc) and lop == op and _rev(bb) == b
        subtract = sa != ("+" if op == "+" else "-")
        got, c = _check_columns(carries, digits, abs(acc), b, subtract)
        if subtract and c:
            assert carries2 is not None
            got, _ = _check_columns(carries2, digits2, b, abs(acc), True)
        else:
            assert carries2 is None
        acc = acc + b if op == "+" else acc - b
        assert _rev(res) == got == abs(acc) and sr == ("-" if acc < 0 else "+")
    assert acc == value


def test_chain_of_thought_example():
    assert task.chain_of_thought("123+456-789") == (
        " +3210+6540:00009750=+9750\n+9750-9870:01110979~00000120=-0120\n-0210\n#### -210")
    assert task.chain_of_thought("0-0") == " +0000-0000:00000000=+0000\n+0000\n#### 0"


def test_chain_of_thought_keeps_digit_dependencies_at_constant_distances():
    """The design promise the docstring makes: in every line a column's carry sits 10 tokens and its digit 14
    tokens after the running value's digit of that column, and the next line's running value 6 tokens after the
    previous result (checked on the text itself)."""
    rng = random.Random(5)
    for _ in range(200):
        cot = task.chain_of_thought(task.random_expression(rng))
        lines = cot.strip().split("\n")[:-2]
        for k, line in enumerate(lines):
            a = abs(int(line[1:5][::-1]))
            b = int(line[6:10][::-1])
            assert line[10] == ":" and line[11 + 4 + 4] in "~="
            for i in range(4):
                assert line[1 + i] == str((a // 10**i) % 10) and line[6 + i] == str((b // 10**i) % 10)
            if k:
                text = "\n".join(lines)
                start = sum(len(x) + 1 for x in lines[:k])
                assert text[start - 6: start - 1] == line[:5]  # sign + rev4 copied from 6 tokens back


@given(expressions())
@settings(max_examples=100, deadline=None)
def test_prompt_format(expression):
    assert task.format_prompt(expression) == f"Q: {expression}\nA:"
    assert set(task.format_prompt(expression) + task.chain_of_thought(expression)) <= set(task.ALPHABET)


@pytest.mark.parametrize(
    "response,expected",
    [
        (" 1+2=3\n#### 3", 3),
        ("#### -42", -42),
        ("#### -42\n\n", -42),
        ("x\n####   7  ", 7),
        ("#### 3\nmore text", None),
        ("no answer", None),
        ("", None),
        ("#### ", None),
        ("#### 1.5", None),
        ("#### 12abc", None),
        (" 1\n#### 4\n#### 5", 5),
    ],
)
def test_parse_answer(response, expected):
    assert task.parse_answer(response) == expected


def test_splits_are_seeded_disjoint_and_valid():
    a = task.make_splits(seed=3, n_train=2000, n_val=500, n_test=500)
    b = task.make_splits(seed=3, n_train=2000, n_val=500, n_test=500)
    assert a == b
    sets = {name: {p.expression for p in probs} for name, probs in a.items()}
    assert len(sets["train"]) == 2000 and len(sets["validation"]) == 500 and len(sets["test"]) == 500
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    # Evaluation splits do not depend on the train size.
    c = task.make_splits(seed=3, n_train=10, n_val=500, n_test=500)
    assert c["test"] == a["test"] and c["validation"] == a["validation"]
    assert task.make_splits(seed=4, n_train=10, n_val=10, n_test=500)["test"] != a["test"]
    for problem in a["train"][:500]:
        operands, _ = task.tokenize_expression(problem.expression)
        assert 2 <= len(operands) <= 3 and all(0 <= x <= 999 for x in operands)
        assert problem.answer == reference_value(problem.expression)
        assert problem.prompt == f"Q: {problem.expression}\nA:"


def test_generator_covers_the_task():
    rng = random.Random(0)
    exprs = [task.random_expression(rng) for _ in range(3000)]
    counts = {n: 0 for n in (2, 3)}
    for e in exprs:
        counts[len(task.tokenize_expression(e)[0])] += 1
    assert all(c > 1200 for c in counts.values())
    values = [task.evaluate(e) for e in exprs]
    assert min(values) < -1000 and max(values) > 2000
    assert {op for e in exprs for op in task.tokenize_expression(e)[1]} == set(task.OPERATORS)
    assert max(int(x) for e in exprs for x in re.split(r"[+-]", e)) >= 990


def test_chain_of_thought_length():
    rng = random.Random(1)
    lengths = [len(task.chain_of_thought(task.random_expression(rng))) for _ in range(2000)]
    assert 45 <= sum(lengths) / len(lengths) <= 65  # one token per character with the example tokenizer
    assert max(lengths) <= 90
