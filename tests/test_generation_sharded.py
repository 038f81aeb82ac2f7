"""PIPO generation under FSDP2 (2 CPU processes, gloo): every rank keeps stepping until all are done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_generate_worker.py")


@pytest.mark.parametrize("family", ["llama"])
def test_fsdp2_generation_equals_unsharded(tmp_path, family):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path), family, "150"]
    try:
        # The worker exits on its own after 150 s (faulthandler); this timeout is the backstop.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as err:  # a rank that stopped stepping early leaves the other one hanging
        pytest.fail(f"sharded generation hung: {err}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["same_sequences"] and r["same_slots"] and r["same_stats"], r
    assert results[0]["new_tokens"] == 4 and results[1]["new_tokens"] == 15
    # Rank 0 finished after 3 backbone steps but kept stepping with rank 1: the same parameter all-gathers on both.
    assert results[0]["backbone_forwards"] == 3 and results[1]["backbone_forwards"] == 15
    assert results[0]["all_gathers"] == results[1]["all_gathers"] > 15
