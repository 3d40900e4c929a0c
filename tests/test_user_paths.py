"""The README's commands the way a user runs them: from a fresh copy of the checkout, relative
paths, no path overrides, each printed output fed to the next command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow]


def fresh_checkout(target: Path) -> Path:
    """The project's files as a clean clone has them (tracked and not ignored), without outputs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for name in listed:
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def job(checkout: Path, module: str, *args: str, timeout: float = 600):
    """Run ``python -m ray_jobs.<module> args`` in the checkout; (exit code, JSON line, stderr)."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"ray_jobs.{module}", *args], cwd=checkout, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.returncode, json.loads(lines[0]), proc.stderr, time.monotonic() - began


def test_quickstart_then_sampling_from_the_printed_outputs(tmp_path):
    checkout = fresh_checkout(tmp_path / "speed")
    code, done, err, _ = job(checkout, "train", "train.steps=20", "train.eval_num_samples=20")
    assert code == 0, err[-3000:]
    run = checkout / "outputs" / "digits-speed"
    assert done["event"] == "train_done" and done["steps"] == 20 and done["start_step"] == 0
    assert set(done) >= {"steps", "start_step", "checkpoint", "export", "final_loss", "images_per_sec", "run"}
    assert Path(done["run"]) == run and Path(done["checkpoint"]) == run / "checkpoint_0000020"
    assert Path(done["export"]) == run / "export" / "ema.safetensors"
    # Every file the README promises, where it says.
    assert (run / "config.yaml").is_file() and (run / "export" / "model.json").is_file()
    assert list(run.glob("metrics-*.jsonl")) and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "samples" / "step_0000020.png").is_file()
    assert "Reporting training result" not in err  # no full metric dicts in a non-TTY log

    # The printed checkpoint feeds the sampling jobs; without a key they read the run's export.
    code, grid, err, _ = job(checkout, "sample", f"sample.checkpoint_uri={done['checkpoint']}", "sampling.steps=5")
    assert code == 0 and grid["event"] == "sample_grid_done" and Path(grid["png"]).is_file(), err[-3000:]
    code, grid, err, _ = job(checkout, "sample", "sampling.steps=5")
    assert code == 0 and Path(grid["png"]).is_file(), err[-3000:]
    code, samples, err, _ = job(checkout, "inference", f"inference.checkpoint_uri={done['checkpoint']}",
                                "inference.num_samples=8", "inference.batch_size=8", "sampling.steps=5")
    assert code == 0 and Path(samples["npz"]).is_file(), err[-3000:]

    # Rerunning unchanged is a successful no-op; a longer run resumes from the relative folder.
    code, again, err, seconds = job(checkout, "train", "train.steps=20", "train.eval_num_samples=20")
    assert code == 0 and again["event"] == "train_done" and again["start_step"] == again["steps"] == 20, err[-2000:]
    code, longer, err, _ = job(checkout, "train", "train.steps=30", "train.eval_num_samples=20")
    assert code == 0 and longer["start_step"] == 20 and longer["steps"] == 30, err[-3000:]
    steps = [json.loads(line)["step"] for part in sorted(run.glob("metrics-*.jsonl"))
             for line in part.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_two_workers_that_cannot_fit_stop_within_seconds(tmp_path):
    checkout = fresh_checkout(tmp_path / "speed")
    code, failed, err, seconds = job(checkout, "train", "ray.num_workers=2", "ray.cpus_per_worker=2",
                                     "ray.num_cpus=2", "run.name=too-big", timeout=180)
    assert code == 2 and failed["event"] == "train_failed"
    assert "ray.num_workers=2 x ray.cpus_per_worker=2" in failed["error"] and "2 CPUs" in failed["error"]
    assert seconds < 90  # Ray's own start-up, then the check: no worker-group timeouts
