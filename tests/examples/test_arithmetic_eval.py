"""Evaluation helpers of the arithmetic pipeline: AUROC, threshold choice, pipeline configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.arithmetic import run_pipeline  # noqa: E402
from examples.arithmetic.stages_eval import _auroc, choose_threshold  # noqa: E402


def _brute_auroc(score, label):
    pos = [s for s, l in zip(score, label) if l]
    neg = [s for s, l in zip(score, label) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 6, (40,), generator=g).float() / 5  # many ties
    label = torch.randint(0, 2, (40,), generator=g).float()
    assert _auroc(score, label) == pytest.approx(_brute_auroc(score.tolist(), label.tolist()))


def test_choose_threshold_prefers_accuracy_among_high_commit():
    sweep = [
        {"tau": -1.0, "greedy_accuracy": 9.0, "commit_rate": 0.99},
        {"tau": 0.5, "greedy_accuracy": 6.0, "commit_rate": 0.85},
        {"tau": 0.7, "greedy_accuracy": 7.0, "commit_rate": 0.75},
        {"tau": 0.9, "greedy_accuracy": 8.0, "commit_rate": 0.5},
        {"tau": 1.0, "greedy_accuracy": 8.0, "commit_rate": 0.0},
    ]
    assert choose_threshold(sweep) == 0.7  # τ < 0 and τ >= 1 never ship; commit must reach 70%
    low = [{**s, "commit_rate": min(s["commit_rate"], 0.6)} for s in sweep]
    assert 0 <= choose_threshold(low) < 1


def test_config_overrides_and_stage_names():
    args = run_pipeline.build_parser().parse_args(["--set", "sft_steps=7", "--set", "thresholds=[0.5]",
                                                   "--set", 'student={"hidden_size": 8, "num_hidden_layers": 1, '
                                                   '"num_attention_heads": 2, "num_key_value_heads": 1, '
                                                   '"intermediate_size": 16}'])
    cfg = run_pipeline.make_config(args)
    assert cfg.sft_steps == 7 and cfg.thresholds == (0.5,) and cfg.student.hidden_size == 8
    for stage in run_pipeline.STAGE_ORDER:
        assert callable(run_pipeline._stage_function(stage))


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_problems():
    import random

    from examples.arithmetic.stages_eval import bootstrap_interval

    rng = random.Random(0)
    small = [float(rng.random() < 0.6) for _ in range(100)]
    large = [float(rng.random() < 0.6) for _ in range(2000)]
    lo, hi = bootstrap_interval(small)
    assert lo < sum(small) / len(small) < hi
    lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 2  # ~1/sqrt(n)
    # binomial standard error: the 95% interval is about ±1.96·sqrt(p(1-p)/n)
    p = sum(large) / len(large)
    assert abs((hi2 - lo2) / 2 - 1.96 * (p * (1 - p) / len(large)) ** 0.5) < 0.01
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)


def test_intervals_pair_the_same_problems():
    """A row equal to the base except on 10 of 200 problems: the paired difference is exactly +5 points with a
    narrow interval, much narrower than either row's own interval."""
    from examples.arithmetic.stages_eval import intervals

    base_greedy = [i % 2 == 0 for i in range(200)]
    better = [True if i < 20 else c for i, c in enumerate(base_greedy)]  # 10 odd problems flip to correct
    sampled = [[c] * 4 for c in base_greedy]
    rows = {key: {"label": key, "greedy_correct": base_greedy, "sampled_correct": sampled}
            for key in ("student_regular", "pipo_sft", "mtp_unverified", "teacher")}
    rows["pipo_sft_opd"] = {"label": "opd", "greedy_correct": better, "sampled_correct": [[c] * 4 for c in better]}
    assert "pipo_sft_opd_vs_student_matched" not in intervals({"rows": rows})["paired"]
    # The budget-matched control: here it gets the same 10 problems right, so PIPO's advantage over it vanishes.
    rows["student_matched"] = dict(rows["pipo_sft_opd"], label="matched")
    ci = intervals({"rows": rows})
    vs_matched = ci["paired"]["pipo_sft_opd_vs_student_matched"]
    assert vs_matched["greedy"] == {"mean": 0.0, "ci": (0.0, 0.0)} and "budget-matched" in vs_matched["label"]
    d = ci["paired"]["pipo_sft_opd"]["greedy"]
    assert d["mean"] == pytest.approx(5.0)
    own = ci["rows"]["pipo_sft_opd"]["greedy"]
    assert 0 < d["ci"][0] <= 5.0 <= d["ci"][1] and d["ci"][1] - d["ci"][0] < (own[1] - own[0]) / 2
    assert ci["paired"]["pipo_sft"]["pass@4"]["mean"] == 0 and ci["paired"]["pipo_sft"]["pass@4"]["ci"] == (0, 0)


def test_speed_modes_are_known_and_unknown_ones_are_rejected():
    from examples.arithmetic.stages_eval import SPEED_MODES, measure_speed

    assert {"eager", "static_compiled"} <= set(SPEED_MODES)
    assert SPEED_MODES["eager"]() == {}
    assert SPEED_MODES["static_compiled"]()["cache_implementation"] == "static"
    with pytest.raises(ValueError, match="unknown speed mode"):
        measure_speed({}, None, [], ["turbo"], 0.5, 8)
