"""Sampling library (no Ray): per-sample determinism, grids, ADM .npz files, shards, weights, converter."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from speed.config import load_config
from speed.config.schema import ConfigError
from speed.models.convert import UnsafeCheckpointError, convert_dit_checkpoint, dit_description
from speed.sample import (
    NpzArray,
    NpzFormatError,
    NpzWriter,
    ShardPlan,
    claim_output,
    decode_shard,
    encode_shard,
    generate,
    generate_tensor,
    load_sampling_model,
    make_grid_png,
    pending_ranges,
    read_description,
    sample_labels,
    sample_seed,
    shard_uri,
)
from speed.models import build_model, describe
from speed.models.export import WeightsError, load_export, save_export
from speed import storage

NANO = ["model.name=DiT-N/2", "sampling.steps=8"]


def random_export(folder, *overrides, scale=0.05, seed=0):
    """A DiT-N/2 export with random (non-zero) weights: untrained, but every layer matters."""
    cfg = load_config(None, [*NANO, *overrides])
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg.model, description.input_size, description.in_channels)
        for param in model.parameters():
            param.data.normal_(0.0, scale)
    save_export(model.state_dict(), description, str(folder))
    return cfg, str(folder)


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    cfg, uri = random_export(tmp_path_factory.mktemp("export"))
    model, description = load_sampling_model(uri)
    return cfg, model, description, uri


def test_sample_seed_is_a_pure_function_of_seed_and_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    values = {sample_seed(s, i) for s in range(3) for i in range(100)}
    assert len(values) == 300
    assert all(0 <= v < 2**63 for v in values)
    assert sample_seed(0, 5, "label") != sample_seed(0, 5)


def test_labels_balanced_and_random():
    assert sample_labels(range(12), 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    random = sample_labels(np.arange(2000), 10, "random", seed=3)
    assert random.min() >= 0 and random.max() <= 9
    assert np.all(np.bincount(random, minlength=10) > 150)  # roughly uniform
    # A label depends on (seed, index) only, not on which other indices are asked for.
    assert sample_labels([7, 1500], 10, "random", seed=3).tolist() == [random[7], random[1500]]
    with pytest.raises(ConfigError, match="inference.labels"):
        sample_labels([0], 10, "sorted")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_index_same_image_whatever_the_batch(nano, sampler):
    cfg, model, description, _ = nano
    sampling = load_config(None, [*NANO, f"sampling.sampler={sampler}", "sampling.guidance_scale=2.0"]).sampling
    labels = sample_labels(np.arange(8), 10)
    full = generate_tensor(model, description, sampling, labels, np.arange(8), 11, "cpu")
    again = generate_tensor(model, description, sampling, labels, np.arange(8), 11, "cpu")
    assert torch.equal(full, again)
    # The same samples inside a batch of another size and order: equal up to float rounding.
    part = generate_tensor(model, description, sampling, labels[[6, 2, 5]], [6, 2, 5], 11, "cpu")
    torch.testing.assert_close(part, full[[6, 2, 5]], atol=2e-3, rtol=0)
    other_seed = generate_tensor(model, description, sampling, labels, np.arange(8), 12, "cpu")
    assert (other_seed - full).abs().mean() > 0.05


def test_generate_returns_uint8_nhwc_and_leaves_train_mode(nano):
    cfg, model, description, _ = nano
    model.train()
    try:
        images = generate(model, description, cfg.sampling, [1, 2, 3], [0, 1, 2], 0, "cpu")
        assert model.training  # restored
    finally:
        model.eval()
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
    # Label dropout stays off while sampling: the same call in eval mode gives the same images.
    assert np.array_equal(images, generate(model, description, cfg.sampling, [1, 2, 3], [0, 1, 2], 0, "cpu"))


def test_generate_checks_inputs(nano):
    cfg, model, description, _ = nano
    with pytest.raises(ValueError, match="labels"):
        generate(model, description, cfg.sampling, [1, 2], [0], 0, "cpu")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        generate(model, description, cfg.sampling, [10], [0], 0, "cpu")
    no_null = load_config(None, [*NANO, "model.class_dropout_prob=0"])
    desc = describe(no_null.model, no_null.data, no_null.diffusion)
    guided = load_config(None, [*NANO, "sampling.guidance_scale=1.5"]).sampling
    with pytest.raises(ConfigError, match="sampling.guidance_scale"):
        generate(model, desc, guided, [1], [0], 0, "cpu")


def test_make_grid_png():
    images = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 1), dtype=np.uint8)
    picture = Image.open(io.BytesIO(make_grid_png(images, nrow=4)))
    # 3 rows x 4 columns of 8 px cells with 2 px padding, upscaled x4 for readability.
    assert picture.size == ((4 * 10 + 2) * 4, (3 * 10 + 2) * 4)
    rgb = Image.open(io.BytesIO(make_grid_png(np.zeros((2, 32, 32, 3), np.uint8), nrow=2)))
    assert rgb.mode == "RGB" and rgb.size == (2 * 34 + 2, 34 + 2)
    with pytest.raises(ValueError, match="uint8"):
        make_grid_png(np.zeros((2, 8, 8, 1), np.float32), nrow=2)


def test_npz_writer_and_ranged_reader(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (10, 4, 4, 3), dtype=np.uint8)
    uri = str(tmp_path / "s.npz")
    with NpzWriter(uri) as writer:
        writer.write_array("arr_0", images.shape, np.uint8, [images[:3], images[3:]])
        writer.write_array("arr_1", (10,), np.int64, [np.arange(10)])
    with np.load(uri) as data:  # an ordinary npz: what ADM's evaluator reads
        assert data.files == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], images)
    reader = NpzArray(uri)
    assert reader.shape == (10, 4, 4, 3) and len(reader) == 10
    assert np.array_equal(reader.read(4, 7), images[4:7])
    assert np.array_equal(NpzArray(uri, "arr_1").read(), np.arange(10))
    # np.savez_compressed files have no byte offsets; they are read whole.
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    assert np.array_equal(NpzArray(str(tmp_path / "c.npz")).read(2, 5), images[2:5])
    with pytest.raises(NpzFormatError, match="arr_7"):
        NpzArray(uri, "arr_7")
    # A failed write leaves nothing behind.
    with pytest.raises(ValueError):
        with NpzWriter(str(tmp_path / "bad.npz")) as writer:
            writer.write_array("arr_0", (5, 2), np.uint8, [np.zeros((2, 2), np.uint8)])
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "s.npz"]


def test_npz_on_s3(s3_bucket):
    images = np.arange(6 * 2 * 2 * 1, dtype=np.uint8).reshape(6, 2, 2, 1)
    uri = f"{s3_bucket}/samples.npz"
    with NpzWriter(uri) as writer:
        writer.write_array("arr_0", images.shape, np.uint8, [images])
    assert np.array_equal(NpzArray(uri).read(1, 4), images[1:4])
    with np.load(io.BytesIO(storage.read_bytes(uri))) as data:
        assert np.array_equal(data["arr_0"], images)


def test_shards_plan_and_manifest(tmp_path, nano):
    cfg, _, description, uri = nano
    plan = ShardPlan(num_samples=10, batch_size=4)
    assert plan.ranges() == [(0, 4), (4, 8), (8, 10)]
    out = str(tmp_path / "out")
    blob = encode_shard(np.zeros((4, 8, 8, 1), np.uint8), np.arange(4), np.arange(4))
    images, labels, indices = decode_shard(blob)
    assert images.shape == (4, 8, 8, 1) and labels.tolist() == [0, 1, 2, 3]
    storage.write_bytes(shard_uri(out, 4, 8), blob)
    assert pending_ranges(plan, out) == [(0, 4), (8, 10)]
    from speed.sample import sampling_manifest

    manifest = sampling_manifest(cfg, description, uri)
    assert claim_output(out, manifest) is False
    assert claim_output(out, manifest) is True
    changed = sampling_manifest(load_config(None, [*NANO, "inference.seed=9"]), description, uri)
    with pytest.raises(ConfigError, match="inference.output_uri.*seed"):
        claim_output(out, changed)


def test_weights_resolution_errors(tmp_path, nano):
    *_, uri = nano
    assert read_description(uri).model["name"] == "DiT-N/2"
    assert read_description(os.path.join(uri, "ema.safetensors")).input_size == 8
    with pytest.raises(ConfigError, match="inference.checkpoint_uri is not set"):
        read_description(None)
    with pytest.raises(WeightsError, match="convert_dit"):
        load_sampling_model(str(tmp_path / "DiT-XL-2-256x256.pt"))
    with pytest.raises(WeightsError, match="no ema.safetensors"):
        load_sampling_model(str(tmp_path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_description(str(tmp_path / "junk.safetensors"))



# --- training checkpoints, run folders and the default export ------------------------------------


class _TinyTrainer:
    """The parts of a trainer a checkpoint holds that sampling reads: model and EMA weights."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def state_dict(self):
        return {"model": self.model.state_dict(), "ema": self.ema}

    def load_state_dict(self, state):  # pragma: no cover - sampling never resumes training
        raise AssertionError("not used")


def save_training_checkpoint(directory, step=4, seed=1):
    """A real training checkpoint (DCP shards + state.json) of a DiT-N/2 whose EMA differs from
    its raw weights; returns the EMA state dict."""
    from speed.train.checkpoint import TrainState, save_checkpoint
    from speed.train.distributed import DistEnv

    cfg = load_config(None, NANO)
    description = describe(cfg.model, cfg.data, cfg.diffusion, step=step)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg.model, description.input_size, description.in_channels)
        ema = {k: torch.randn_like(v) * 0.05 for k, v in model.state_dict().items()}
    state = TrainState(step=step, description=dataclasses.asdict(description))
    save_checkpoint(str(directory), _TinyTrainer(model, ema), state, DistEnv())
    return ema


def _truncate_a_shard(checkpoint) -> None:
    shard = sorted(p for p in os.listdir(checkpoint) if p.endswith(".distcp"))[0]
    path = os.path.join(checkpoint, shard)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def test_training_checkpoint_is_accepted_by_read_description_and_the_loader(tmp_path):
    from speed.sample import resolve_weights
    from speed.train.run_layout import RunLayout

    layout = RunLayout(str(tmp_path / "runs" / "r1"))
    checkpoint = layout.checkpoint_uri(4)
    ema = save_training_checkpoint(checkpoint, step=4)
    assert resolve_weights(checkpoint).kind == "checkpoint" and resolve_weights(checkpoint).uri == checkpoint
    description = read_description(checkpoint, key="sample.checkpoint_uri")
    assert description.step == 4 and description.model["name"] == "DiT-N/2" and description.input_size == 8
    model, loaded = load_sampling_model(checkpoint)
    assert loaded == description and not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name  # the EMA weights, not the raw ones
    # An incomplete checkpoint named directly fails on the driver, naming the key.
    _truncate_a_shard(checkpoint)
    with pytest.raises(WeightsError, match="sample.checkpoint_uri.*incomplete.*truncated"):
        read_description(checkpoint, key="sample.checkpoint_uri")
    with pytest.raises(WeightsError, match="incomplete"):
        load_sampling_model(checkpoint)


def test_run_folder_resolves_to_its_export_else_its_newest_complete_checkpoint(tmp_path):
    from speed.sample import resolve_weights
    from speed.train.run_layout import RunLayout

    layout = RunLayout(str(tmp_path / "r1"))
    with pytest.raises(WeightsError, match="does not exist"):
        read_description(layout.root)
    (tmp_path / "r1").mkdir()
    with pytest.raises(WeightsError, match="no ema.safetensors"):
        read_description(layout.root)  # an empty folder is none of the accepted things
    storage.write_text(layout.config_uri, "run: {}\n")
    with pytest.raises(WeightsError, match="no export .* and no complete checkpoint"):
        read_description(layout.root)
    save_training_checkpoint(layout.checkpoint_uri(2), step=2)
    save_training_checkpoint(layout.checkpoint_uri(6), step=6)
    _truncate_a_shard(layout.checkpoint_uri(6))  # an interrupted upload: passed over
    source = resolve_weights(layout.root)
    assert source.kind == "checkpoint" and source.uri == layout.checkpoint_uri(2) and source.given == layout.root
    assert read_description(layout.root).step == 2
    assert load_sampling_model(layout.root)[1].step == 2
    # Once the run has an export, the run folder means the export.
    random_export(layout.export_uri)
    source = resolve_weights(layout.root)
    assert source.kind == "export" and source.uri == os.path.join(layout.export_uri, "ema.safetensors")
    assert read_description(layout.root).step == 0
    # Resolving a resolved URI gives the same source: what a driver hands its workers.
    assert resolve_weights(source.uri).uri == source.uri


def test_every_path_train_prints_is_accepted_and_both_readers_agree(tmp_path):
    from speed.train.run_layout import RunLayout

    layout = RunLayout(str(tmp_path / "r1"))
    save_training_checkpoint(layout.checkpoint_uri(4), step=4)
    random_export(layout.export_uri)
    printed = {"checkpoint": layout.checkpoint_uri(4), "export": os.path.join(layout.export_uri, "ema.safetensors"),
               "export folder": layout.export_uri, "run": layout.root}
    for what, uri in printed.items():
        description = read_description(uri)
        assert load_sampling_model(uri)[1] == description, what
    assert read_description(printed["checkpoint"]).step == 4


def test_training_checkpoint_on_s3_reads_only_its_state(s3_bucket, tmp_path):
    from speed.sample import resolve_weights

    local = tmp_path / "checkpoint_0000003"
    save_training_checkpoint(local, step=3)
    run = f"{s3_bucket}/runs/r1"
    for name in os.listdir(local):
        storage.write_bytes(f"{run}/checkpoint_0000003/{name}", (local / name).read_bytes())
    assert read_description(f"{run}/checkpoint_0000003").step == 3
    source = resolve_weights(run)
    assert source.kind == "checkpoint" and source.uri == f"{run}/checkpoint_0000003"
    assert load_sampling_model(run)[1].step == 3


def test_jobs_default_to_the_runs_export(tmp_path):
    from speed.sample import job_weights
    from speed.train.run_layout import RunLayout

    cfg = load_config(None, [*NANO, f"run.output_uri={tmp_path}", "run.name=r1"])
    layout = RunLayout.for_run(cfg.run, cfg.storage)
    with pytest.raises(ConfigError) as missing:
        job_weights(None, cfg, key="sample.checkpoint_uri")
    message = str(missing.value)
    assert "sample.checkpoint_uri" in message and layout.export_uri in message
    assert "python -m ray_jobs.train" in message and "set sample.checkpoint_uri" in message
    # With checkpoints but no export yet, the message says how to sample the newest one.
    save_training_checkpoint(layout.checkpoint_uri(2), step=2)
    with pytest.raises(ConfigError, match=f"sample.checkpoint_uri={layout.root}"):
        job_weights(None, cfg, key="sample.checkpoint_uri")
    random_export(layout.export_uri)
    source = job_weights(None, cfg, key="sample.checkpoint_uri")
    assert source.kind == "export" and source.uri == os.path.join(layout.export_uri, "ema.safetensors")
    # A set key wins over the default.
    assert job_weights(layout.checkpoint_uri(2), cfg, key="sample.checkpoint_uri").kind == "checkpoint"

# --- the DiT converter -----------------------------------------------------------------------------


def _official_like_checkpoint(path, wrap: bool):
    description = dit_description("DiT-N/2", 64, num_classes=10)
    model = build_model(description.model_config(), description.input_size, description.in_channels)
    state = model.state_dict()
    payload = {"model": state, "ema": state, "opt": {"lr": torch.tensor(1e-4)}, "args": argparse.Namespace(x=1)} if wrap else state
    torch.save(payload, path)
    return state


@pytest.mark.parametrize("wrap", [False, True])
def test_convert_dit_checkpoint_round_trip(tmp_path, wrap):
    state = _official_like_checkpoint(tmp_path / "dit.pt", wrap)
    weights_uri, description = convert_dit_checkpoint(str(tmp_path / "dit.pt"), str(tmp_path / "export"),
                                                      "DiT-N/2", 64, num_classes=10)
    assert weights_uri.endswith("ema.safetensors") and description.is_latent and description.input_size == 8
    model, loaded = load_export(str(tmp_path / "export"))
    assert loaded.data_format == "latents" and loaded.latent_scale == pytest.approx(0.18215)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_convert_dit_rejects_wrong_model(tmp_path):
    _official_like_checkpoint(tmp_path / "dit.pt", wrap=False)
    with pytest.raises(WeightsError, match="--model"):
        convert_dit_checkpoint(str(tmp_path / "dit.pt"), str(tmp_path / "out"), "DiT-N/1", 64, num_classes=10)


class _RunsCode:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_dit_refuses_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        convert_dit_checkpoint(str(tmp_path / "evil.pt"), str(tmp_path / "out"), "DiT-N/2", 64, num_classes=10)
    assert not marker.exists()
    # The command-line converter: exit code 2, one clear line, one JSON line, no code run.
    from ray_jobs import convert_dit

    assert convert_dit.main([str(tmp_path / "evil.pt"), str(tmp_path / "out"), "--model", "DiT-N/2",
                             "--image-size", "64", "--num-classes", "10"]) == 2
    captured = capsys.readouterr()
    assert "refusing to load" in captured.err and "GLOBAL" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["event"] == "convert_dit_failed"
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_dit_cli(tmp_path, capsys):
    _official_like_checkpoint(tmp_path / "dit.pt", wrap=True)
    from ray_jobs import convert_dit

    assert convert_dit.main([str(tmp_path / "dit.pt"), str(tmp_path / "out"), "--model", "DiT-N/2",
                             "--image-size", "64", "--num-classes", "10"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["event"] == "convert_done" and record["in_channels"] == 4
    assert (tmp_path / "out" / "model.json").exists()
