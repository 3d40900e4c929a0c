"""The pure convergence arithmetic behind benchmarks.speedup and the Tune tables (synthetic curves;
the benchmark itself is never run in tests)."""

from __future__ import annotations

import pytest

from speed.experiments import (
    TrialRecord,
    build_rows,
    grid_points,
    mean_curve,
    metric_curve,
    parse_search_space,
    speedup,
    speedup_summary,
    steps_to_target,
    trial_run_name,
)
from speed.config import ConfigError


def curve(values, every=100):
    return [((i + 1) * every, float(v)) for i, v in enumerate(values)]


def test_steps_to_target_min_and_max():
    fid = curve([50, 30, 20, 15, 12])
    assert steps_to_target(fid, 20, "min") == 300  # reaching means <= for min
    assert steps_to_target(fid, 19.9, "min") == 400
    assert steps_to_target(fid, 11, "min") is None  # never within the budget
    assert steps_to_target([], 10, "min") is None
    acc = curve([0.2, 0.5, 0.8])
    assert steps_to_target(acc, 0.5, "max") == 200  # >= for max
    assert steps_to_target(acc, 0.9, "max") is None
    with pytest.raises(ValueError):
        steps_to_target(acc, 0.5, "down")


def test_speedup_against_baseline_final_value():
    base = curve([50, 30, 20, 15, 12, 10])  # final 10 at step 600
    fast = curve([40, 20, 10, 8, 7, 6])  # reaches 10 at step 300
    result = speedup(base, fast, "min")
    assert result == {"target": 10.0, "baseline_steps": 600, "steps": 300, "speedup": 2.0,
                      "speedup_interpolated": 2.0}
    slow = curve([60, 50, 40, 30, 20, 15])
    assert speedup(base, slow, "min")["speedup"] is None and speedup(base, slow, "min")["steps"] is None
    # A noisy baseline that touches its final value early: baseline steps is that first step.
    noisy = curve([50, 9.5, 20, 15, 12, 10])
    assert speedup(noisy, fast, "min")["baseline_steps"] == 200


def test_speedup_summary_spread_and_null():
    curves = {
        "uniform": {0: curve([50, 30, 20, 10]), 1: curve([52, 32, 22, 12])},
        "speed": {0: curve([40, 10, 9, 8]), 1: curve([45, 20, 12, 11])},  # seed 0: 400/200, seed 1: 400/300
        "worse": {0: curve([60, 50, 40, 30]), 1: curve([60, 50, 40, 11])},  # seed 0 never, seed 1 reaches 12 at 400
    }
    out = speedup_summary(curves, baseline="uniform", mode="min")
    assert out["uniform"]["speedup"] == 1.0
    assert out["uniform"]["speedup_min"] == out["uniform"]["speedup_max"] == 1.0
    s = out["speed"]
    assert s["speedup_min"] == pytest.approx(400 / 300) and s["speedup_max"] == pytest.approx(2.0)
    # seed-mean curves: uniform final 11 at 400; speed mean [42.5, 15, 10.5, 9.5] reaches 11 at 300
    assert s["target"] == pytest.approx(11.0) and s["steps_to_target"] == 300
    assert s["speedup"] == pytest.approx(400 / 300)
    assert s["seeds_reached"] == 2 and s["final_metric"] == pytest.approx(9.5)
    assert s["curve"]["steps"] == [100, 200, 300, 400]
    assert s["curve"]["min"][0] == 40 and s["curve"]["max"][0] == 45
    w = out["worse"]
    assert w["speedup"] is None  # mean curve [60, 50, 40, 20.5] never reaches 11
    assert w["speedup_min"] is None  # seed 0 never reaches its target: the minimum is unknown
    assert w["speedup_max"] == pytest.approx(1.0) and w["seeds_reached"] == 1
    assert [p["speedup"] for p in w["per_seed"]] == [None, pytest.approx(1.0)]
    with pytest.raises(ValueError, match="baseline"):
        speedup_summary({"speed": curves["speed"]}, baseline="uniform")


def test_max_mode_and_mean_curve_alignment():
    curves = {"uniform": {0: curve([0.1, 0.4, 0.6])}, "speed": {0: curve([0.3, 0.6, 0.7])}}
    out = speedup_summary(curves, mode="max")
    assert out["speed"]["speedup"] == pytest.approx(1.5)  # 0.6 at step 200 instead of 300
    stats = mean_curve([[(100, 1.0), (200, 2.0)], [(200, 4.0), (300, 5.0)]])
    assert stats["steps"] == [200] and stats["mean"] == [3.0]


def test_metric_curve_and_trial_table_baseline():
    history = [{"step": 50, "loss": 0.5}, {"step": 100, "loss": 0.4, "fid_digits": 30.0},
               {"step": 150, "loss": 0.3, "fid_digits": None}, {"step": 200, "loss": 0.2, "fid_digits": 20.0}]
    assert metric_curve(history, "fid_digits") == [(100, 30.0), (200, 20.0)]

    def record(strategy, seed, fids):
        hist = [{"step": s, "fid_digits": v, "loss": 1.0} for s, v in curve(fids)]
        return TrialRecord(name=f"{strategy}-{seed}", overrides={"diffusion.timesteps.name": strategy, "run.seed": seed},
                           strategy=strategy, seed=seed, history=hist, wall_s=1.0)

    rows = build_rows([record("uniform", 0, [30, 20, 10]), record("speed", 0, [20, 10, 8]),
                       record("uniform", 1, [30, 25, 20]), record("speed", 1, [40, 35, 30])], "fid_digits", "min")
    by_name = {r["trial"]: r for r in rows}
    assert by_name["speed-0"]["steps_to_baseline"] == 200 and by_name["speed-0"]["speedup_vs_baseline"] == 1.5
    assert by_name["speed-0"]["baseline_target"] == 10.0  # the uniform trial of the same seed
    assert by_name["speed-1"]["steps_to_baseline"] is None and by_name["speed-1"]["speedup_vs_baseline"] is None
    assert by_name["uniform-1"]["speedup_vs_baseline"] == 1.0
    assert by_name["speed-0"]["best_fid_digits"] == 8.0 and by_name["speed-0"]["best_step"] == 300


def test_search_space_expansion_and_names():
    dims = parse_search_space({"diffusion.timesteps.name": ["uniform", "speed"], "run.seed": [0, 1],
                               "optim.lr": {"loguniform": [1e-4, 1e-3]}})
    points = grid_points(dims)
    assert len(points) == 4 and points[1] == {"diffusion.timesteps.name": "uniform", "run.seed": 1}
    assert trial_run_name(3, {"diffusion.timesteps.name": "speed", "run.seed": 1, "diffusion.timesteps.speed.k": 5.0}) \
        == "t003-speed-seed1-k5"
    with pytest.raises(ConfigError, match="unknown config key 'run.sed'"):
        parse_search_space({"run.sed": [0]})
    with pytest.raises(ConfigError, match="lo < hi"):
        parse_search_space({"optim.lr": {"uniform": [1e-3, 1e-4]}})


def test_interpolated_steps_resolve_sub_grid_speedups():
    base = curve([60, 50, 40])  # target 40 at step 300
    cand = curve([55, 45, 35])  # crosses 40 half-way between 200 and 300
    assert steps_to_target(cand, 40, "min") == 300
    assert steps_to_target(cand, 40, "min", interpolate=True) == pytest.approx(250.0)
    assert steps_to_target(curve([0.2, 0.6]), 0.5, "max", interpolate=True) == pytest.approx(175.0)
    assert steps_to_target(cand, 30, "min", interpolate=True) is None
    result = speedup(base, cand, "min")
    assert result["speedup"] == 1.0 and result["speedup_interpolated"] == pytest.approx(300 / 250)
    out = speedup_summary({"uniform": {0: base}, "speed": {0: cand}}, mode="min")
    assert out["speed"]["speedup"] == 1.0
    assert out["speed"]["speedup_interpolated"] == pytest.approx(1.2)
    assert out["speed"]["speedup_interpolated_min"] == out["speed"]["speedup_interpolated_max"] == pytest.approx(1.2)


def test_benchmark_grid_writes_cells_in_three_units(tmp_path):
    """A tiny grid run end to end: the cells format of speedup.json, the table and the plots."""
    import json

    from benchmarks import speedup

    out = tmp_path / "results"
    code = speedup.main([
        "--cells", "flow-speed-routing,ddpm-speed+learned-none", "--seeds", "0", "--out", str(out),
        f"run.output_uri={tmp_path / 'runs'}", "model.name=DiT-N/2", "train.steps=4", "train.eval_every=2",
        "train.log_every=2", "train.checkpoint_every=4", "train.eval_num_samples=16", "sampling.steps=4",
    ])
    assert code == 0
    report = json.loads((out / "speedup.json").read_text())
    assert list(report["cells"]) == ["ddpm-uniform-none", "flow-speed-routing", "ddpm-speed+learned-none"]
    cell = report["cells"]["flow-speed-routing"]
    assert (cell["objective"], cell["strategy"], cell["accelerator"]) == ("flow", "speed", "routing")
    assert set(cell["speedup"]) == {"steps", "flops", "cpu_s"}
    assert set(cell["speedup"]["flops"]) == {"25", "50", "100"}
    baseline = report["cells"]["ddpm-uniform-none"]["speedup"]["steps"]["100"]
    assert baseline["mean"] == 1.0 and baseline["seeds_reached"] == 1  # the baseline against itself
    assert cell["train_flops_per_image"] < report["cells"]["ddpm-uniform-none"]["train_flops_per_image"]
    assert "ddpm-uniform-none" in report["strategies"] or "uniform" in report["strategies"]
    for name in ("speedup.md", "speedup.png", "speedup_flops.png", "speedup_timesteps.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| flow-speed-routing |" in (out / "speedup.md").read_text()

    # The per-timestep error of the final models, on the dataset the runs trained on.
    from benchmarks import timestep_mse

    assert timestep_mse.main([str(tmp_path / "runs" / "speedup"), "--images", "8", "--out", str(out / "mse.md")]) == 0
    errors = json.loads((out / "mse.json").read_text())
    assert errors["dataset"].startswith("digits") and errors["images"] == 8
    assert set(errors["cells"]) == set(report["cells"])
    assert len(errors["cells"]["flow-speed-routing"]["ratio_to_ddpm-uniform-none"]) == timestep_mse.NUM_BUCKETS
    assert (out / "mse.png").stat().st_size > 0
