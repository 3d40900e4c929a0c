"""The jobs' command line: every exit prints exactly one JSON line on stdout, help works, and
mistakes fail fast, before Ray starts (no Ray here: cheap subprocesses and in-process calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speed.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# A job that fails on its command line or config must not get as far as starting Ray.
FAIL_FAST_S = 20


def run_cli(*args: str, timeout: float = FAIL_FAST_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def json_lines(stdout: str) -> list:
    found = []
    for line in stdout.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return [record for record in found if isinstance(record, dict) and "event" in record]


def only_record(stdout: str) -> dict:
    records = json_lines(stdout)
    assert len(records) == 1, stdout
    return records[0]


def test_unknown_phase_prints_cli_failed():
    done = run_cli("-m", "ray_jobs", "-p", "sampel")
    record = only_record(done.stdout)
    assert done.returncode == 2 and record["event"] == "cli_failed"
    assert "sampel" in record["error"] and "usage:" in done.stderr


def test_unknown_option_of_a_job_prints_its_phase_failed():
    done = run_cli("-m", "ray_jobs.train", "--bogus")
    record = only_record(done.stdout)
    assert record["event"] == "train_failed", done.stderr
    assert done.returncode == 2 and "--bogus" in record["error"] and "usage:" in done.stderr


def test_missing_weights_fail_before_ray(tmp_path):
    done = run_cli("-m", "ray_jobs.sample", "sample.checkpoint_uri=/nonexistent", f"run.output_uri={tmp_path}")
    record = only_record(done.stdout)
    assert done.returncode == 2 and record["event"] == "sample_failed"
    assert "sample.checkpoint_uri" in record["error"] and "/nonexistent" in record["error"]
    assert "Started a local Ray instance" not in done.stderr


def test_dispatcher_help_shows_config_phase_and_overrides():
    done = run_cli("-m", "ray_jobs", "--help")
    assert done.returncode == 0 and json_lines(done.stdout) == []
    for text in ("-c CONFIG, --config CONFIG", "-p", "--phase", "key=value", "sample"):
        assert text in done.stdout, text


# --- in process ----------------------------------------------------------------------------------


def test_job_help_exits_zero_without_a_json_line(capsys):
    from ray_jobs import sample

    assert sample.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and json_lines(out) == []


def test_dispatcher_forwards_config_and_overrides_in_any_order(tmp_path, capsys):
    from ray_jobs.__main__ import main

    assert main([f"run.output_uri={tmp_path}", "-p", "inference", "run.name=nothing-yet"]) == 2
    record = only_record(capsys.readouterr().out)
    assert record["event"] == "inference_failed"
    assert os.path.join(str(tmp_path), "nothing-yet", "export") in record["error"]


@pytest.mark.parametrize("job", ["sample", "inference"])
def test_missing_default_export_names_key_path_and_what_to_do(job, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"ray_jobs.{job}")
    assert module.main([f"run.output_uri={tmp_path}", "run.name=r1"]) == 2
    captured = capsys.readouterr()
    error = only_record(captured.out)["error"]
    key = f"{job}.checkpoint_uri" if job == "sample" else "inference.checkpoint_uri"
    assert key in error and os.path.join(str(tmp_path), "r1", "export") in error
    assert "python -m ray_jobs.train" in error
    import ray

    assert not ray.is_initialized()


def test_unexpected_errors_print_phase_failed_one_line_and_exit_1(capsys):
    from ray_jobs.common import run_main

    class WorkerLost(RuntimeError):
        pass

    def main(argv):
        raise WorkerLost("Training failed: a worker died\n  Traceback (remote):\n    ...")

    assert run_main("train", main, []) == 1
    captured = capsys.readouterr()
    record = only_record(captured.out)
    assert record == {"event": "train_failed", "error": "WorkerLost: Training failed: a worker died"}
    assert "Traceback" in captured.err


def test_a_job_that_already_reported_is_not_reported_twice(capsys):
    from ray_jobs.common import emit, run_main

    def main(argv):
        emit("thing_done")
        raise RuntimeError("after the result")

    assert run_main("thing", main, []) == 1
    assert only_record(capsys.readouterr().out)["event"] == "thing_done"


def test_other_exits_still_print_their_line(capsys):
    from ray_jobs.common import run_main

    def main(argv):
        raise SystemExit(3)

    assert run_main("tune", main, []) == 3
    assert only_record(capsys.readouterr().out)["event"] == "tune_failed"


def test_init_ray_without_a_terminal_switches_progress_bars_off(monkeypatch):
    import ray
    import ray.data

    from ray_jobs import common

    context = ray.data.DataContext.get_current()
    for name in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start"):
        monkeypatch.setattr(context, name, True)  # restored after the test
    calls = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(common, "interactive", lambda: False)
    common.init_ray(load_config(None, []), runtime_env={"env_vars": {"EXTRA": "1"}})
    env_vars = calls["runtime_env"]["env_vars"]
    assert env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and env_vars["EXTRA"] == "1"
    assert env_vars["OMP_WAIT_POLICY"] == "PASSIVE"
    assert not context.enable_progress_bars and not context.enable_operator_progress_bars
    assert not context.print_on_execution_start
    # On a terminal the bars stay.
    calls.clear()
    context.enable_progress_bars = True
    monkeypatch.setattr(common, "interactive", lambda: True)
    common.init_ray(load_config(None, []))
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in calls["runtime_env"]["env_vars"] and context.enable_progress_bars


def test_progress_without_a_terminal_is_a_log_line(monkeypatch, caplog):
    import logging

    from ray_jobs import common

    monkeypatch.setattr(common, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="speed"):
        with common.progress_bar(10, unit="img", desc="sampling", interval_s=0.0) as progress:
            progress.update(4)
    assert any("sampling: 4/10 img" in r.getMessage() for r in caplog.records)
