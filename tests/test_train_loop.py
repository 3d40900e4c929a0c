"""The pure training loop (no Ray): update equivalence across workers and accumulation, FSDP2 vs
DDP, exact resume, non-finite handling, checkpoint compatibility."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speed.config import load_config
from speed.train import loop
from speed.train import components
from speed.train.checkpoint import NonFiniteWeightsError, incomplete_reason, is_complete
from speed.train.distributed import DistEnv, accumulation_steps, micro_slices, rank_slice, worker_shares
from speed.train.run_layout import RunLayout
from speed.train.sources import FixedSource, IndexedSource, LocalReporter

from tests.conftest import free_port

BASE = ["model.name=DiT-N/2", "train.log_every=2", "train.eval_every=0", "train.sample_every=0",
        "optim.lr=1e-3", "optim.warmup_steps=0"]


@pytest.fixture(autouse=True)
def _no_eval(monkeypatch):
    # Periodic sampling/eval are tested with the evaluation code; here they only cost time.
    monkeypatch.setattr(components.Evaluator, "run", lambda *a, **k: {})
    monkeypatch.setattr(components.SampleGrid, "run", lambda *a, **k: {})


def make_cfg(tmp, *extra):
    return load_config(None, [*BASE, f"run.output_uri={tmp}", *extra])


def reporter_for(cfg):
    return LocalReporter(RunLayout.for_run(cfg.run, cfg.storage), keep=cfg.train.keep_checkpoints)


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
    trainer = loop.build_trainer(cfg, env)
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
        loop.build_trainer(make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8"), DistEnv()).model).items())
    assert moved > 0  # the step really changed the weights


def digits_source(seed=0, global_batch=8):
    from speed.data.digits import load_digits

    images, labels = load_digits(8, 1)
    return IndexedSource(images, labels, seed, global_batch)


FLOW = ["diffusion.objective=flow", "model.learn_sigma=false", "sampling.sampler=euler", "sampling.steps=10"]


@pytest.mark.parametrize("objective", [[], FLOW, [*FLOW, "diffusion.timesteps.name=loss_aware",
                                                  "diffusion.timesteps.loss_aware.history=1"],
                                       ["diffusion.timesteps.name=progress", "diffusion.timesteps.progress.warmup=1",
                                        "diffusion.timesteps.progress.bins=2", "diffusion.timesteps.weighting=progress"],
                                       [*FLOW, "diffusion.timesteps.weighting=learned"]],
                         ids=["ddpm", "flow", "flow-loss_aware", "progress", "flow-speed+learned"])
def test_resume_is_bit_exact(tmp_path, objective):
    """A run stopped halfway and resumed ends with exactly the weights of an uninterrupted one
    (single CPU worker, fixed seed, the in-memory digits in their seeded order), under both
    objectives and with an adaptive strategy's state."""
    common = ["parallel.strategy=none", "train.global_batch_size=8", "train.checkpoint_every=3", *objective]
    straight_cfg = make_cfg(tmp_path / "a", *common, "train.steps=6")
    straight = loop.train(straight_cfg, DistEnv(), digits_source(), reporter_for(straight_cfg), progress=False)
    first_cfg = make_cfg(tmp_path / "b", *common, "train.steps=3")
    reporter = reporter_for(first_cfg)
    first = loop.train(first_cfg, DistEnv(), digits_source(), reporter, progress=False)
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
    # the metrics continue from the checkpoint step without duplicates, in one part per checkpoint interval
    layout = RunLayout.for_run(first_cfg.run)
    steps = [r["step"] for r in layout.read_metrics()]
    assert steps == [2, 3, 4, 6], steps
    cpu = [r["train_cpu_s"] for r in layout.read_metrics()]
    assert all(b > a > 0 for a, b in zip(cpu, cpu[1:])), cpu  # training CPU-seconds continue over the resume
    assert [first for first, _ in layout.metrics_parts()] == [2, 4]


def test_nonfinite_loss_stops_with_step_range_and_writes_no_checkpoint(tmp_path):
    x, y = fixed_batch()
    x = x * float("inf")
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=4", "train.checkpoint_every=4")
    reporter = reporter_for(cfg)
    with pytest.raises(loop.NonFiniteLossError, match="between steps 1 and 2"):
        loop.train(cfg, DistEnv(), FixedSource(x, y), reporter, progress=False)
    assert reporter.latest() is None


def test_nonfinite_skip_mode_skips_steps(tmp_path):
    x, y = fixed_batch()
    x[0] = float("nan")
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=2",
                   "train.on_nonfinite=skip", "train.checkpoint_every=100")
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), reporter_for(cfg), progress=False)
    assert result.history[-1]["skipped_steps"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(result.export_uri).values())


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8")
    trainer = loop.build_trainer(cfg, DistEnv())
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError):
        checkpointer = components.Checkpointer(DistEnv(), schedule=components.Schedule(1, 1), reporter=reporter_for(cfg),
                                               config={})
        checkpointer.save(trainer, 1, 8, {})
    assert reporter_for(cfg).latest() is None


def test_lr_schedule_is_pure():
    from speed.config.schema import OptimConfig
    from speed.train.optim import lr_at

    optim = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, optim) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# The velocity target eps - x0 is harder to memorise near t = 1 than eps is, so the flow model
# overfits 4 digits (each 4 times in the batch) in the steps the DDPM model needs for 16.
@pytest.mark.parametrize("objective,distinct", [([], 16), (FLOW, 4)], ids=["ddpm", "flow"])
def test_small_dit_overfits_a_digits_batch(tmp_path, objective, distinct):
    from speed.data.digits import load_digits

    images, labels = load_digits(8, 1)
    x, y = images[:distinct].repeat(16 // distinct, 1, 1, 1), labels[:distinct].repeat(16 // distinct)
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=16", "train.steps=150",
                   "train.log_every=25", "optim.lr=2e-3", "diffusion.timesteps.name=uniform", "train.checkpoint_every=1000",
                   "model.class_dropout_prob=0.0", *objective)
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), reporter_for(cfg), progress=False)
    first, last = result.history[0]["mse"], result.history[-1]["mse"]
    assert last < 0.5 * first, (first, last)


def test_incomplete_checkpoints_are_recognised_locally_and_in_s3(tmp_path, s3_bucket):
    """Ranks upload their parts separately: a folder with state.json but a missing or short shard
    (or no state.json) must never be picked for a restart."""
    from speed import storage

    x, y = fixed_batch()
    cfg = make_cfg(tmp_path / "run", "parallel.strategy=none", "train.global_batch_size=8", "train.steps=2",
                   "train.checkpoint_every=2")
    reporter = reporter_for(cfg)
    loop.train(cfg, DistEnv(), FixedSource(x, y), reporter, progress=False)
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
        assert reason in incomplete_reason(remote), name
    _, remote = variant("whole", lambda f: None)
    assert incomplete_reason(remote) is None


def test_schedules_need_no_common_multiple(tmp_path, monkeypatch):
    """An evaluation or grid step that is not a log step still writes a record with its step, and
    the run trains to the end (log_every=4, eval_every=6, sample_every=5, steps=12)."""
    monkeypatch.setattr(components.Evaluator, "run", lambda self, model: {"digits_fid": 1.5})
    monkeypatch.setattr(components.SampleGrid, "run", lambda self, model, step: {"sample_grid": f"grid-{step}"})
    x, y = fixed_batch()
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=12",
                   "train.log_every=4", "train.eval_every=6", "train.sample_every=5", "train.checkpoint_every=100",
                   "train.eval_num_samples=10")
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), reporter_for(cfg), progress=False)
    assert result.steps == 12 and result.export_uri
    records = RunLayout.for_run(cfg.run).read_metrics()
    assert [r["step"] for r in records] == [4, 5, 6, 8, 10, 12]
    by_step = {r["step"]: r for r in records}
    assert "loss" in by_step[4] and "loss" not in by_step[6] and by_step[6]["digits_fid"] == 1.5
    assert by_step[5]["sample_grid"] == "grid-5" and by_step[10]["sample_grid"] == "grid-10"
    assert "loss" in by_step[12] and by_step[12]["digits_fid"] == 1.5 and by_step[12]["sample_grid"] == "grid-12"


def test_final_checkpoint_and_export_come_before_the_final_evaluation(tmp_path, monkeypatch):
    def interrupted(self, model):
        raise KeyboardInterrupt("evaluation interrupted")

    monkeypatch.setattr(components.Evaluator, "run", interrupted)
    x, y = fixed_batch()
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=4",
                   "train.checkpoint_every=100", "train.eval_num_samples=10")
    reporter = reporter_for(cfg)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, DistEnv(), FixedSource(x, y), reporter, progress=False)
    layout = RunLayout.for_run(cfg.run)
    assert reporter.latest() == layout.checkpoint_uri(4) and is_complete(reporter.latest())
    assert (Path(layout.export_uri) / "ema.safetensors").is_file()
    assert [r["step"] for r in layout.read_metrics()] == [2, 4]


def test_eval_num_samples_zero_turns_evaluation_off(tmp_path, monkeypatch):
    def must_not_run(self, model):
        raise AssertionError("evaluation ran")

    monkeypatch.setattr(components.Evaluator, "run", must_not_run)
    x, y = fixed_batch()
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=2",
                   "train.eval_every=1", "train.eval_num_samples=0", "train.checkpoint_every=100")
    assert loop.train(cfg, DistEnv(), FixedSource(x, y), reporter_for(cfg), progress=False).steps == 2
    assert components.auto_eval_num_samples(8) == 500 and components.auto_eval_num_samples(32) == 64


def test_metrics_parts_are_bounded_and_read_as_one_stream(tmp_path):
    """Each checkpoint closes a metrics part, so no upload grows with the run; a resume drops the
    records after its checkpoint."""
    x, y = fixed_batch()
    cfg = make_cfg(tmp_path, "parallel.strategy=none", "train.global_batch_size=8", "train.steps=8",
                   "train.log_every=1", "train.checkpoint_every=3")
    loop.train(cfg, DistEnv(), FixedSource(x, y), reporter_for(cfg), progress=False)
    layout = RunLayout.for_run(cfg.run)
    assert [first for first, _ in layout.metrics_parts()] == [1, 4, 7]
    assert [r["step"] for r in layout.read_metrics()] == list(range(1, 9))
    layout.truncate_metrics(5)
    assert [r["step"] for r in layout.read_metrics()] == [1, 2, 3, 4, 5]
    assert [first for first, _ in layout.metrics_parts()] == [1, 4]
