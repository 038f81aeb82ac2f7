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
