"""Token routing (TREAD): training only, exact against a hand-built reference, FLOPs fall by the
expected share, resumes bit-exact, and 2 FSDP workers equal 1 worker with accumulation."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speed.config import load_config
from speed.config.schema import ConfigError
from speed.models import build_dit
from speed.models.registry import describe
from speed.models.routing import Route, TokenRouter, draw_keep, resolve_span
from speed.train import components, loop
from speed.train.distributed import DistEnv
from speed.train.flops import train_flops_per_image
from speed.train.run_layout import RunLayout
from speed.train.sources import FixedSource, LocalReporter

from tests.conftest import free_port

ROUTED = ["model.routing.fraction=0.5", "model.routing.start_block=1", "model.routing.end_block=3"]
BASE = ["model.name=DiT-N/2", "model.depth=4", "train.log_every=2", "train.eval_every=0", "train.sample_every=0",
        "optim.lr=1e-3", "optim.warmup_steps=0"]


@pytest.fixture(autouse=True)
def _no_eval(monkeypatch):
    monkeypatch.setattr(components.Evaluator, "run", lambda *a, **k: {})
    monkeypatch.setattr(components.SampleGrid, "run", lambda *a, **k: {})


def make_cfg(tmp, *extra):
    return load_config(None, [*BASE, f"run.output_uri={tmp}", *extra])


def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _inputs(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def hand_routed_forward(model, x, t, y, drop_mask=None, route=None, capture_block=None):
    """DiT's forward with TREAD written out one sample at a time: the kept tokens of each sample
    alone go through the routed blocks; the others wait and rejoin at the same positions."""
    assert capture_block is None
    tokens = model.x_embedder(x)
    if model.pos_embed is not None:
        tokens = tokens + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training, force_drop_ids=drop_mask)
    outputs = []
    for i in range(x.shape[0]):
        h, ci = tokens[i : i + 1], c[i : i + 1]
        full_rope = model.rope.table if model.rope is not None else None
        for index, block in enumerate(model.blocks):
            if route is not None and index == route.start:
                waiting, kept_index = h, route.keep[i]
                h = h[:, kept_index]
            if route is not None and index == route.end:
                h = waiting.index_copy(1, kept_index, h)
            routed = route is not None and route.start <= index < route.end
            rope = None if full_rope is None else (full_rope[kept_index] if routed else full_rope)
            h = block(h, ci) if rope is None else block(h, ci, rope)
        if route is not None and route.end == len(model.blocks):
            h = waiting.index_copy(1, kept_index, h)
        outputs.append(model.unpatchify(model.final_layer(h, ci)))
    return torch.cat(outputs)


def test_span_defaults_and_checks():
    assert resolve_span(None, None, 4) == (1, 3)
    assert resolve_span(None, None, 2) == (1, 2)
    assert resolve_span(0, 28, 28) == (0, 28)
    with pytest.raises(ValueError, match="end_block"):
        resolve_span(2, 2, 4)
    with pytest.raises(ConfigError, match="model.routing.end_block=9"):
        load_config(None, ["model.routing.fraction=0.5", "model.routing.end_block=9"])
    with pytest.raises(ConfigError, match="model.routing.fraction"):
        load_config(None, ["model.routing.fraction=1.0"])
    router = TokenRouter(0.5, None, None, depth=4, num_tokens=16)
    assert router.enabled and router.kept == 8 and (router.start, router.end) == (1, 3)
    assert not TokenRouter(0.0, None, None, depth=4, num_tokens=16).enabled


def test_draws_are_keyed_by_step_and_sliceable():
    router = TokenRouter(0.25, None, None, depth=4, num_tokens=16)
    a = router.draw(seed=0, step=5, global_batch=8)
    assert torch.equal(a, router.draw(seed=0, step=5, global_batch=8))
    assert not torch.equal(a, router.draw(seed=0, step=6, global_batch=8))
    assert a.shape == (8, 12) and bool((a[:, 1:] > a[:, :-1]).all())  # sorted, distinct
    assert len({tuple(row.tolist()) for row in a}) > 1  # per-sample draws
    keep = draw_keep(4, 10, 3, torch.Generator().manual_seed(0))
    assert keep.shape == (4, 3) and int(keep.max()) < 10


@pytest.mark.parametrize("name", ["DiT-N/2", "LightningDiT-N/2"])
def test_routing_never_changes_evaluation_outputs(name):
    model = build_dit(name, input_size=8, in_channels=1, num_classes=10, depth=4)
    _randomize(model)
    x, t, y = _inputs()
    route = Route(draw_keep(3, 16, 5, torch.Generator().manual_seed(1)), 1, 3)
    model.eval()
    plain = model(x, t, y)
    assert torch.equal(model(x, t, y, route=route), plain)
    model.train()
    drop = torch.zeros(3, dtype=torch.bool)
    routed = model(x, t, y, drop_mask=drop, route=route)
    assert not torch.allclose(routed, plain)  # in training it does route


@pytest.mark.parametrize("name,span", [("DiT-N/2", (1, 3)), ("DiT-N/2", (0, 4)), ("LightningDiT-N/2", (2, 4))])
def test_routed_forward_equals_hand_built_reference(name, span):
    model = build_dit(name, input_size=8, in_channels=1, num_classes=10, depth=4).train()
    _randomize(model, seed=2)
    x, t, y = _inputs()
    route = Route(draw_keep(3, 16, 6, torch.Generator().manual_seed(4)), *span)
    drop = torch.tensor([False, True, False])
    torch.testing.assert_close(model(x, t, y, drop_mask=drop, route=route),
                               hand_routed_forward(model, x, t, y, drop_mask=drop, route=route), rtol=1e-5, atol=1e-6)


def test_routed_training_step_equals_hand_built_reference(tmp_path):
    """One optimizer step of the Trainer with routing on equals a Trainer without routing whose
    model runs the hand-built routed forward with the same kept tokens."""
    common = ["parallel.strategy=none", "train.global_batch_size=6", "train.micro_batch_size=6"]
    routed = loop.build_trainer(make_cfg(tmp_path, *common, *ROUTED), DistEnv())
    reference = loop.build_trainer(make_cfg(tmp_path, *common), DistEnv())
    assert routed.extras.router is not None and reference.extras.router is None
    keep = routed.extras.router.draw(routed.seed, 0, 6)
    route = Route(keep, 1, 3)

    def forward(self, x, t, y, drop_mask=None):
        return hand_routed_forward(self, x, t, y, drop_mask=drop_mask, route=route)

    reference.model.forward = types.MethodType(forward, reference.model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(6) % 10
    routed.train_step(0, x, y)
    reference.train_step(0, x, y)
    a, b = routed.metrics.read(DistEnv()), reference.metrics.read(DistEnv())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (name, p), (_, q) in zip(routed.model.named_parameters(), reference.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _block_flops(tokens: int, hidden: int) -> int:
    """Forward + backward (3x forward) matmul FLOPs of one DiT block on `tokens` tokens: qkv,
    proj and the 4x MLP are 12 D^2 multiply-adds per token; QK^T and AV are 2 T^2 D."""
    return 3 * (2 * 12 * hidden * hidden * tokens + 4 * tokens * tokens * hidden)


@pytest.mark.parametrize("fraction,span", [(0.5, (1, 3)), (0.25, (0, 4))])
def test_flops_fall_by_the_expected_share(tmp_path, fraction, span):
    plain_cfg = make_cfg(tmp_path)
    description = describe(plain_cfg.model, plain_cfg.data, plain_cfg.diffusion)
    router = TokenRouter(fraction, span[0], span[1], depth=4, num_tokens=16)
    full = train_flops_per_image(description, batch_size=4)
    routed = train_flops_per_image(description, batch_size=4, router=router)
    saved = (span[1] - span[0]) * (_block_flops(16, 64) - _block_flops(router.kept, 64))
    assert full - routed == saved
    assert routed < full
    # Every log record carries the figure.
    cfg = make_cfg(tmp_path / "run", "parallel.strategy=none", "train.global_batch_size=4", "train.micro_batch_size=4",
                   "train.steps=2", "train.checkpoint_every=100", "model.routing.fraction=0.5")
    x, y = torch.zeros(4, 1, 8, 8), torch.arange(4)
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), LocalReporter(RunLayout.for_run(cfg.run)), progress=False)
    records = [r for r in result.history if "loss" in r]
    assert records and all(r["train_flops_per_image"] < full for r in records)


def test_routing_works_with_activation_checkpointing(tmp_path):
    common = ["parallel.strategy=none", "train.global_batch_size=4", "train.micro_batch_size=4", *ROUTED]
    plain = loop.build_trainer(make_cfg(tmp_path, *common), DistEnv())
    checkpointed = loop.build_trainer(make_cfg(tmp_path, *common, "parallel.activation_checkpointing=true"), DistEnv())
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    plain.train_step(0, x, y)
    checkpointed.train_step(0, x, y)
    from speed.train.ema import clean_name

    theirs = {clean_name(n): p for n, p in checkpointed.model.named_parameters()}
    for name, p in plain.model.named_parameters():
        torch.testing.assert_close(theirs[name], p, rtol=1e-6, atol=1e-7)


def digits_source(seed=0, global_batch=8):
    from speed.data.digits import load_digits
    from speed.train.sources import IndexedSource

    images, labels = load_digits(8, 1)
    return IndexedSource(images, labels, seed, global_batch)


def test_resume_with_routing_is_bit_exact(tmp_path):
    common = ["parallel.strategy=none", "train.global_batch_size=8", "train.checkpoint_every=2", *ROUTED]
    straight_cfg = make_cfg(tmp_path / "a", *common, "train.steps=4")
    straight = loop.train(straight_cfg, DistEnv(), digits_source(), LocalReporter(RunLayout.for_run(straight_cfg.run)),
                          progress=False)
    first_cfg = make_cfg(tmp_path / "b", *common, "train.steps=2")
    reporter = LocalReporter(RunLayout.for_run(first_cfg.run))
    loop.train(first_cfg, DistEnv(), digits_source(), reporter, progress=False)
    resumed = loop.train(make_cfg(tmp_path / "b", *common, "train.steps=4"), DistEnv(), digits_source(), reporter,
                         resume_dir=reporter.latest(), progress=False)
    from safetensors.torch import load_file

    a, b = load_file(straight.export_uri), load_file(resumed.export_uri)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _one_step(rank, world, port, micro, out_file, tmp):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world)
    cfg = make_cfg(tmp, "parallel.strategy=fsdp", "train.global_batch_size=8", f"train.micro_batch_size={micro}",
                   *ROUTED)
    trainer = loop.build_trainer(cfg, env)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    rows = slice(trainer.offset, trainer.offset + trainer.count)
    trainer.train_step(0, x[rows], y[rows])
    loss = trainer.metrics.read(env)["loss"]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"loss": loss, "params": {k: v.detach().clone().float() for k, v in state.items()}}, out_file)
    if world > 1:
        dist.destroy_process_group()


def test_two_fsdp_workers_equal_one_worker_with_accumulation_when_routing(tmp_path):
    single_file, fsdp_file = Path(tmp_path) / "single.pt", Path(tmp_path) / "fsdp.pt"
    _one_step(0, 1, 0, 4, single_file, tmp_path)  # one worker, accumulation 2
    mp.start_processes(_one_step, args=(2, free_port(), 4, fsdp_file, tmp_path), nprocs=2, start_method="spawn")
    single, fsdp = torch.load(single_file, weights_only=True), torch.load(fsdp_file, weights_only=True)
    assert abs(single["loss"] - fsdp["loss"]) < 1e-6
    for key, value in single["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_routing_works_with_torch_compile_and_rope(tmp_path):
    """Compiled blocks (two token counts: all and kept) train exactly like eager ones."""
    common = ["model.name=LightningDiT-N/2", "parallel.strategy=none", "train.global_batch_size=4",
              "train.micro_batch_size=4", "parallel.activation_checkpointing=true", *ROUTED]
    eager = loop.build_trainer(make_cfg(tmp_path, *common), DistEnv())
    compiled = loop.build_trainer(make_cfg(tmp_path, *common, "parallel.compile=true"), DistEnv())
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    for step in range(2):
        eager.train_step(step, x, y)
        compiled.train_step(step, x, y)
    assert compiled.metrics.read(DistEnv())["loss"] == pytest.approx(eager.metrics.read(DistEnv())["loss"], rel=1e-5)
