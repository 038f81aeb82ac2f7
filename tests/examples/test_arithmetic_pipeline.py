"""Smoke run of the whole arithmetic pipeline at toy sizes (`--quick`): every stage runs, writes its marker, and a
second invocation skips them all. Marked slow (30 s to a few minutes on 2 shared CPU cores, with the load)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.arithmetic import run_pipeline  # noqa: E402


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pipeline.main(["--quick", "--out", str(out)]) == 0
    for stage in run_pipeline.STAGE_ORDER:
        assert (out / "markers" / f"{stage}.done.json").exists(), stage
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["rows"]) == {"student_regular", "student_matched", "mtp_unverified", "pipo_sft", "pipo_sft_opd",
                                    "teacher"}
    for row in results["rows"].values():
        assert len(row["greedy_correct"]) == results["n_test"] and len(row["sampled_correct"][0]) == 4
    speed = json.loads((out / "eval" / "speed.json").read_text())
    assert set(speed) == {"eager"} and speed["eager"]["tpot_ratio"] > 0
    report = (out / "docs" / "RESULTS.md").read_text()
    assert "95% bootstrap interval" in report and "Paired differences" in report and "| eager |" in report
    assert "budget-matched base |" in report
    assert (out / "docs" / "arithmetic_pareto.png").exists()
    assert (out / "assets" / "pipo_student" / "config.json").exists()
    assert not list((out / "assets").rglob("*.py"))  # exported package data ships no remote-code copies
    capsys.readouterr()
    assert run_pipeline.main(["--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped") == len(run_pipeline.STAGE_ORDER)
