"""Faults with real processes: a SIGKILLed Ray Train worker, a crash in the middle of a checkpoint
write, and secrets that must not leak into anything a job writes (logs, configs, metrics, errors)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ray_jobs import train as train_job
from ray_jobs.common import load_job_config
from speed import storage
from speed.train.run_layout import RunLayout
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, TINY_TRAIN

pytestmark = [pytest.mark.ray]

TINY = [*TINY_TRAIN, "ray.max_failures=2"]


def metrics_steps(run_dir: Path):
    return [r["step"] for r in RunLayout(str(run_dir)).read_metrics()]


def metrics_records(run_dir: Path):
    """The run's records so far; [] while a part is replaced under the reader (a resume drops
    the parts after its checkpoint), the next poll reads again."""
    try:
        return RunLayout(str(run_dir)).read_metrics()
    except (OSError, storage.StorageError):
        return []


class CrashOnceAt:
    """``after_shards`` hook: the first time the checkpoint of ``step`` has its shards on disk but no
    state.json yet, the worker process dies. It travels to the Ray Train workers inside
    train_loop_config (pickled by reference to this module); the marker file keeps the restarted
    worker from crashing again."""

    def __init__(self, step: int, marker: str):
        self.step = step
        self.marker = marker

    def __call__(self, step: int) -> None:
        if step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(step))
            os._exit(17)


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


def test_crash_during_checkpoint_write_resumes_from_previous(ray_session, tmp_path, capsys):
    marker = tmp_path / "fault-fired"
    args = [*TINY, f"run.output_uri={tmp_path}", "run.name=crash", "train.steps=6", "train.checkpoint_every=2",
            "ray.num_workers=1"]
    cfg = load_job_config("train", args)
    # The worker dies between checkpoint 4's shards and its state.json; Ray Train restarts it.
    done = train_job.run_training(cfg, after_shards=CrashOnceAt(4, str(marker)))
    assert marker.exists(), "the fault never fired"
    assert done["steps"] == 6
    run_dir = tmp_path / "crash"
    steps = metrics_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # Every checkpoint folder the run kept is complete: the half-written one was never registered.
    folders = [uri for _, uri in RunLayout(str(run_dir)).checkpoints()]
    assert folders
    for folder in map(Path, folders):
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
