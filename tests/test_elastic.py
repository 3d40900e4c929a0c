"""Elastic training survives losing a node, grows back when it returns, and keeps the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.elastic_scenario import CHECKPOINT_EVERY, LOG_EVERY, STEPS

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


def test_elastic_shrink_and_grow(tmp_path):
    # Its own two-node cluster in its own process: a process holds one Ray connection, and the
    # session's local Ray must not see these nodes.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.elastic_scenario", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1])
    assert report["code"] == 0
    observed = report["observed"]
    sizes = [ws for _, ws in observed]
    first_shrunk = sizes.index(1)
    assert set(sizes[:first_shrunk]) == {2}, observed
    assert 2 in sizes[first_shrunk:], observed
    # The one-worker restart continued from the latest checkpoint complete at removal, not from scratch.
    resumed_from = observed[first_shrunk][0] - LOG_EVERY
    assert resumed_from >= CHECKPOINT_EVERY and resumed_from in report["checkpoints_at_removal"], report
    assert resumed_from >= max(report["checkpoints_at_removal"]) - CHECKPOINT_EVERY, report
    # The log continues cleanly to exactly the requested steps with one global batch throughout.
    assert report["final_steps"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert report["global_batches"] == [16]
