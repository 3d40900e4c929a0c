"""Compute-to-quality speed-ups of a cell against the plain baseline, on synthetic histories."""

from __future__ import annotations

import pytest

from speed.experiments.compute import baseline_convergence, baseline_targets, cell_speedup, evaluation_points


def history(values, every=100, flops=10.0, batch=4, cpu_per_step=0.5):
    """Eval records every ``every`` steps with the given metric values."""
    return [{"step": (i + 1) * every, "fid": v, "train_flops_per_image": flops, "global_batch_size": batch,
             "train_cpu_s": (i + 1) * every * cpu_per_step} for i, v in enumerate(values)]


BASE = [100, 60, 40, 30, 25, 22, 21, 20]  # budget 800 steps


def test_points_carry_steps_flops_and_cpu():
    points = evaluation_points(history([5, 4], flops=3.0, batch=2), "fid")
    assert points[1] == {"step": 200, "value": 4.0, "steps": 200.0, "flops": 200 * 2 * 3.0, "cpu_s": 100.0}
    assert baseline_targets(evaluation_points(history(BASE), "fid"), 800) == {"25": 60, "50": 30, "100": 20}


def test_a_cell_twice_as_fast_in_steps_and_cheaper_per_step():
    base = {0: history(BASE), 1: history(BASE)}
    # Reaches each value in half the steps, at half the FLOPs per image and the same CPU per step.
    fast = BASE[1::2] + [19, 19, 19, 19]  # the baseline's values at half its steps
    cell = {0: history(fast, flops=5.0), 1: history(fast, flops=5.0)}
    out = cell_speedup(cell, base, "fid", "min", budget=800)
    assert out["steps"]["100"]["mean"] == pytest.approx(2.0)
    assert out["flops"]["100"]["mean"] == pytest.approx(4.0)
    assert out["cpu_s"]["50"]["min"] == pytest.approx(2.0)
    assert out["steps"]["25"]["seeds_reached"] == 2


def test_targets_never_reached_are_null_and_partial_seeds_leave_mean_unknown():
    base = {0: history(BASE), 1: history(BASE)}
    cell = {0: history([100, 90, 80, 70, 65, 64, 63, 62]), 1: history(BASE)}
    out = cell_speedup(cell, base, "fid", "min", budget=800)
    assert out["steps"]["100"]["mean"] is None and out["steps"]["100"]["max"] == pytest.approx(1.0)
    slow = cell_speedup({0: history([100] * 8)}, {0: history(BASE)}, "fid", "min", budget=800)
    assert slow["steps"]["50"] is None
    with pytest.raises(ValueError, match="seed"):
        cell_speedup({3: history(BASE)}, base, "fid", "min", budget=800)


def test_baseline_convergence_flags_flat_or_still_falling_curves():
    assert baseline_convergence(evaluation_points(history(BASE), "fid"), 800)["converged"]
    flat = baseline_convergence(evaluation_points(history([50] * 8), "fid"), 800)
    assert not flat["converged"] and not flat["fell"]
    falling = baseline_convergence(evaluation_points(history([100, 90, 80, 70, 60, 50, 40, 30]), "fid"), 800)
    assert falling["fell"] and not falling["flattened"]
    # Evaluations every 200 steps miss 75% of a 1000-step budget: its value is read between 600 and 800
    # (the evaluation at 600 would have measured the last 40%).
    coarse = baseline_convergence(evaluation_points(history([100, 40, 26, 22, 21], every=200), "fid"), 1000)
    assert coarse["at_75"] == pytest.approx(23.0) and coarse["flattened"]


def test_tune_cells_expand_to_their_config_and_report_the_same_format(tmp_path):
    """The Tune path takes the benchmark's cells as the search-space key ``cell``: each trial gets
    the cell's keys, and the experiment's files hold the cells table of speedup.json."""
    import json

    from ray_jobs import tune as tune_job
    from speed.config import load_config
    from speed.experiments.outputs import render
    from speed.experiments.report import TrialRecord
    from speed.experiments.space import check_search_space, parse_search_space

    base = load_config("configs/ablations/digits_grid.yaml", [f"tune.output_uri={tmp_path}"])
    dims = parse_search_space(base.tune.search_space)
    assert check_search_space(base, dims) > 0  # every cell is a valid config
    trial = tune_job.trial_config(base, {"cell": "flow-speed-routing", "run.seed": 1}, str(tmp_path), "abc_00003")
    assert trial.diffusion.objective == "flow" and not trial.model.learn_sigma
    assert trial.sampling.sampler == "heun" and trial.model.routing.fraction == 0.5
    assert trial.diffusion.timesteps.name == "speed" and trial.run.seed == 1

    def rec(cell, seed, values):
        return TrialRecord(name=f"{cell}-{seed}", overrides={"cell": cell, "run.seed": seed}, strategy=cell, seed=seed,
                           history=[{**r, "fid_digits": r.pop("fid")} for r in history(values)])

    records = [rec("ddpm-uniform-none", 0, BASE), rec("flow-speed-routing", 0, BASE[1::2] + [19] * 4)]
    files = render(records, base, "fid_digits", "min", title="grid")["files"]
    cells = json.loads(files["cells.json"])["cells"]
    assert cells["flow-speed-routing"]["speedup"]["steps"]["100"]["mean"] == pytest.approx(2.0)
    assert "| flow-speed-routing |" in files["results.md"].decode()


@pytest.mark.parametrize("path", ["configs/ablations/digits_grid.yaml", "configs/ablations/patches_grid.yaml",
                                  "configs/ablations/imagenet_grid.yaml"])
def test_shipped_grids_expand_into_valid_cells(path, tmp_path):
    from speed.config import load_config
    from speed.experiments.space import check_search_space, parse_search_space

    base = load_config(path, [f"tune.output_uri={tmp_path}"])
    assert check_search_space(base, parse_search_space(base.tune.search_space)) >= 6  # raises on an invalid cell
