"""Weights from outside the run's own checkpoints never unpickle code; local Ray stays on loopback."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from speed.config import load_config
from speed.models import describe
from speed.models.export import WeightsError, load_export, read_weights, save_export


class _Exploit:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_file(tmp_path: Path, name: str) -> Path:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    with open(path, "wb") as handle:
        pickle.dump({"model": _Exploit(marker)}, handle)
    return path


def test_init_from_and_exports_refuse_pickles(tmp_path):
    bad = malicious_file(tmp_path, "weights.pt")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_weights(str(bad), None, "train.init_from")
    with pytest.raises(WeightsError, match="inference.checkpoint_uri"):
        load_export(str(bad), key="inference.checkpoint_uri")
    assert not (tmp_path / "pwned").exists()


def test_trainer_init_from_refuses_pickle(tmp_path):
    """train.init_from is read inside the training loop: a pickle there stops the run, unopened."""
    from speed import storage
    from speed.train import loop
    from speed.train.distributed import DistEnv
    from speed.train.run_layout import RunLayout
    from speed.train.sources import FixedSource, LocalReporter

    bad = malicious_file(tmp_path, "init.safetensors")
    cfg = storage.absolute_paths(load_config(None, [
        "model.name=DiT-N/2", "parallel.strategy=none", "train.steps=2", "train.global_batch_size=4",
        "train.micro_batch_size=4", f"train.init_from={bad}", f"run.output_uri={tmp_path / 'runs'}",
        "run.name=init-from-pickle",
    ]))
    source = FixedSource(torch.zeros(4, cfg.data.channels, cfg.data.resolution, cfg.data.resolution),
                         torch.zeros(4, dtype=torch.long))
    reporter = LocalReporter(RunLayout.for_run(cfg.run), keep=2)
    with pytest.raises(WeightsError, match="train.init_from"):
        loop.train(cfg, DistEnv(), source, reporter, progress=False)
    assert not (tmp_path / "pwned").exists()
    assert reporter.metrics == [] and reporter.latest() is None  # not one step was trained


def test_export_round_trip_and_wrong_model_is_named(tmp_path):
    from speed.models import build_model

    cfg = load_config(None, ["model.name=DiT-N/2"])
    model = build_model(cfg.model, 8, 1)
    uri = save_export(model.state_dict(), describe(cfg.model, cfg.data, cfg.diffusion, 5), str(tmp_path / "export"))
    loaded, description = load_export(uri)
    assert description.step == 5 and description.input_size == 8
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    other = load_config(None, ["model.name=DiT-T/2"])
    with pytest.raises(WeightsError, match="do not fit the configured model"):
        from speed.models.export import load_state_dict_checked

        load_state_dict_checked(build_model(other.model, 8, 1), dict(model.state_dict()), source=uri, key="train.init_from")


def test_local_ray_dashboard_binds_loopback(monkeypatch):
    """init_ray starts local Ray with the dashboard on 127.0.0.1 (checked on the call, not a cluster)."""
    import ray

    from ray_jobs import common

    calls = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.update(kwargs))
    common.init_ray(load_config(None, []))
    assert calls["dashboard_host"] == "127.0.0.1" and calls["address"] == "local"


def _tree(root: Path, skip=("__pycache__", ".pytest_cache", ".git", ".venv")) -> set:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found.update(str(Path(dirpath, f).relative_to(root)) for f in filenames)
    return found


@pytest.mark.ray
def test_training_writes_only_under_its_output_uri(ray_session, tmp_path, monkeypatch, capsys):
    """A training job (with its end-of-run eval, sample grid and export) writes nothing into the
    checkout or the working directory: only under run.output_uri (and the temp folder)."""
    from ray_jobs import train as train_job
    from tests.conftest import TINY_TRAIN

    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    output = tmp_path / "out"
    repo_before = _tree(repo)
    monkeypatch.chdir(workdir)
    args = [*TINY_TRAIN, "train.steps=2", "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=2",
            "train.sample_every=2", f"run.output_uri={output}", "run.name=confined"]
    assert train_job.main(args) == 0
    assert sorted(_tree(workdir)) == []
    assert sorted(_tree(repo) - repo_before) == []
    written = _tree(output)
    # The run's folder, and the dataset evaluator's cache (eval.cache_uri's default), one file per dataset.
    assert any(path.startswith("confined/") for path in written)
    assert all(path.startswith("confined/") or path.startswith("cache/eval-digits-") for path in written), \
        sorted(written)
