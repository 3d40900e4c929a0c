"""Config loading: merge order, phases, overrides, and errors that name the full key."""

from __future__ import annotations

import pytest

from speed.config import ConfigError, all_keys, apply_overrides, config_from_dict, load_config, to_dict


def test_default_is_embedded_digits_speed():
    cfg = load_config()
    assert cfg.data.format == "digits" and cfg.diffusion.timesteps.name == "speed"
    assert cfg.model.name == "DiT-D/2" and cfg.run.name == "digits-speed"


def test_base_chain_file_phase_and_overrides(tmp_path):
    root = tmp_path / "configs"
    (root / "exp").mkdir(parents=True)
    (root / "base.yaml").write_text("train:\n  steps: 10\n  log_every: 5\n")
    (root / "exp" / "base.yaml").write_text("train:\n  steps: 20\n")
    (root / "exp" / "run.yaml").write_text(
        "train:\n  global_batch_size: 32\nphases:\n  inference:\n    sampling:\n      guidance_scale: 1.5\n"
    )
    cfg = load_config(root / "exp" / "run.yaml", ["train.log_every=7"])
    assert (cfg.train.steps, cfg.train.log_every, cfg.train.global_batch_size) == (20, 7, 32)
    assert cfg.sampling.guidance_scale == 1.0
    assert load_config(root / "exp" / "run.yaml", [], phase="inference").sampling.guidance_scale == 1.5


def test_include_merges_another_file(tmp_path):
    root = tmp_path / "configs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "train.yaml").write_text("train:\n  steps: 11\n")
    (root / "b" / "abl.yaml").write_text("include: ../a/train.yaml\ntrain:\n  log_every: 3\n")
    cfg = load_config(root / "b" / "abl.yaml")
    assert (cfg.train.steps, cfg.train.log_every) == (11, 3)


def test_imagenet_baseline_and_speed_differ_only_in_timesteps():
    base = to_dict(load_config("configs/imagenet_256/baseline.yaml"))
    speed = to_dict(load_config("configs/imagenet_256/speed.yaml"))
    diffs = {k for k in base if base[k] != speed[k]}
    assert diffs <= {"diffusion", "run"}
    base["diffusion"].pop("timesteps"), speed["diffusion"].pop("timesteps")
    assert base["diffusion"] == speed["diffusion"]
    paper = load_config("configs/imagenet_256/speed.yaml")
    assert paper.model.name == "DiT-XL/2" and paper.train.global_batch_size == 256 and paper.optim.lr == 1e-4
    assert paper.train.ema_decay == 0.9999 and paper.sampling.steps == 250
    assert load_config("configs/imagenet_256/speed.yaml", phase="inference").sampling.guidance_scale == 1.5


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stepz=5", "unknown config key 'train.stepz'.*train.steps"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", r"train.steps=0 .* > 0"),
        ("diffusion.timesteps.name=fast", "diffusion.timesteps.name='fast'.*uniform, speed"),
        ("diffusion.timesteps.speed.tau=5000", "diffusion.timesteps"),
        ("diffusion.timesteps.speed.lam=5", "diffusion.timesteps.*weights"),
        ("model.name=DiT-Q/2", "model.name='DiT-Q/2'.*valid: DiT-S/2"),
        ("data.format=jpeg", "data.format='jpeg'"),
        ("data.format=imagefolder", "data.uri is empty"),
        ("inference.num_samples=0", "inference.num_samples=0"),
        ("inference.num_samples=-5", "inference.num_samples=-5"),
        ("ray.num_workers=[4,2]", "ray.num_workers"),
        ("ray.num_workers=[1,128]", "train.global_batch_size=64 cannot be split"),
        ("ray.resize_interval_s=0", r"ray.resize_interval_s=0.* > 0"),
        ("ray.max_failures=-2", "ray.max_failures=-2"),
        ("storage.endpoint_url=minio:9000", "storage.endpoint_url"),
        ("sampling.steps=5000", "sampling.steps=5000"),
        ("run.name=a/b", "run.name"),
        ("tune.search_space={optim.lrr: [1, 2]}", "tune.search_space names unknown config key 'optim.lrr'"),
        ("diffusion.schedule=cosin", "diffusion.schedule='cosin' is not valid; choose one of linear, cosine"),
        ("diffusion.timesteps.sampling=fast", "diffusion.timesteps.sampling='fast'.*uniform, speed"),
        ("diffusion.timesteps.weighting=loss_aware", "diffusion.timesteps.*needs.*sampling='loss_aware'"),
        ("diffusion.timesteps.speed.k=0", r"diffusion.timesteps.speed.k=0.0 .* > 0"),
        ("diffusion.timesteps.loss_aware.history=0", r"diffusion.timesteps.loss_aware.history=0 .* >= 1"),
        ("diffusion.num_timesteps=100", "diffusion.timesteps.speed.tau=700 .*diffusion.num_timesteps=100"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker=0 .*auto or a number > 0"),
        ("ray.cpus_per_worker=many", "ray.cpus_per_worker='many' .*auto or a number > 0"),
        ("train.eval_num_samples=-1", r"train.eval_num_samples=-1 .* >= 0"),
        ("train.log_every=0", r"train.log_every=0 .* >= 1"),
        ("train.checkpoint_every=0", r"train.checkpoint_every=0 .* >= 1"),
        ("train.eval_every=-1", r"train.eval_every=-1 .* >= 0"),
        ("train.ema_decay=1", r"train.ema_decay=1.0 .*\(0, 1\)"),
        ("data.channels=2", "data.channels=2 .*1, 3, 4"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_missing_config_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist.*-c"):
        load_config("configs/nope.yaml")


def test_override_syntax_error_is_clear():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_round_trip_and_secret_redaction():
    cfg = load_config(None, ["storage.secret_access_key=supersecretvalue", "storage.access_key_id=AKIAEXAMPLE"])
    data = to_dict(cfg)
    assert data["storage"]["secret_access_key"] == "***"
    assert "supersecretvalue" not in repr(data)
    assert config_from_dict(to_dict(cfg, redact=False)).storage.secret_access_key == "supersecretvalue"
    assert apply_overrides(cfg, {"train.steps": 7}).train.steps == 7
    assert "diffusion.timesteps.speed.k" in all_keys()


@pytest.mark.parametrize(
    "overrides",
    [
        ["ray.cpus_per_worker=auto"],
        ["ray.cpus_per_worker=0.5"],
        ["train.eval_num_samples=0"],
        ["train.eval_every=0", "train.sample_every=0"],
        ["train.steps=10", "train.log_every=50", "train.checkpoint_every=400", "train.eval_every=99"],
        ["ray.max_failures=-1"],
        ["diffusion.timesteps.name=uniform", "diffusion.num_timesteps=100", "sampling.steps=50"],
        ["diffusion.timesteps.name=speed_v1"],
    ],
)
def test_good_values_pass(overrides):
    load_config(None, overrides)


def test_schema_defaults():
    from speed.config.schema import RayConfig, TimestepsConfig, TrainConfig

    assert TrainConfig().steps == 1000 and TrainConfig().eval_num_samples is None
    assert RayConfig().cpus_per_worker == "auto"
    assert not hasattr(TimestepsConfig(), "speed_v1") and not hasattr(TimestepsConfig, "strategy_params")


def test_config_does_not_import_diffusion():
    import subprocess
    import sys

    code = (
        "import sys; from speed.config import load_config; load_config(); "
        "print(sorted(m for m in sys.modules if m.startswith('speed.diffusion')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
