"""The pure training loop (no Ray): update equivalence across workers and accumulation, FSDP2 vs
DDP, exact resume, non-finite handling, checkpoint compatibility."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speed.config import load_config
from speed.train import loop
from speed.train.checkpoint import NonFiniteWeightsError, incomplete_reason, is_complete, stored_incomplete_reason
from speed.train.distributed import DistEnv, accumulation_steps, micro_slices, rank_slice, worker_shares
from speed.train.sources import FixedSource, IndexedSource, LocalReporter

from tests.conftest import free_port

BASE = ["model.name=DiT-N/2", "train.log_every=2", "train.eval_every=0", "train.sample_every=0",
        "optim.lr=1e-3", "optim.warmup_steps=0"]


@pytest.fixture(autouse=True)
def _no_eval(monkeypatch):
    # Periodic sampling/eval are tested with the evaluation code; here they only cost time.
    monkeypatch.setattr(loop, "_evaluate", lambda *a, **k: {})
    monkeypatch.setattr(loop, "_sample_grid", lambda *a, **k: None)


def make_cfg(tmp, *extra):
    return load_config(None, [*BASE, f"run.output_uri={tmp}", *extra])


def fixed_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(n) % 10


def full_params(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().float() for k, v in state.items()}


def test_worker_shares_and_micro_slices():
    assert worker_shares(256, 7) == [37, 37, 37, 37, 36, 36, 36]
    assert sum(worker_shares(256, 7)) == 256
    assert rank_slice(10, 3, 2) == (7, 3)
    assert accumulation_steps(256, 8, 16) == 2
    assert micro_slices(4, 5, 2) == [(4, 3), (7, 2)]
    with pytest.raises(ValueError, match="global_batch_size"):
        worker_shares(3, 4)


def _one_step(rank, world, port, strategy, micro, out_file, tmp):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world)
    cfg = make_cfg(tmp, f"parallel.strategy={strategy}", "train.global_batch_size=8", f"train.micro_batch_size={micro}")
    trainer = loop.Trainer(cfg, env)
    x, y = fixed_batch()
    trainer.train_step(0, x[trainer.offset: trainer.offset + trainer.count], y[trainer.offset: trainer.offset + trainer.count])
    loss = trainer.metrics.read(env)["loss"]
    params = full_params(trainer.model)
    if rank == 0:
        torch.save({"loss": loss, "params": params}, out_file)
    if world > 1:
        dist.destroy_process_group()


def run_step(world, strategy, micro, tmp):
    out = Path(tmp) / f"{strategy}-{world}-{micro}.pt"
    if world == 1:
        _one_step(0, 1, 0, strategy, micro, out, tmp)
    else:
        mp.start_processes(_one_step, args=(world, free_port(), strategy, micro, out, tmp), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=True)


def test_accumulation_equals_two_workers_and_fsdp_matches_ddp(tmp_path):
    single = run_step(1, "none", 4, tmp_path)  # one worker, accumulation 2
    fsdp = run_step(2, "fsdp", 4, tmp_path)  # two workers, accumulation 1
    ddp = run_step(2, "ddp", 8, tmp_path)
    assert abs(single["loss"] - fsdp["loss"]) < 1e-6
    assert abs(fsdp["loss"] - ddp["loss"]) < 1e-6
    for key, value in single["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp["params"][key], value, rtol=1e-5, atol=1e-6)
    moved = sum(float((single["params"][k] - v).abs().sum()) for k, v in full_params(
        loop.Trainer(make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8"), DistEnv()).model).items())
    assert moved > 0  # the step really changed the weights


def digits_source(seed=0, global_batch=8):
    from speed.data.digits import load_digits

    images, labels = load_digits(8, 1)
    return IndexedSource(images, labels, seed, global_batch)


def test_resume_is_bit_exact(tmp_path):
    """A run stopped halfway and resumed ends with exactly the weights of an uninterrupted one
    (single CPU worker, fixed seed, the in-memory digits in their seeded order)."""
    common = ["parallel.strategy=none", "train.global_batch_size=8", "train.checkpoint_every=3"]
    straight_cfg = make_cfg(tmp_path / "a", *common, "train.steps=6")
    straight = loop.train(straight_cfg, DistEnv(), digits_source(), LocalReporter(str(tmp_path / "a" / "digits-speed")),
                          progress=False)
    reporter = LocalReporter(str(tmp_path / "b" / "digits-speed"))
    first = loop.train(make_cfg(tmp_path / "b", *common, "train.steps=3"), DistEnv(), digits_source(), reporter,
                       progress=False)
    assert first.steps == 3 and is_complete(reporter.latest())
    # A new process would build everything afresh: a new source, a new Trainer, the checkpoint.
    resumed = loop.train(make_cfg(tmp_path / "b", *common, "train.steps=6"), DistEnv(), digits_source(), reporter,
                         resume_dir=reporter.latest(), progress=False)
    assert resumed.start_step == 3 and resumed.steps == 6
    from safetensors.torch import load_file

    a = load_file(straight.export_uri)
    b = load_file(resumed.export_uri)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The final training checkpoint's EMA is what the export holds (samplers accept either).
    from speed.sample import load_sampling_model

    model, description = load_sampling_model(reporter.latest())
    assert description.step == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, b[key]), key
    # metrics.jsonl continues from the checkpoint step without duplicates
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "digits-speed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_nonfinite_loss_stops_with_step_range_and_writes_no_checkpoint(tmp_path):
    x, y = fixed_batch()
    x = x * float("inf")
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=4", "train.checkpoint_every=4")
    reporter = LocalReporter(str(tmp_path / "digits-speed"))
    with pytest.raises(loop.NonFiniteLossError, match="between steps 1 and 2"):
        loop.train(cfg, DistEnv(), FixedSource(x, y), reporter, progress=False)
    assert reporter.latest() is None


def test_nonfinite_skip_mode_skips_steps(tmp_path):
    x, y = fixed_batch()
    x[0] = float("nan")
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=2",
                   "train.on_nonfinite=skip", "train.checkpoint_every=0")
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), LocalReporter(str(tmp_path / "digits-speed")), progress=False)
    assert result.history[-1]["skipped_steps"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(result.export_uri).values())


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8")
    trainer = loop.Trainer(cfg, DistEnv())
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError):
        loop._checkpoint(trainer, cfg, DistEnv(), 1, 8, LocalReporter(str(tmp_path / "r")), {})


def test_lr_schedule_is_pure():
    from speed.config.schema import OptimConfig
    from speed.train.optim import lr_at

    optim = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, optim) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_small_dit_overfits_a_digits_batch(tmp_path):
    from speed.data.digits import load_digits

    images, labels = load_digits(8, 1)
    x, y = images[:16], labels[:16]
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=16", "train.steps=150",
                   "train.log_every=25", "optim.lr=2e-3", "diffusion.timesteps.name=uniform", "train.checkpoint_every=0",
                   "model.class_dropout_prob=0.0")
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), LocalReporter(str(tmp_path / "digits-speed")), progress=False)
    first, last = result.history[0]["mse"], result.history[-1]["mse"]
    assert last < 0.5 * first, (first, last)


def test_incomplete_checkpoints_are_recognised_locally_and_in_s3(tmp_path, s3_bucket):
    """Ranks upload their parts separately: a folder with state.json but a missing or short shard
    (or no state.json) must never be picked for a restart."""
    from speed import storage

    x, y = fixed_batch()
    reporter = LocalReporter(str(tmp_path / "run" / "digits-speed"))
    loop.train(make_cfg(tmp_path / "run", "parallel.strategy=none", "train.global_batch_size=8", "train.steps=2",
                        "train.checkpoint_every=2"), DistEnv(), FixedSource(x, y), reporter, progress=False)
    good = Path(reporter.latest())
    assert incomplete_reason(good) is None
    shard = sorted(good.glob("*.distcp"))[0]

    def variant(name, change):
        import shutil

        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        remote = f"{s3_bucket}/{name}"
        for path in folder.iterdir():
            storage.write_bytes(f"{remote}/{path.name}", path.read_bytes())
        return folder, remote

    cases = {
        "no-state": (lambda f: (f / "state.json").unlink(), "state.json is missing"),
        "no-shard": (lambda f: (f / shard.name).unlink(), f"shard {shard.name} is missing"),
        "short-shard": (lambda f: (f / shard.name).write_bytes(shard.read_bytes()[:100]), "truncated"),
    }
    for name, (change, reason) in cases.items():
        folder, remote = variant(name, change)
        assert reason in incomplete_reason(folder), name
        assert reason in stored_incomplete_reason(remote), name
    _, remote = variant("whole", lambda f: None)
    assert stored_incomplete_reason(remote) is None
