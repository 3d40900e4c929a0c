"""Experiment trackers with the real clients: MLflow against a local file store, W&B offline
(nothing leaves the machine); a tracker that fails or hangs never stops or stalls training; a
tracker asked for but not installed fails at config time, naming the package and the extra."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from speed.config import ConfigError, load_config
from speed.train import loop, trackers
from speed.train.distributed import DistEnv
from speed.train.run_layout import RunLayout
from speed.train.sources import LocalReporter

from tests.conftest import free_port

SECRET = "tracker-test-secret-0123456789"
TINY = ["model.name=DiT-N/2", "parallel.strategy=none", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.log_every=2", "train.checkpoint_every=4", "train.eval_every=0", "train.eval_num_samples=0",
        "train.sample_every=4", "sample.classes=[0,1]", "sample.per_class=1", "sampling.steps=2",
        f"storage.secret_access_key={SECRET}"]


def _digits_source(cfg):
    from speed.data.digits import load_digits
    from speed.train.sources import IndexedSource

    images, labels = load_digits(cfg.data.resolution, cfg.data.channels)
    return IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size)


def _train(tmp_path: Path, *overrides: str, resume: bool = False):
    cfg = load_config(None, [*TINY, f"run.output_uri={tmp_path}", *overrides])
    layout = RunLayout.for_run(cfg.run, cfg.storage)
    reporter = LocalReporter(layout, keep=cfg.train.keep_checkpoints)
    resume_dir = reporter.latest() if resume else None
    result = loop.train(cfg, DistEnv(), _digits_source(cfg), reporter, resume_dir=resume_dir, progress=False)
    return cfg, layout, result


def _jsonl_keys(layout: RunLayout):
    records = layout.read_metrics()
    numeric = set()
    for record in records:
        numeric |= set(trackers.numeric(record))
    return records, numeric


def test_mlflow_file_store_gets_params_metrics_and_grids(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a file store
    cfg, layout, result = _train(tmp_path, "train.steps=4", "run.trackers=[tensorboard,mlflow]",
                                 "run.tracker_project=speed-tests")
    assert result.steps == 4
    ids = json.loads(Path(layout.path(trackers.IDS_FILE)).read_text())
    client = MlflowClient()
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run.name
    assert client.get_experiment(run.info.experiment_id).name == "speed-tests"
    params = run.data.params
    assert params["train.steps"] == "4" and params["model.name"] == "DiT-N/2"
    assert params["storage.secret_access_key"] == "***"
    assert SECRET not in json.dumps(params)
    records, numeric = _jsonl_keys(layout)
    assert set(run.data.metrics) == numeric  # every number of metrics.jsonl, by the same key
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [r["step"] for r in records if "loss" in r]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "samples"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_0000004.png"]
    assert list((Path(layout.root) / "tensorboard").glob("events.out.tfevents.*"))

    # Resuming continues the same MLflow run.
    _, _, resumed = _train(tmp_path, "train.steps=6", "run.trackers=[tensorboard,mlflow]",
                           "run.tracker_project=speed-tests", resume=True)
    assert resumed.start_step == 4 and resumed.steps == 6
    assert json.loads(Path(layout.path(trackers.IDS_FILE)).read_text())["mlflow"] == ids["mlflow"]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")][-1] == 6


def test_wandb_offline_gets_config_metrics_and_grids(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, layout, result = _train(tmp_path, "train.steps=4", "run.trackers=[wandb]")
    assert result.steps == 4
    assert not (Path(layout.root) / "tensorboard").exists()  # not asked for
    runs = list((Path(layout.root) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = json.loads(Path(layout.path(trackers.IDS_FILE)).read_text())["wandb"]
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    _, numeric = _jsonl_keys(layout)
    for key in numeric:
        assert key.encode() in data, key
    assert b'"secret_access_key":"***"' in data and SECRET.encode() not in data
    assert list((runs[0] / "files" / "media" / "images").glob("samples_4_*.png"))


class _Failing:
    name = "failing"

    def __init__(self):
        self.calls = 0

    def start(self, *args):
        return "id-1"

    def log_metrics(self, step, metrics):
        self.calls += 1
        raise ConnectionError("tracking server unreachable")

    def log_image(self, *args):
        raise AssertionError("never called after the first failure")

    def close(self, failed):
        pass


class _Recording:
    name = "recording"

    def __init__(self):
        self.steps = []
        self.images = []
        self.closed = None

    def start(self, *args):
        return "id-2"

    def log_metrics(self, step, metrics):
        self.steps.append(step)

    def log_image(self, step, name, png):
        assert png.startswith(b"\x89PNG")
        self.images.append((step, name))

    def close(self, failed):
        self.closed = failed


def test_a_failing_tracker_is_logged_once_and_training_goes_on_with_the_others(tmp_path, monkeypatch, caplog):
    failing, recording = _Failing(), _Recording()
    monkeypatch.setattr(loop.Trackers, "for_run", classmethod(
        lambda cls, names, project, layout: cls([failing, recording], ids_uri=layout.path(trackers.IDS_FILE))))
    with caplog.at_level(logging.WARNING, logger="speed.train"):
        _, layout, result = _train(tmp_path, "train.steps=6")
    assert result.steps == 6 and Path(result.export_uri).is_file()
    assert [r["step"] for r in layout.read_metrics() if "loss" in r] == [2, 4, 6]
    assert failing.calls == 1
    assert recording.steps == [2, 4, 6] and recording.closed is False
    assert recording.images == [(4, "samples"), (6, "samples")]
    warnings = [r.getMessage() for r in caplog.records if "tracker failing failed" in r.getMessage()]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "goes on without it" in warnings[0]


def test_an_unreachable_mlflow_server_does_not_stop_training(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING, logger="speed.train"):
        _, layout, result = _train(tmp_path, "train.steps=4", "run.trackers=[tensorboard,mlflow]")
    assert result.steps == 4 and [r["step"] for r in layout.read_metrics() if "loss" in r] == [2, 4]
    assert list((Path(layout.root) / "tensorboard").glob("events.out.tfevents.*"))
    assert len([r for r in caplog.records if "tracker mlflow failed" in r.getMessage()]) == 1


def test_a_hanging_tracker_never_holds_up_the_loop():
    release = threading.Event()

    class Hanging(_Recording):
        def start(self, *args):
            release.wait(30)
            return "late"

    group = trackers.Trackers([Hanging()], queue_size=2, close_timeout_s=0.5)
    began = time.monotonic()
    group.start("run", {}, 0)
    for step in range(1, 50):
        group.log({"step": step, "loss": 1.0})
    group.close()
    assert time.monotonic() - began < 5
    release.set()


def test_a_tracker_that_is_not_installed_fails_at_config_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were absent
    began = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(None, ["run.trackers=[tensorboard,wandb]"])
    message = str(info.value)
    assert "run.trackers" in message and "wandb" in message and "speed[trackers]" in message
    assert time.monotonic() - began < 5
    with pytest.raises(ConfigError, match="unknown tracker"):
        load_config(None, ["run.trackers=[tensorbord]"])
    assert load_config(None, []).run.trackers == ["tensorboard"]
