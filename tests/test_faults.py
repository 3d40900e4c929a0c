"""Faults with real processes: a SIGKILLed Ray Train worker, a crash in the middle of a checkpoint
write, and secrets that must not leak into anything a job writes (logs, configs, metrics, errors)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ray_jobs import train as train_job
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, TINY_TRAIN

pytestmark = [pytest.mark.ray]

TINY = [*TINY_TRAIN, "ray.max_failures=2"]


def metrics_steps(run_dir: Path):
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def metrics_records(run_dir: Path):
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_worker_pids():
    """PIDs of live Ray Train worker processes (their process title names the actor class)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            pids.append(proc.pid)
    return pids


def test_sigkilled_worker_restarts_from_checkpoint(ray_session, tmp_path, capsys):
    steps, every = 40, 4
    args = [*TINY, f"run.output_uri={tmp_path}", "run.name=killed", f"train.steps={steps}",
            f"train.checkpoint_every={every}", "train.keep_checkpoints=20", "ray.num_workers=2"]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", train_job.main(args)))
    thread.start()
    run_dir = tmp_path / "killed"
    deadline = time.time() + 400
    # A record two steps past the first checkpoint: both ranks got through its report, so it is committed.
    while not any(r["step"] >= every + 2 for r in metrics_records(run_dir)):
        assert time.time() < deadline and thread.is_alive(), "training did not get past its first checkpoint"
        time.sleep(0.2)
    # An earlier run's workers may take a moment to exit: wait until only this run's two are left.
    deadline = time.time() + 60
    while len(pids := train_worker_pids()) != 2:
        assert time.time() < deadline, f"expected this run's 2 train workers, found {pids}"
        time.sleep(0.5)
    killed_at = max(r["step"] for r in metrics_records(run_dir))
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert result.get("code") == 0
    records = metrics_records(run_dir)
    # The log continues cleanly to exactly the requested steps ...
    assert [r["step"] for r in records] == list(range(2, steps + 1, 2))
    # ... and the records after the restart come from an attempt that resumed from a checkpoint.
    resumed = records[-1]["resumed_from_step"]
    assert resumed % every == 0 and every <= resumed <= killed_at, (resumed, killed_at)
    assert all(r["resumed_from_step"] == (0 if r["step"] <= resumed else resumed) for r in records), records
    assert all(r["world_size"] == 2 for r in records)


def test_crash_during_checkpoint_write_resumes_from_previous(ray_session, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("SPEED_FAULT_INJECT", f"checkpoint_write:4:{marker}")
    # Workers inherit the driver's environment through the runtime env.
    args = [*TINY, f"run.output_uri={tmp_path}", "run.name=crash", "train.steps=6", "train.checkpoint_every=2",
            "ray.num_workers=1"]
    import ray

    @ray.remote(num_cpus=0)
    def run():
        return train_job.main(args)

    code = ray.get(run.options(runtime_env={"env_vars": {"SPEED_FAULT_INJECT": os.environ["SPEED_FAULT_INJECT"]}}).remote())
    assert code == 0
    assert marker.exists(), "the fault never fired"
    run_dir = tmp_path / "crash"
    steps = metrics_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # Every checkpoint folder the run kept is complete: the half-written one was never registered.
    folders = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert folders
    for folder in folders:
        assert (folder / "state.json").is_file() and (folder / ".metadata").is_file()


def test_secrets_never_written(ray_session, s3_bucket, s3_endpoint, tmp_path, capsys):
    """Known secret values appear in no log, written config, metrics file or error message."""
    import boto3

    args = [*TINY, f"run.output_uri={s3_bucket}/runs", "run.name=secret", "train.steps=2", "train.checkpoint_every=2",
            "ray.num_workers=1", f"storage.secret_access_key={TEST_SECRET_KEY}", f"storage.access_key_id={TEST_ACCESS_KEY}"]
    assert train_job.main(args) == 0
    captured = capsys.readouterr()
    # An error message too: a missing bucket with the secret configured.
    assert train_job.main([*args[:-3], "run.output_uri=s3://missing-bucket-q/runs",
                           f"storage.secret_access_key={TEST_SECRET_KEY}"]) == 2
    captured_err = capsys.readouterr()
    texts = [captured.out, captured.err, captured_err.out, captured_err.err]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="runs/secret/")["Contents"]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        if not obj["Key"].endswith((".distcp", ".safetensors")):
            texts.append(body.decode("utf-8", "replace"))
    import ray

    log_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in log_dir.glob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        assert TEST_SECRET_KEY not in text
