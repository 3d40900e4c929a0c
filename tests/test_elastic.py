"""Elastic training survives losing a node and grows back, keeping the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_elastic_shrink_and_grow(tmp_path):
    # Its own two-node cluster in its own process: a process can hold only one Ray connection.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.elastic_scenario", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{"code"')]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1])
    assert report["code"] == 0
    sizes = report["world_sizes"]
    first_one = sizes.index(1)
    assert 2 in sizes[:first_one] and 2 in sizes[first_one:], sizes
    assert report["global_batches"] == [16]
    assert report["steps"][-1] == 60
