"""REPA: the loss against a closed form, the encoder loader (safetensors, weights-only torch files,
pickles refused, unused keys ignored, missing ones named), and training with a frozen encoder
that stays outside the optimizer. The encoder is a tiny timm ViT with random weights."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from speed.config import load_config
from speed.config.schema import ConfigError, RepaConfig
from speed.models.convert import UnsafeCheckpointError
from speed.models.export import WeightsError
from speed.models.registry import default_repa_block
from speed.models.repa import RepaAligner, alignment_loss, build_encoder
from speed.train import components, loop
from speed.train.distributed import DistEnv
from speed.train.run_layout import RunLayout
from speed.train.sources import FixedSource, LocalReporter

from tests.conftest import free_port

ENCODER = "vit_tiny_patch16_224"
# 32 px, 4 px patches: an 8x8 feature grid, resized to DiT-N/2's 4x4 token grid on 8x8 digits.
ENCODER_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def repa_config(weights_uri, **extra):
    return RepaConfig(encoder=ENCODER, weights_uri=str(weights_uri), encoder_kwargs=dict(ENCODER_KWARGS), **extra)


@pytest.fixture
def encoder_weights(tmp_path):
    """The encoder's whole timm state dict with a classifier head, as safetensors."""
    import timm

    torch.manual_seed(0)
    encoder = timm.create_model(ENCODER, pretrained=False, num_classes=7, **ENCODER_KWARGS)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    assert "head.weight" in state
    path = tmp_path / "encoder.safetensors"
    save_file(state, str(path))
    return path, state


def overrides(weights_uri):
    return [f"repa.encoder={ENCODER}", f"repa.weights_uri={weights_uri}",
            *(f"repa.encoder_kwargs.{k}={v}" for k, v in ENCODER_KWARGS.items())]


@pytest.fixture(autouse=True)
def _no_eval(monkeypatch):
    monkeypatch.setattr(components.Evaluator, "run", lambda *a, **k: {})
    monkeypatch.setattr(components.SampleGrid, "run", lambda *a, **k: {})


def test_loss_matches_the_closed_form_on_fixed_features():
    # Sample 0: tokens equal to, orthogonal to and opposite their targets -> cos 1, 0, -1.
    # Sample 1: a 60-degree angle at every token -> cos 1/2; scale never matters.
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    angle = math.pi / 3

    def rotate(v):
        return torch.stack([v[..., 0] * math.cos(angle) - v[..., 1] * math.sin(angle),
                            v[..., 0] * math.sin(angle) + v[..., 1] * math.cos(angle)], -1)

    projected = torch.stack([torch.tensor([[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), 4 * rotate(target[1])])
    loss = alignment_loss(projected, target)
    torch.testing.assert_close(loss, torch.tensor([-(1 + 0 - 1) / 3, -0.5]))
    # Through the aligner: weight x loss, and routed hidden states compare with their own tokens.
    aligner = RepaAligner(torch.nn.Identity(), torch.nn.Identity(), block=1, weight=0.5, resolution=8,
                          token_grid=(1, 3))
    torch.testing.assert_close(aligner.loss(projected, target), 0.5 * loss)
    keep = torch.tensor([[0, 2], [1, 2]])
    kept = torch.stack([projected[0, [0, 2]], projected[1, [1, 2]]])
    torch.testing.assert_close(aligner.loss(kept, target, keep), torch.tensor([0.5 * -(1 - 1) / 2, 0.5 * -0.5]))


def test_default_block_is_early_and_valid_for_any_depth():
    assert [default_repa_block(d) for d in (1, 2, 4, 12, 24, 28)] == [1, 1, 1, 4, 8, 8]
    for depth in range(1, 40):
        assert 1 <= default_repa_block(depth) <= min(depth, 8)


def test_encoder_features_are_resized_to_the_token_grid(encoder_weights):
    path, _ = encoder_weights
    aligner = RepaAligner.build(repa_config(path), hidden_size=64, block=1, token_grid=(4, 4))
    assert aligner.resolution == 32 and aligner.prefix_tokens == 1
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    x = aligner.encoder_input(images)
    assert x.shape == (2, 3, 32, 32)
    target = aligner.target(images)
    assert target.shape == (2, 16, 32) and not target.requires_grad
    # Resizing an 8x8 grid to 4x4 averages the 2x2 patches of each token.
    features = torch.arange(2 * 65 * 32, dtype=torch.float32).reshape(2, 65, 32)
    grid = features[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
    expected = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(aligner.features_on_grid(features), expected)


def test_loader_ignores_unused_keys_and_names_missing_ones(encoder_weights, tmp_path):
    path, state = encoder_weights
    aligner = RepaAligner.build(repa_config(path), hidden_size=64, block=1, token_grid=(4, 4))
    for name, value in aligner.encoder.state_dict().items():
        assert torch.equal(value, state[name]), name  # the head was ignored, everything else loaded
    partial = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match=r"repa.weights_uri: .*blocks\.0\.attn\.qkv\.weight"):
        RepaAligner.build(repa_config(tmp_path / "partial.safetensors"), hidden_size=64, block=1, token_grid=(4, 4))
    # A weights-only torch file of the same state dict is accepted too.
    torch.save(state, tmp_path / "encoder.pt")
    from_torch = RepaAligner.build(repa_config(tmp_path / "encoder.pt"), hidden_size=64, block=1, token_grid=(4, 4))
    assert torch.equal(from_torch.encoder.pos_embed, aligner.encoder.pos_embed)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_given_as_encoder_weights_is_refused(encoder_weights, tmp_path):
    path, state = encoder_weights
    marker = tmp_path / "pwned"
    torch.save({**state, "pos_embed": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="repa.weights_uri: refusing to load"):
        RepaAligner.build(repa_config(tmp_path / "evil.pt"), hidden_size=64, block=1, token_grid=(4, 4))
    assert not marker.exists()
    import pickle

    (tmp_path / "model.pkl").write_bytes(pickle.dumps(build_encoder(repa_config(path))))
    with pytest.raises(UnsafeCheckpointError, match="repa.weights_uri: refusing to load"):
        RepaAligner.build(repa_config(tmp_path / "model.pkl"), hidden_size=64, block=1, token_grid=(4, 4))


def test_config_checks_name_the_keys(encoder_weights):
    path, _ = encoder_weights
    with pytest.raises(ConfigError, match="repa.weights_uri"):
        load_config(None, [f"repa.encoder={ENCODER}"])
    with pytest.raises(ConfigError, match="repa.block=9"):
        load_config(None, [*overrides(path), "repa.block=9"])
    # REPA on latents is a config that loads; whether the latents carry images is the data's check.
    assert load_config(None, [*overrides(path), "data.format=latents", "data.uri=somewhere", "data.resolution=64",
                              "data.channels=4"]).repa.encoder == ENCODER
    cfg = load_config(None, overrides(path))  # the digits model: encoder and weights alone suffice
    assert cfg.repa.weight == 0.5 and cfg.repa.block is None


def _train_cfg(tmp_path, weights, *extra):
    return load_config(None, ["model.name=DiT-N/2", f"run.output_uri={tmp_path}", "parallel.strategy=none",
                              "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1",
                              "train.checkpoint_every=2", "train.eval_every=0", "train.sample_every=0",
                              "optim.lr=1e-3", "optim.warmup_steps=0", "repa.projector_dim=32", *overrides(weights),
                              *extra])


def test_training_keeps_the_encoder_frozen_and_outside_the_optimizer(encoder_weights, tmp_path):
    path, _ = encoder_weights
    cfg = _train_cfg(tmp_path, path, "train.steps=3")
    trainer = loop.build_trainer(cfg, DistEnv())
    aligner = trainer.extras.aligner
    encoder_before = {k: v.clone() for k, v in aligner.encoder.state_dict().items()}
    projector_before = {k: v.clone() for k, v in aligner.projector.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    optimised |= {id(p) for group in trainer.extras.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in aligner.encoder.parameters())
    assert all(not p.requires_grad for p in aligner.encoder.parameters())
    assert all(id(p) in optimised for p in aligner.projector.parameters())
    assert not any(k.startswith("repa") or "encoder" in k for k in trainer.model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    for step in range(2):
        trainer.train_step(step, x, y)
    assert not aligner.encoder.training
    for k, v in aligner.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert any(not torch.equal(v, projector_before[k]) for k, v in aligner.projector.state_dict().items())
    assert "repa_projector" in trainer.state_dict() and not any("encoder" in k for k in trainer.state_dict())
    # The diffusion loss plus the alignment term, logged by name; REPA's FLOPs are counted.
    values = trainer.metrics.read(DistEnv())
    assert -0.5 <= values["repa_loss"] <= 0.5 and values["loss"] > values["repa_loss"]
    plain = loop.build_trainer(load_config(None, ["model.name=DiT-N/2", "train.micro_batch_size=4"]), DistEnv())
    assert trainer.train_flops_per_image > plain.train_flops_per_image


def test_repa_with_routing_trains_exports_and_resumes(encoder_weights, tmp_path):
    path, _ = encoder_weights
    extra = ["model.routing.fraction=0.5", "repa.block=1"]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    straight_cfg = _train_cfg(tmp_path / "a", path, "train.steps=4", *extra)
    straight = loop.train(straight_cfg, DistEnv(), FixedSource(x, y), LocalReporter(RunLayout.for_run(straight_cfg.run)),
                          progress=False)
    assert all("repa_loss" in r for r in straight.history if "loss" in r)
    first_cfg = _train_cfg(tmp_path / "b", path, "train.steps=2", *extra)
    reporter = LocalReporter(RunLayout.for_run(first_cfg.run))
    loop.train(first_cfg, DistEnv(), FixedSource(x, y), reporter, progress=False)
    resumed = loop.train(_train_cfg(tmp_path / "b", path, "train.steps=4", *extra), DistEnv(), FixedSource(x, y),
                         reporter, resume_dir=reporter.latest(), progress=False)
    from safetensors.torch import load_file

    a, b = load_file(straight.export_uri), load_file(resumed.export_uri)
    assert set(a) == set(b) and not any("repa" in k for k in a)  # the projector is train-only
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _one_step(rank, world, port, out_file, tmp, weights, strategy="fsdp"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world)
    cfg = _train_cfg(tmp, weights, f"parallel.strategy={strategy}", "model.routing.fraction=0.5",
                     f"train.micro_batch_size={4 if strategy == 'fsdp' else 8}")
    trainer = loop.build_trainer(cfg, env)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    rows = slice(trainer.offset, trainer.offset + trainer.count)
    trainer.train_step(0, x[rows], y[rows])
    values = trainer.metrics.read(env)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {**get_model_state_dict(trainer.model, options=options),
             **{f"projector.{k}": v for k, v in get_model_state_dict(trainer.extras.aligner.projector,
                                                                     options=options).items()}}
    if rank == 0:
        torch.save({"loss": values["loss"], "repa_loss": values["repa_loss"],
                    "params": {k: v.detach().clone().float() for k, v in state.items()}}, out_file)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_workers_equal_one_worker_with_repa_and_routing(encoder_weights, tmp_path, strategy):
    """The projector is wrapped on its own (FSDP2 root or DDP); the encoder is replicated."""
    path, _ = encoder_weights
    single_file, fsdp_file = Path(tmp_path) / "single.pt", Path(tmp_path) / "fsdp.pt"
    _one_step(0, 1, 0, single_file, tmp_path, path)  # one worker, accumulation 2
    mp.start_processes(_one_step, args=(2, free_port(), fsdp_file, tmp_path, path, strategy), nprocs=2,
                       start_method="spawn")
    single, fsdp = torch.load(single_file, weights_only=True), torch.load(fsdp_file, weights_only=True)
    assert abs(single["loss"] - fsdp["loss"]) < 1e-6 and abs(single["repa_loss"] - fsdp["repa_loss"]) < 1e-6
    for key, value in single["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_routing_and_repa_work_under_the_flow_objective(encoder_weights, tmp_path):
    path, _ = encoder_weights
    cfg = _train_cfg(tmp_path, path, "model.name=LightningDiT-N/2", "diffusion.objective=flow", "model.learn_sigma=false",
                     "sampling.sampler=euler", "model.routing.fraction=0.5")
    trainer = loop.build_trainer(cfg, DistEnv())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    for step in range(2):
        trainer.train_step(step, x, y)
    values = trainer.metrics.read(DistEnv())
    assert math.isfinite(values["loss"]) and math.isfinite(values["repa_loss"])


LATENT_DATA = ["data.format=latents", "data.uri=unused-by-these-tests", "data.resolution=64", "data.channels=4"]


def _latent_batch():
    """8 latents [4, 8, 8] (DiT-N/2 sees a 4x4 token grid) and their clean 64 px images, uint8."""
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(8, 4, 8, 8, generator=g)
    clean = torch.randint(0, 256, (8, 3, 64, 64), generator=g, dtype=torch.uint8)
    return latents, torch.arange(8) % 10, clean


def test_repa_on_latents_trains_on_the_clean_images_and_logs_repa_loss(encoder_weights, tmp_path):
    path, _ = encoder_weights
    latents, y, clean = _latent_batch()
    cfg = _train_cfg(tmp_path, path, "train.steps=3", *LATENT_DATA)
    result = loop.train(cfg, DistEnv(), FixedSource(latents, y, clean), LocalReporter(RunLayout.for_run(cfg.run)),
                        progress=False)
    logged = [r for r in result.history if "loss" in r]
    assert len(logged) == 3 and all(math.isfinite(r["repa_loss"]) for r in logged)

    # The encoder saw the clean images (uint8 or [-1, 1] alike), never the latents.
    trainer = loop.build_trainer(cfg, DistEnv())
    aligner = trainer.extras.aligner
    seen = []
    aligner.encoder.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    trainer.train_step(0, latents, y, clean)
    assert seen[0].shape == (4, 3, 32, 32)  # one micro-batch of 4, resized to the encoder's 32 px
    torch.testing.assert_close(seen[0], aligner.encoder_input(clean[:4]))
    torch.testing.assert_close(aligner.target(clean), aligner.target(clean.float() / 127.5 - 1), atol=1e-5, rtol=1e-5)

    # Missing images are refused with the fix, not silently encoded from the latent.
    with pytest.raises(ValueError, match="prepare.keep_images=true"):
        trainer.train_step(1, latents, y)


def test_repa_on_latents_slices_clean_images_like_the_latents(encoder_weights, tmp_path):
    """Accumulation over micro-batches of 4 equals one micro-batch of 8: each micro-batch's clean
    images are the rows of its latents."""
    path, _ = encoder_weights
    latents, y, clean = _latent_batch()
    results = []
    for micro in (4, 8):
        trainer = loop.build_trainer(_train_cfg(tmp_path, path, f"train.micro_batch_size={micro}", *LATENT_DATA),
                                     DistEnv())
        trainer.train_step(0, latents, y, clean)
        values = trainer.metrics.read(DistEnv())
        results.append((values, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
    (a, params_a), (b, params_b) = results
    assert abs(a["repa_loss"] - b["repa_loss"]) < 1e-6 and abs(a["loss"] - b["loss"]) < 1e-6
    for key, value in params_a.items():
        torch.testing.assert_close(params_b[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_latents_without_images_are_refused_naming_the_key(encoder_weights, tmp_path):
    """The training job's preflight reads _meta.json: latents encoded without prepare.keep_images
    cannot feed REPA."""
    import json

    from ray_jobs.data import preflight_data
    from speed.data.latents import LATENT_META_NAME, latent_shard_table, shard_name, table_to_parquet_bytes

    path, _ = encoder_weights
    out = tmp_path / "latents"
    out.mkdir()
    means = torch.zeros(2, 2, 4, 8, 8).numpy().astype("float16")
    (out / shard_name(0, 1)).write_bytes(table_to_parquet_bytes(latent_shard_table(["a", "b"], [0, 1], means, means)))
    meta = {"format": "speed-latents", "version": 1, "latent_shape": [4, 8, 8], "resolution": 64, "num_shards": 1,
            "complete": True, "max_label": 1, "num_classes_found": 2, "class_index": {}}
    (out / LATENT_META_NAME).write_text(json.dumps(meta))
    data = ["data.format=latents", f"data.uri={out}", "data.resolution=64", "data.channels=4", "data.catalog=disabled"]
    assert preflight_data(load_config(None, data))["images"] == 2  # without REPA: fine
    with pytest.raises(ValueError, match="re-encode with prepare.keep_images=true"):
        preflight_data(load_config(None, [*data, *overrides(path)]))
