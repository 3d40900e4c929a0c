"""A trial's run is resumed only when its resolved config matches (speed.experiments.fingerprint),
as used by benchmarks.speedup and ray_jobs.tune (no training, no Ray)."""

from __future__ import annotations

import json

import pytest

from speed.config import ConfigError, load_config
from speed.config.load import apply_overrides
from speed.experiments.fingerprint import (
    FINGERPRINT_FILE,
    FingerprintMismatch,
    check_run_fingerprint,
    config_fingerprint,
    fingerprint_differences,
    resolved_config,
)
from speed.train.run_layout import RunLayout, metrics_part_name


def _cfg(*overrides):
    return load_config(None, ["model.name=DiT-N/2", *overrides])


def test_resolved_config_keeps_what_changes_results():
    flat = resolved_config(_cfg())
    for key in ("data.format", "data.uri", "data.resolution", "model.name", "diffusion.timesteps.name",
                "train.steps", "train.eval_every", "train.global_batch_size", "optim.lr", "run.seed",
                "sampling.steps"):
        assert key in flat, key
    for key in ("run.name", "run.output_uri", "train.checkpoint_every", "eval.cache_uri"):
        assert key not in flat, key
    assert not any(k.startswith(("storage.", "ray.", "tune.")) for k in flat)
    same = config_fingerprint(_cfg("run.name=other", "run.output_uri=elsewhere", "train.checkpoint_every=7"))
    assert same["sha256"] == config_fingerprint(_cfg())["sha256"]
    for change in ("data.format=patches", "train.steps=7", "run.seed=3", "diffusion.timesteps.name=uniform",
                   "model.name=DiT-D/2", "sampling.steps=9"):
        assert config_fingerprint(_cfg(change))["sha256"] != same["sha256"], change
    assert config_fingerprint(_cfg(), {"data.content_sha256": "a"})["sha256"] != same["sha256"]
    assert fingerprint_differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == [("b", 2, 3), ("c", None, 4)]


def test_resume_only_on_a_match(tmp_path):
    run = str(tmp_path / "run")
    cfg = _cfg()
    check_run_fingerprint(run, cfg, has_results=False)  # a new run: the fingerprint is written
    stored = json.loads((tmp_path / "run" / FINGERPRINT_FILE).read_text())
    assert stored["sha256"] == config_fingerprint(cfg)["sha256"] and stored["config"]["data.format"] == "digits"
    check_run_fingerprint(run, apply_overrides(cfg, {"run.name": "renamed"}), has_results=True)  # same config
    other = _cfg("data.format=patches", "data.resolution=16", "data.channels=3", "train.steps=7")
    with pytest.raises(FingerprintMismatch) as excinfo:
        check_run_fingerprint(run, other, has_results=True, fix="use a fresh folder (--out)")
    message = str(excinfo.value)
    for key in ("data.format", "data.resolution", "data.channels", "train.steps"):
        assert key in message, message
    assert "'digits' then, 'patches' now" in message and "fresh folder" in message
    assert isinstance(excinfo.value, ConfigError)
    # Results without a fingerprint (an older run, another tool) are not trusted either.
    (tmp_path / "legacy").mkdir()
    with pytest.raises(FingerprintMismatch, match="no config_fingerprint.json"):
        check_run_fingerprint(str(tmp_path / "legacy"), cfg, has_results=True)
    # A folder without results takes the new config's fingerprint.
    check_run_fingerprint(run, other, has_results=False)
    check_run_fingerprint(run, other, has_results=True)


def test_keys_added_to_the_schema_later_match_at_their_default(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg()
    check_run_fingerprint(str(run), cfg, has_results=False)
    stored = json.loads((run / FINGERPRINT_FILE).read_text())
    del stored["config"]["optim.weight_decay"]  # as if the run predates the key
    stored["sha256"] = "older"
    (run / FINGERPRINT_FILE).write_text(json.dumps(stored))
    check_run_fingerprint(str(run), cfg, has_results=True)  # today's default: the same behaviour
    assert "optim.weight_decay" in json.loads((run / FINGERPRINT_FILE).read_text())["config"]  # rewritten
    (run / FINGERPRINT_FILE).write_text(json.dumps(stored))
    with pytest.raises(FingerprintMismatch, match="optim.weight_decay: None then, 0.5 now"):
        check_run_fingerprint(str(run), _cfg("optim.weight_decay=0.5"), has_results=True)


def test_benchmark_refuses_runs_of_another_dataset(tmp_path, capsys):
    from benchmarks import speedup

    out = tmp_path / "out"
    tiny = ["--quick", "--strategies", "uniform", "--seeds", "0", "--out", str(tmp_path / "results"),
            f"run.output_uri={out}", "train.steps=2", "train.eval_every=0", "train.log_every=1",
            "train.checkpoint_every=2", "model.name=DiT-N/2"]
    cfg = speedup.storage.absolute_paths(load_config(speedup.BASE_CONFIG, ["model.name=DiT-N/2", f"run.output_uri={out}"]))
    digits = speedup.load_dataset(cfg)
    trial = apply_overrides(cfg, {"run.name": "ddpm-uniform-none-seed0", "run.output_uri": str(out / "speedup-quick"),
                                  "diffusion.timesteps.name": "uniform", "run.seed": 0,
                                  "train.steps": 2, "train.eval_every": 0, "train.log_every": 1,
                                  "train.checkpoint_every": 2})
    speedup.check_trial(trial, speedup.data_digest(digits))  # what run_trial does before training
    layout = RunLayout.for_run(trial.run)
    (tmp_path / "out" / "speedup-quick" / "ddpm-uniform-none-seed0" / metrics_part_name(0)).write_text(
        json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert layout.metrics_parts()
    # The same trial on another dataset: stopped before any training, naming the keys.
    code = speedup.main([*tiny, "data.format=patches", "data.resolution=16", "data.channels=3"])
    err = capsys.readouterr().err
    assert code == 2 and "data.format" in err and "data.content_sha256" in err and "run.output_uri" in err
    assert not (tmp_path / "results").exists()


def test_tune_checks_trial_runs_before_continuing(tmp_path):
    from ray_jobs import tune as tune_job

    base = _cfg("tune.search_space={run.seed: [0]}")
    experiment = str(tmp_path / "exp")
    values, trial_id = {"run.seed": 0}, "abc_00000"
    cfg = tune_job.trial_config(base, values, experiment, trial_id)
    layout = RunLayout.for_run(cfg.run)
    check_run_fingerprint(layout.root, cfg, has_results=False)
    (tmp_path / "exp" / "runs" / cfg.run.name / tune_job.TRIAL_FILE).write_text(
        json.dumps({"trial_id": trial_id, "values": values}))
    (tmp_path / "exp" / "runs" / cfg.run.name / metrics_part_name(0)).write_text('{"step": 1}\n')
    tune_job.check_trial_runs(base, experiment)  # unchanged: fine
    with pytest.raises(FingerprintMismatch, match="optim.lr") as excinfo:
        tune_job.check_trial_runs(apply_overrides(base, {"optim.lr": 0.5}), experiment)
    assert "tune.name" in str(excinfo.value)


def test_tune_metric_names_the_dataset():
    from ray_jobs import tune as tune_job

    assert tune_job.resolve_metric(_cfg("tune.metric=fid")) == "fid_digits"
    assert tune_job.resolve_metric(_cfg("tune.metric=fid_digits")) == "fid_digits"
    patches = _cfg("tune.metric=fid", "data.format=patches", "data.resolution=16", "data.channels=3")
    assert tune_job.resolve_metric(patches) == "fid_patches"
    tune_job.check_metric(patches)
    with pytest.raises(ConfigError, match="fid_patches"):
        tune_job.resolve_metric(apply_overrides(patches, {"tune.metric": "digits_fid"}))
    with pytest.raises(ConfigError, match="tune.metric=loss"):
        tune_job.check_metric(_cfg("tune.metric=fid", "data.format=parquet", "data.uri=somewhere"))
    assert tune_job.report_interval(_cfg("tune.metric=fid_digits", "train.eval_every=100")) == 100
