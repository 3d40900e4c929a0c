"""Ray Tune ablations (ray_jobs.tune): an experiment interrupted after its first trial continues
when the same command is rerun, ending with a two-row table and plots; bad search spaces fail
before any trial starts. Trials are tiny (DiT-N/2, 4 steps) on the session's local Ray."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
from ray.tune import Callback

from ray_jobs import tune as tune_job
from ray_jobs.resources import ClusterCapacity
from speed.config import load_config
from speed.train.run_layout import RunLayout

ABLATION = "configs/ablations/digits_quick.yaml"
TINY = [
    "model.name=DiT-N/2",
    "train.steps=4",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "train.log_every=2",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.eval_num_samples=20",
    "optim.warmup_steps=0",
    "sampling.steps=2",
    "sample.classes=[0,1]",
    "sample.per_class=1",
    "ray.cpus_per_worker=0.5",
]


def last_json(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


class InterruptOnce(Callback):
    """Sends SIGINT (Ctrl+C) after the first trial completes, once: Tune saves the experiment state
    and ends the run, as when a user interrupts it. The marker file keeps the copy pickled into the
    experiment (and restored with it) from firing again."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.path.exists(self.marker):
            return
        Path(self.marker).write_text(trial.trial_id)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise RuntimeError("Tune did not install its SIGINT handler; cannot simulate an interruption")
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def restored_experiment(ray_session, tmp_path_factory):
    """Run the quick ablation, interrupted after trial 1 of 2; then rerun the same command."""
    out = tmp_path_factory.mktemp("tune")
    args = [*TINY, f"tune.output_uri={out}", "tune.name=quick"]
    cfg = load_config(ABLATION, args, phase="tune")
    marker = str(out / "interrupted")
    first = tune_job.run_experiment(cfg, "quick", callbacks=[InterruptOnce(marker)])
    return {"out": out, "args": args, "first": first, "marker": marker}


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_experiment_continues_and_completes(restored_experiment, capsys):
    first = restored_experiment["first"]
    assert first["interrupted"] is True
    assert first["expected_trials"] == 2 and first["trials"] in (1, 2)  # Tune creates trials lazily
    done_first = [r["trial"] for r in first["rows"] if r["status"] == "done"]
    assert len(done_first) == 1

    # The same command again: Tuner.restore continues the experiment; the finished trial is kept.
    assert tune_job.main(["-c", ABLATION, *restored_experiment["args"]]) == 0
    line = last_json(capsys.readouterr().out)
    experiment = Path(restored_experiment["out"]) / "quick"
    assert line["event"] == "tune_done"
    assert line["experiment"] == str(experiment)
    assert line["trials"] == 2 and line["errors"] == 0
    assert line["best"]["trial"] in ("t000-uniform-seed0", "t001-speed-seed0")
    assert line["best"]["final_fid_digits"] > 0

    runs = experiment / "runs"
    finished = json.loads((runs / done_first[0] / "tune_trial.json").read_text())
    assert finished["attempts"] == 1  # not trained again after the restore
    for name in ("t000-uniform-seed0", "t001-speed-seed0"):
        records = RunLayout(str(runs / name)).read_metrics()
        assert records[-1]["step"] == 4
        assert any("fid_digits" in r for r in records)  # evaluated inside the trial
        assert (runs / name / "export" / "ema.safetensors").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_results_table_and_plots(restored_experiment):
    experiment = Path(restored_experiment["out"]) / "quick"
    rows = list(csv.DictReader((experiment / "results.csv").open()))
    assert [r["trial"] for r in rows] == ["t000-uniform-seed0", "t001-speed-seed0"]
    assert [r["diffusion.timesteps.name"] for r in rows] == ["uniform", "speed"]
    for row in rows:
        assert row["status"] == "done" and row["steps"] == "4"
        assert float(row["final_fid_digits"]) > 0 and float(row["best_fid_digits"]) > 0
        assert float(row["wall_time_s"]) > 0
    uniform = rows[0]
    assert uniform["steps_to_baseline"] == uniform["baseline_steps"]  # the baseline reaches its own target
    table = (experiment / "results.md").read_text()
    assert table.count("| t00") == 2
    for plot in ("curves.png", "timesteps.png"):
        assert (experiment / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_search_space_fails_before_any_trial(tmp_path, capsys):
    quick = Path(__file__).resolve().parents[1] / ABLATION
    out = tmp_path / "out"
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text(f"include: {quick}\ntune:\n  search_space:\n    diffusion.timesteps.nam: [uniform]\n")
    assert tune_job.main(["-c", str(bad_key), *TINY, f"tune.output_uri={out}"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.timesteps.nam" in err and "did you mean diffusion.timesteps.name" in err

    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text(f"include: {quick}\ntune:\n  search_space:\n    diffusion.timesteps.name: [uniform, speeed]\n")
    assert tune_job.main(["-c", str(bad_value), *TINY, f"tune.output_uri={out}"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.timesteps.name='speeed'" in err or "speeed" in err

    reserved = tmp_path / "reserved.yaml"
    reserved.write_text(f"include: {quick}\ntune:\n  search_space:\n    run.name: [a, b]\n")
    assert tune_job.main(["-c", str(reserved), *TINY, f"tune.output_uri={out}"]) == 2
    assert "run.name" in capsys.readouterr().err
    assert not out.exists()  # nothing was started or written


def test_metric_and_scheduler_settings():
    cfg = load_config(ABLATION, [*TINY, "tune.scheduler=asha", "tune.grace_period=1"], phase="tune")
    scheduler = tune_job._scheduler(cfg)
    assert scheduler._time_attr == "step" and scheduler._max_t == 4
    assert scheduler._brackets[0]._rungs[-1][0] == 2  # grace: at least one evaluation (every 2 steps)
    two_cpus = ClusterCapacity(total_cpus=2.0, node_cpus=[2.0], total_gpus=0.0)
    assert tune_job.max_concurrent(load_config(ABLATION, [*TINY, "tune.max_concurrent_trials=8"], phase="tune"),
                                   two_cpus) == 4  # 0.5 CPU per trial
    # auto: each trial's workers are given the whole cluster, so trials run one at a time.
    assert tune_job.max_concurrent(load_config(ABLATION, [*TINY, "tune.max_concurrent_trials=8",
                                                          "ray.cpus_per_worker=auto"], phase="tune"), two_cpus) == 1
    with pytest.raises(Exception, match="eval.feature_extractor=digits"):
        tune_job.check_metric(load_config(ABLATION, [*TINY, "eval.feature_extractor=inception"], phase="tune"))
    with pytest.raises(Exception, match="multiple of train.log_every"):
        tune_job.check_metric(load_config(ABLATION, [*TINY, "train.eval_every=3"], phase="tune"))
    with pytest.raises(Exception, match="is not logged by training"):
        tune_job.check_metric(load_config(ABLATION, [*TINY, "tune.metric=fidelity"], phase="tune"))
