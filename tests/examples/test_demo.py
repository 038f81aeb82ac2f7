"""The embedded demo models (transformers_pipo.demo) and the `pipo demo` / `pipo generate` commands.

The models are small enough (a few MB) for CI: each test loads them from the package folder on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.arithmetic import task  # noqa: E402
from transformers_pipo import demo  # noqa: E402

# Held-out test problems that the shipped models solve with greedy decoding (checked when the assets were exported).
SOLVED_BY_PIPO = ["95*10", "0*15*44*15", "0*42"]
SOLVED_BY_BASE = ["95*10", "0*15*44*15", "0*42"]


@st.composite
def expressions(draw):
    n = draw(st.integers(min_value=2, max_value=4))
    parts = [str(draw(st.integers(0, 99)))]
    for _ in range(n - 1):
        parts += [draw(st.sampled_from("+-*")), str(draw(st.integers(0, 99)))]
    return "".join(parts)


@given(expressions())
@settings(max_examples=200, deadline=None)
def test_demo_task_helpers_agree_with_the_task_module(expression):
    assert demo.evaluate(expression) == task.evaluate(expression)
    assert demo.format_prompt(expression) == task.format_prompt(expression)
    cot = task.chain_of_thought(expression)
    assert demo.parse_answer(cot) == task.parse_answer(cot) == task.evaluate(expression)


def test_random_expressions_are_task_expressions():
    import random

    rng = random.Random(0)
    for _ in range(200):
        task.tokenize_expression(demo.random_expression(rng))


def test_assets_exist_and_are_small():
    assert (demo.PIPO_MODEL_DIR / "config.json").exists()
    assert (demo.BASE_MODEL_DIR / "config.json").exists()
    total = sum(f.stat().st_size for f in demo.ASSETS_DIR.rglob("*") if f.is_file())
    assert total <= 25 * 2**20
    held_out = demo.held_out_problems()
    assert len(held_out) >= 300
    assert set(held_out) == {p.expression for p in task.make_splits(0, n_train=0, n_val=0, n_test=len(held_out))["test"]}


@pytest.mark.parametrize("which", ["pipo", "base"])
def test_embedded_models_load_with_remote_code(which):
    from transformers import AutoModelForCausalLM

    path = demo.PIPO_MODEL_DIR if which == "pipo" else demo.BASE_MODEL_DIR
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert (model.config.model_type == "pipo") == (which == "pipo")
    if which == "pipo":
        tau = model.generation_config.pipo_confidence_threshold
        assert 0 <= tau < 1


@pytest.mark.parametrize("which,problems", [("pipo", SOLVED_BY_PIPO), ("base", SOLVED_BY_BASE)])
def test_embedded_models_answer_through_pipeline(which, problems):
    from transformers import pipeline

    path = str(demo.PIPO_MODEL_DIR if which == "pipo" else demo.BASE_MODEL_DIR)
    generator = pipeline("text-generation", model=path, trust_remote_code=True, device="cpu")
    for expression in problems:
        out = generator(demo.format_prompt(expression), max_new_tokens=256, do_sample=False, return_full_text=False)
        text = out[0]["generated_text"]
        assert demo.parse_answer(text) == task.evaluate(expression), (expression, text)


def test_solve_reports_pipo_statistics():
    pipo, base, tok = demo.load_models()
    torch.manual_seed(0)
    s = demo.solve(pipo, tok, SOLVED_BY_PIPO[0])
    assert s.correct and s.expected == task.evaluate(SOLVED_BY_PIPO[0])
    assert s.backbone_steps < s.tokens  # more than one token per backbone step
    assert 0 <= s.committed_drafts <= s.backbone_steps
    r = demo.solve(base, tok, SOLVED_BY_BASE[0])
    assert r.backbone_steps == r.tokens and r.committed_drafts == 0


def test_pipo_demo_json(capsys):
    from transformers_pipo.cli import main

    assert main(["demo", "--n", "2", "--seed", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["problems"]) == 2
    summary = report["summary"]
    assert 0 <= summary["commit_rate"] <= 1
    assert summary["pipo_tokens_per_s"] > 0 and summary["regular_tokens_per_s"] > 0
    for row in report["problems"]:
        assert row["pipo"]["expected"] == task.evaluate(row["pipo"]["expression"])


def test_pipo_demo_text(capsys):
    from transformers_pipo.cli import main

    assert main(["demo", "--n", "1", "--seed", "1", "--threshold", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "commit rate   0.0%" in out  # τ >= 1 never commits a draft


def test_pipo_generate_streams(capsys):
    from transformers_pipo.cli import main

    assert main(["generate", "--prompt", SOLVED_BY_PIPO[0]]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"Q: {SOLVED_BY_PIPO[0]}\nA:")
    assert demo.parse_answer(captured.out.split("A:", 1)[1]) == task.evaluate(SOLVED_BY_PIPO[0])
    assert "commit rate" in captured.err


def test_embedded_remote_code_matches_the_package():
    """The embedded PIPO folder ships the remote-code files; they must be the package's current ones.

    After changing a remote-code module, copy it into the asset folder (or re-save the model) to refresh them.
    """
    import transformers_pipo

    package_dir = Path(transformers_pipo.__file__).parent
    shipped = sorted(demo.PIPO_MODEL_DIR.glob("*.py"))
    assert {p.name for p in shipped} >= {"configuration_pipo.py", "modeling_pipo.py", "generation_pipo.py"}
    stale = [p.name for p in shipped if p.read_text() != (package_dir / p.name).read_text()]
    assert not stale, f"embedded remote code is stale: {stale}"
