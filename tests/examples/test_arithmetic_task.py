"""The arithmetic task of examples/arithmetic: generator, exact evaluator, chain of thought, answer parser."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.arithmetic import task  # noqa: E402

operand = st.integers(min_value=0, max_value=99)
operator = st.sampled_from(task.OPERATORS)


@st.composite
def expressions(draw):
    n = draw(st.integers(min_value=2, max_value=4))
    parts = [str(draw(operand))]
    for _ in range(n - 1):
        parts += [draw(operator), str(draw(operand))]
    return "".join(parts)


def reference_value(expression: str) -> int:
    """Python's own integer evaluation (same precedence rules) as an independent oracle."""
    return eval(expression, {"__builtins__": {}}, {})  # only digits and + - * reach here


@pytest.mark.parametrize(
    "expression,value",
    [
        ("47*83-5", 3896),
        ("2+3*4", 14),
        ("2*3+4", 10),
        ("10-20-30", -40),
        ("5-3*7", -16),
        ("99*99*99*99", 96059601),
        ("0*57+8", 8),
        ("8-0*5", 8),
        ("1-2+3", 2),
        ("6*7-8*9", -30),
    ],
)
def test_evaluate_precedence(expression, value):
    assert task.evaluate(expression) == value


@pytest.mark.parametrize(
    "bad", ["", "47", "1+2+3+4+5", "100+1", "1++2", "-1+2", "1+2-", "1 + 2", "01+2", "1/2", "(1+2)", "1+2\n", None]
)
def test_tokenize_rejects_malformed(bad):
    with pytest.raises(ValueError):
        task.tokenize_expression(bad)


@given(expressions())
@settings(max_examples=300, deadline=None)
def test_evaluate_matches_python(expression):
    assert task.evaluate(expression) == reference_value(expression)


@given(expressions())
@settings(max_examples=300, deadline=None)
def test_chain_of_thought_lines_are_true_and_end_with_answer(expression):
    cot = task.chain_of_thought(expression)
    value = task.evaluate(expression)
    assert task.parse_answer(cot) == value
    assert task.is_correct(cot, value)
    assert not task.is_correct(cot, value + 1)
    for line in cot.strip().splitlines()[:-1]:
        left, eq, right = line.partition("=")
        if eq:  # every computed line is an exact identity
            assert reference_value(left) == reference_value(right), line


@given(expressions())
@settings(max_examples=100, deadline=None)
def test_prompt_format(expression):
    prompt = task.format_prompt(expression)
    assert prompt == f"Q: {expression}\nA:"
    assert " " not in expression


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
    a = task.make_splits(seed=3, n_train=2000, n_val=200, n_test=300)
    b = task.make_splits(seed=3, n_train=2000, n_val=200, n_test=300)
    assert a == b
    sets = {name: {p.expression for p in probs} for name, probs in a.items()}
    assert len(sets["train"]) == 2000 and len(sets["validation"]) == 200 and len(sets["test"]) == 300
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    # Evaluation splits do not depend on the train size.
    c = task.make_splits(seed=3, n_train=10, n_val=200, n_test=300)
    assert c["test"] == a["test"] and c["validation"] == a["validation"]
    assert task.make_splits(seed=4, n_train=10, n_val=10, n_test=300)["test"] != a["test"]
    for problem in a["train"][:500]:
        operands, operators = task.tokenize_expression(problem.expression)
        assert 2 <= len(operands) <= 4 and all(0 <= x <= 99 for x in operands)
        assert problem.answer == reference_value(problem.expression)
        assert problem.prompt == f"Q: {problem.expression}\nA:"


def test_generator_covers_the_task():
    rng = random.Random(0)
    exprs = [task.random_expression(rng) for _ in range(3000)]
    counts = {n: 0 for n in (2, 3, 4)}
    for e in exprs:
        counts[len(task.tokenize_expression(e)[0])] += 1
    assert all(c > 500 for c in counts.values())
    assert any(task.evaluate(e) < 0 for e in exprs)
    assert {op for e in exprs for op in task.tokenize_expression(e)[1]} == set(task.OPERATORS)


def test_chain_of_thought_length():
    rng = random.Random(1)
    lengths = [len(task.chain_of_thought(task.random_expression(rng))) for _ in range(2000)]
    mean = sum(lengths) / len(lengths)
    assert 40 <= mean <= 150  # character tokens: one token per character with the example tokenizer
    assert max(lengths) < 256
