"""System throughput on this machine, all in one run so that ratios hold on a noisy host.

    python -m benchmarks.throughput [--quick] [--out DIR] [--threads N] [--skip SECTION ...]

Sections (each one's numbers and errors land in the same JSON; a failing section does not stop
the others):

* ``matmul``   the machine's limit: large fp32 and bf16 matrix products (GFLOP/s), at the
               benchmark's thread count and on all cores, plus one product of the digits step's
               own MLP shape (tokens x D x 4D) for context;
* ``train``    ``speed.train.trainer.Trainer.train_step`` on the digits config's DiT over 8x8x1 (and,
               without --quick, DiT-S/2 over 32x32x3): images/s, model FLOP/s counted with
               ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward) and MFU against
               the same-dtype matmul rate, in fp32 and bf16 autocast;
* ``overhead`` the same model and batch in a plain single-process loop over in-memory tensors
               (the reference DiT train.py shape: randint timesteps, training_losses, backward,
               AdamW, per-parameter EMA), interleaved with our Trainer.train_step, then our
               in-process ``speed.train.loop.train`` and the full ``python -m ray_jobs.train``
               (Ray Train) on the digits config; steady-state images/s from the run's metrics
               (``RunLayout.read_metrics``) after the first log interval. ``ray_overhead_ratio`` = our time per image / the plain loop's;
* ``data``     a moto S3 server started here, the digits written to it as a JPEG imagefolder and
               as Parquet (``ray_jobs.prepare``), the Ray Data feed rate of each
               (``ray_jobs.data.build_train_dataset`` -> ``iter_torch_batches``) against the
               trainer's consumption, and ``data_wait_fraction`` from a ``ray_jobs.train`` run that
               streams the S3 data;
* ``sampling`` single-process ``speed.sample.generate`` DDIM-50 and DDPM-250 (the reference
               diffusion loop next to it), and the Ray batch job (``ray_jobs.inference``) with 1
               and 2 actors when that job exists.

Threads: every timed comparison runs at ``--threads`` (default 1, what a Ray Train worker with
``ray.cpus_per_worker=1`` uses), so the plain loop, our step and the Ray path compete on equal
terms; the matmul limit is measured at that count too (and on all cores, for information).

Writes ``<out>/throughput.json`` and ``<out>/throughput.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# Same OpenMP behaviour as the Ray jobs (ray_jobs.common.init_ray), set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from speed.testing import moto_s3  # noqa: E402
from speed.train.run_layout import RunLayout  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
DIGITS_CONFIG = "configs/digits/speed.yaml"
SECTIONS = ("matmul", "train", "overhead", "data", "sampling")

# Targets this benchmark reports against (README.md, "Benchmarks").
TARGETS = {
    "ray_overhead_ratio": ("<=", 1.10),
    "data_wait_fraction": ("<", 0.05),
    "train_mfu_fp32": (">=", 0.50),
}

# Cheap end-of-run extras for the timed training runs (the digits config evaluates 500 DDIM-50
# guided samples at the end; the timed intervals never include it, but the wall clock would).
FAST_END_OVERRIDES = (
    "train.eval_num_samples=10",
    "sample.per_class=1",
    "sampling.steps=10",
)


def timed_run_overrides(steps: int, log_every: int) -> List[str]:
    """A timed training run: ``steps`` steps, a record every ``log_every``, the cheap end-of-run
    extras and one checkpoint, at the end (``train.checkpoint_every`` is at least 1)."""
    return [f"train.steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
            *FAST_END_OVERRIDES]


# --- small helpers -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rnd(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


@contextmanager
def threads_as(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digits_config(overrides: Sequence[str] = ()):
    """The digits training config with every local path absolute (what the training loop expects)."""
    from speed.config import load_config
    from speed.storage import absolute_paths

    return absolute_paths(load_config(DIGITS_CONFIG, list(overrides), phase="train"))


class Timings:
    """Wall-clock and on-CPU seconds (this process, all its threads) of repeated calls."""

    def __init__(self) -> None:
        self.wall: List[float] = []
        self.cpu: List[float] = []

    def __iadd__(self, other: "Timings") -> "Timings":
        self.wall += other.wall
        self.cpu += other.cpu
        return self

    @property
    def wall_median(self) -> float:
        return median(self.wall)

    @property
    def cpu_median(self) -> float:
        return median(self.cpu)


def time_calls(fn: Callable[[int], Any], warmup: int, count: int, start: int = 0) -> Timings:
    """Per-call wall and CPU times of fn(i) for count calls after warmup calls (CPU work is
    synchronous). On a shared host the CPU time is what the work itself cost; the wall time adds
    whatever other processes took from us."""
    i = start
    for _ in range(warmup):
        fn(i)
        i += 1
    out = Timings()
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(i)
        out.cpu.append(time.process_time() - cpu)
        out.wall.append(time.perf_counter() - wall)
        i += 1
    return out


# --- CPU time of a process tree (a Ray job's driver, daemons and workers), from /proc ------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> Dict[int, Tuple[int, float]]:
    """pid -> (ppid, CPU seconds incl. reaped children) for every visible process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        out[int(entry)] = (int(fields[1]), ticks / _CLOCK_TICKS)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tree_cpu(root: int, marker: str) -> Tuple[float, float]:
    """(CPU seconds of root and all its descendants, CPU seconds of those whose command line holds marker)."""
    stats = _proc_stats()
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, marked, stack = 0.0, 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid not in stats:
            continue
        total += stats[pid][1]
        if pid != root and marker in _cmdline(pid):
            marked += stats[pid][1]
        stack.extend(children.get(pid, []))
    return total, marked


# --- matmul: the machine's limit -----------------------------------------------------------------


def _matmul_rates(dtype: torch.dtype, m: int, k: int, n: int, threads: int, budget_s: float,
                  layout: str = "nn") -> Tuple[float, float]:
    """(best GFLOP per CPU-second / threads, best GFLOP per wall second) of repeated products.
    ``layout`` "nt" multiplies by a transposed [n, k] matrix, as nn.Linear does (x @ W^T)."""
    with threads_as(threads):
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype) if layout == "nn" else torch.randn(n, k).to(dtype).t()
        out = torch.empty(m, n, dtype=dtype)
        torch.matmul(a, b, out=out)
        best_cpu, best_wall, spent, reps = 0.0, 0.0, 0.0, 0
        flops = 2.0 * m * k * n
        while spent < budget_s or reps < 2:
            wall, cpu = time.perf_counter(), time.process_time()
            torch.matmul(a, b, out=out)
            took_cpu = time.process_time() - cpu
            took = time.perf_counter() - wall
            spent += took
            reps += 1
            best_wall = max(best_wall, flops / took / 1e9)
            if took_cpu > 0:
                best_cpu = max(best_cpu, flops / (took_cpu / threads) / 1e9)
    return best_cpu, best_wall


def section_matmul(args, results: Dict[str, Any]) -> None:
    threads, quick = args.threads, args.quick
    cores = os.cpu_count() or 1
    big = 1536 if quick else 2048
    budget = 1.5 if quick else 4.0
    # The limit is the best over both operand layouts: A @ B and A @ B^T (nn.Linear's), which some
    # kernels treat very differently (torch's fallback bf16 CPU kernel is ~6x faster on A @ B^T).
    fp32_runs = {layout: _matmul_rates(torch.float32, big, big, big, threads, budget / 2, layout) for layout in ("nn", "nt")}
    fp32 = max(v[0] for v in fp32_runs.values())
    fp32_wall = max(v[1] for v in fp32_runs.values())
    # bf16: measured at a few sizes and the best kept (on CPUs without native bf16, torch's fallback
    # kernel gets slower with size, and a few large products would take minutes).
    bf16_sizes = (256, 512) if quick else (256, 512, 1024)
    bf16_by_size = {f"{s}_{layout}": _matmul_rates(torch.bfloat16, s, s, s, threads, budget / 4, layout)
                    for s in bf16_sizes for layout in ("nn", "nt")}
    bf16 = max(v[0] for v in bf16_by_size.values())
    bf16_wall = max(v[1] for v in bf16_by_size.values())
    fp32_all = _matmul_rates(torch.float32, big, big, big, cores, budget)[1] if cores != threads else fp32_wall
    # The digits step's MLP product (batch x tokens rows, D -> 4D), for context.
    rows_, width = _digits_mlp_shape()
    shape_fp32 = _matmul_rates(torch.float32, rows_, width, 4 * width, threads, budget / 2)[0]
    results.update(
        matmul_gflops_fp32=rnd(fp32, 2),
        matmul_gflops_bf16=rnd(bf16, 3),
    )
    results["matmul"] = {
        "threads": threads,
        "unit": "GFLOP per on-CPU second per thread (the wall-clock rate beside it)",
        "fp32_size": big,
        "fp32_by_layout": {layout: rnd(v[0], 2) for layout, v in fp32_runs.items()},
        "fp32_wall": rnd(fp32_wall, 2),
        "bf16_wall": rnd(bf16_wall, 3),
        "bf16_by_size_layout": {key: rnd(v[0], 3) for key, v in bf16_by_size.items()},
        f"fp32_wall_all_{cores}_cores": rnd(fp32_all, 2),
        f"fp32_digits_mlp_shape_{rows_}x{width}x{4 * width}": rnd(shape_fp32, 2),
        "cpu_flags_bf16": _cpu_bf16_flags(),
        "loadavg": loadavg(),
    }
    log(f"matmul: fp32 {fp32:.1f} GFLOP/CPU-s ({fp32_wall:.1f} wall, {threads} thr), {fp32_all:.1f} wall on {cores} "
        f"cores; bf16 {bf16:.2f}; digits MLP shape {rows_}x{width}x{4 * width} fp32 {shape_fp32:.1f}")


def _model_dims(cfg) -> Dict[str, Any]:
    from speed.models.registry import DIT_PRESETS

    preset = DIT_PRESETS[cfg.model.name]
    dims = {k: getattr(cfg.model, k) if getattr(cfg.model, k) is not None else preset.get(k)
            for k in ("depth", "hidden_size", "num_heads")}
    dims["patch_size"] = preset["patch_size"]
    return dims


def model_label(cfg) -> str:
    """e.g. "DiT-T/2 (depth 4, width 128)": the preset and what the config overrides."""
    dims = _model_dims(cfg)
    return f"{cfg.model.name} (depth {dims['depth']}, width {dims['hidden_size']})"


def _digits_mlp_shape() -> Tuple[int, int]:
    cfg = digits_config()
    dims = _model_dims(cfg)
    tokens = (cfg.data.resolution // dims["patch_size"]) ** 2
    return cfg.train.global_batch_size * tokens, dims["hidden_size"]


def _cpu_bf16_flags() -> List[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")


# --- our training step ---------------------------------------------------------------------------


def _trainer_and_data(overrides: Sequence[str]):
    from speed.data.digits import load_digits
    from speed.train.distributed import DistEnv
    from speed.train.loop import build_trainer
    from speed.train.sources import IndexedSource

    cfg = digits_config(overrides)
    trainer = build_trainer(cfg, DistEnv())
    images, labels = load_digits(cfg.data.resolution, cfg.data.channels)
    source = IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size)
    return cfg, trainer, source


def _step_fn(trainer, source):
    def step(i: int) -> None:
        x, y = source.batch(i, trainer.offset, trainer.count)
        trainer.train_step(i, x, y)

    return step


def count_step_flops(trainer, source, step: int = 0) -> Tuple[float, float]:
    """(forward + backward FLOPs of one train_step, forward-only FLOPs), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = source.batch(step, trainer.offset, trainer.count)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(step, x, y)
    total = float(counter.get_total_flops())
    draws_t = torch.randint(0, trainer.diffusion.num_timesteps, (x.shape[0],))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        trainer.model(x, draws_t, y)
    return total, float(counter.get_total_flops())


def measure_train(name: str, overrides: Sequence[str], threads: int, warmup: int, steps: int) -> Dict[str, Any]:
    with threads_as(threads):
        cfg, trainer, source = _trainer_and_data(overrides)
        flops, fwd_flops = count_step_flops(trainer, source)
        times = time_calls(_step_fn(trainer, source), warmup, steps, start=1)
    batch = cfg.train.global_batch_size
    # Like the matmul limit (the best of repeated products), the step's rate for MFU is its fastest
    # step: contention only ever adds time. The median-based figures are kept beside it.
    cpu_s = min(times.cpu) / threads
    cpu_median_s = times.cpu_median / threads
    return {
        "config": name,
        "model": model_label(cfg),
        "geometry": f"{cfg.data.resolution}x{cfg.data.resolution}x{cfg.data.channels}",
        "batch": batch,
        "mixed_precision": cfg.parallel.mixed_precision,
        "threads": threads,
        "steps_timed": steps,
        "step_cpu_s_min": rnd(cpu_s, 5),
        "step_cpu_s_median": rnd(cpu_median_s, 5),
        "step_wall_s_median": rnd(times.wall_median, 5),
        "images_per_sec": rnd(batch / cpu_s, 2),
        "images_per_sec_wall": rnd(batch / times.wall_median, 2),
        "flops_per_step": flops,
        "forward_flops_per_step": fwd_flops,
        "model_gflops_per_sec": rnd(flops / cpu_s / 1e9, 3),
        "model_gflops_per_sec_median": rnd(flops / cpu_median_s / 1e9, 3),
        "model_gflops_per_sec_wall": rnd(flops / times.wall_median / 1e9, 3),
        "loadavg": loadavg(),
    }


def section_train(args, results: Dict[str, Any]) -> None:
    threads = args.threads
    rows = []
    quick = args.quick
    # fp32: the digits default (its DiT, batch 64, 8x8x1).
    rows.append(measure_train("digits default model, fp32", ["parallel.mixed_precision=fp32"], threads,
                              warmup=2, steps=8 if quick else 20))
    # bf16 autocast: on CPUs without native bf16 products this runs ~50x slower, so it is timed on
    # a smaller batch (MFU does not depend on the batch much once the products dominate).
    bf16_batch = 8 if quick else 16
    rows.append(measure_train(
        "digits default model, bf16 autocast",
        ["parallel.mixed_precision=bf16", f"train.global_batch_size={bf16_batch}", f"train.micro_batch_size={bf16_batch}"],
        threads, warmup=1, steps=2 if quick else 3))
    # The smallest paper-width DiT (width 384), whose products are the shape of the real models'.
    rows.append(measure_train(
        "DiT-S/2 32x32x3 fp32",
        ["model.name=DiT-S/2", "model.depth=12", "model.hidden_size=384", "model.num_heads=6",
         "data.resolution=32", "data.channels=3", "train.global_batch_size=8",
         "train.micro_batch_size=8", "parallel.mixed_precision=fp32"],
        threads, warmup=1, steps=2 if quick else 4))
    fp32_rate = results.get("matmul_gflops_fp32")
    bf16_rate = results.get("matmul_gflops_bf16")
    for row in rows:
        limit = bf16_rate if "bf16" in row["mixed_precision"] else fp32_rate
        row["matmul_limit_gflops"] = limit
        row["mfu"] = rnd(row["model_gflops_per_sec"] / limit, 4) if limit else None
        row["mfu_median_step"] = rnd(row["model_gflops_per_sec_median"] / limit, 4) if limit else None
        wall_limit = results.get("matmul", {}).get("bf16_wall" if "bf16" in row["mixed_precision"] else "fp32_wall")
        row["mfu_wall"] = rnd(row["model_gflops_per_sec_wall"] / wall_limit, 4) if wall_limit else None
        log(f"train {row['config']}: {row['images_per_sec']} img/s, {row['model_gflops_per_sec']} GFLOP/s, MFU {row['mfu']}")
    results["train"] = rows
    results["train_images_per_sec_fp32"] = rows[0]["images_per_sec"]
    results["train_images_per_sec_fp32_wall"] = rows[0]["images_per_sec_wall"]
    results["train_mfu_fp32"] = rows[0]["mfu"]
    results["train_mfu_bf16"] = rows[1]["mfu"]
    results["train_mfu_fp32_dit_s2"] = rows[2]["mfu"]
    if args.profile:
        results["train_profile_fp32"] = profile_train_step(threads)


def profile_train_step(threads: int, steps: int = 5, top: int = 15) -> List[Dict[str, Any]]:
    """torch.profiler's top CPU ops of a few digits fp32 steps (where the non-matmul time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with threads_as(threads):
        _, trainer, source = _trainer_and_data(["parallel.mixed_precision=fp32"])
        step = _step_fn(trainer, source)
        for i in range(2):
            step(i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2, 2 + steps):
                step(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {"op": e.key, "self_ms_per_step": rnd(e.self_cpu_time_total / 1000.0 / steps, 3),
         "share": rnd(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // steps}
        for e in events[:top]
    ]


# --- plain single-process reference loop ----------------------------------------------------------


class PlainLoop:
    """The reference DiT train.py loop over in-memory tensors: randint timesteps, training_losses,
    mean loss, zero_grad/backward/AdamW step (torch defaults), per-parameter EMA update."""

    def __init__(self, model_cfg, resolution: int, channels: int, batch: int, seed: int = 0):
        from speed.data.digits import load_digits
        from speed.diffusion import create_diffusion
        from speed.models import build_model

        torch.manual_seed(seed)
        self.images, self.labels = load_digits(resolution, channels)
        # The config's DiT (preset plus any depth/width overrides), exactly the model the Trainer builds.
        self.model = build_model(model_cfg, resolution, channels)
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.diffusion = create_diffusion(timestep_respacing="")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.ema_params = OrderedDict(self.ema.named_parameters())
        self.model_params = OrderedDict(self.model.named_parameters())

    @torch.no_grad()
    def update_ema(self, decay: float = 0.9999) -> None:
        for name, param in self.model_params.items():
            self.ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def step(self, _: int) -> None:
        index = torch.randint(0, len(self.labels), (self.batch,), generator=self.gen)
        x, y = self.images[index], self.labels[index]
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],))
        loss = self.diffusion.training_losses(self.model, x, t, dict(y=y))["loss"].mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.update_ema()


class RecordingReporter:
    """Keeps the training loop's log records as they are reported, with this process's CPU time
    when each arrived (``marks[n]``: the n-th record), and drops checkpoints. A report of a step
    already recorded (the evaluation after the last step) merges into its record."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.marks: Dict[int, Tuple[float, ...]] = {}

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_name: Optional[str] = None) -> None:
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if self.records and self.records[-1].get("step") == metrics.get("step"):
            self.records[-1].update(metrics)
            return
        self.records.append(dict(metrics))
        self.marks[len(self.records)] = (time.process_time(),)


def steady_state(records: List[Dict[str, Any]], key: str) -> Tuple[float, int]:
    """``key`` over the log intervals after the first (warm-up) one, weighted by each interval's
    time (``step_time_s`` x its steps), so a slow interval (an epoch restart, a log write) counts
    in full; images_per_sec becomes images / time over those intervals. Returns (value, intervals)."""
    rows = []
    for previous, record in zip(records, records[1:]):
        steps = record.get("step", 0) - previous.get("step", 0)
        step_s = record.get("step_time_s")
        if steps > 0 and isinstance(step_s, (int, float)) and isinstance(record.get(key), (int, float)):
            rows.append((steps * step_s, steps, record[key]))
    if not rows:  # a run too short for two intervals: the plain median of what there is
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return median(values), len(values)
    seconds = sum(r[0] for r in rows)
    return sum(r[0] * r[2] for r in rows) / seconds, len(rows)


def cpu_per_image(marks: Dict[int, Tuple[float, ...]], records: List[Dict[str, Any]], batch: int) -> List[Optional[float]]:
    """CPU seconds per image between the first and the second-to-last log record (snapshots keyed by
    how many records existed when taken), for each CPU counter in the snapshots. The last record
    arrives with the end-of-run checkpoint (and the evaluation, sample grid and export follow it),
    which the plain loop does not do, so the interval ending there is left out."""
    last = len(records) - 1
    if last < 2 or 1 not in marks or last not in marks:
        return []
    images = (records[last - 1]["step"] - records[0]["step"]) * batch
    first, end = marks[1], marks[last]
    return [(b - a) / images if images > 0 else None for a, b in zip(first, end)]


def run_inprocess_train(overrides: Sequence[str], threads: int, workdir: Path) -> Dict[str, Any]:
    """speed.train.loop.train without Ray (IndexedSource over the digits, as the Ray worker uses)."""
    from speed.data.digits import load_digits
    from speed.train.distributed import DistEnv
    from speed.train.loop import train
    from speed.train.sources import IndexedSource

    name = f"bench-inproc-{uuid.uuid4().hex[:6]}"
    cfg = digits_config([*overrides, f"run.output_uri={workdir}", f"run.name={name}"])
    images, labels = load_digits(cfg.data.resolution, cfg.data.channels)
    source = IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size)
    reporter = RecordingReporter()
    error = None
    began = time.perf_counter()
    with threads_as(threads):
        try:
            train(cfg, DistEnv(), source, reporter, progress=False)
        except Exception as exc:  # the end-of-run eval/sampling may fail; the timed intervals are in
            error = f"{type(exc).__name__}: {exc}"
    records = reporter.records
    ips, n = steady_state(records, "images_per_sec")
    cpu = cpu_per_image(reporter.marks, records, cfg.train.global_batch_size)
    return {"images_per_sec_wall": rnd(ips, 2), "cpu_s_per_image": rnd(cpu[0] / threads, 7) if cpu else None,
            "intervals": n, "wall_s": rnd(time.perf_counter() - began, 2), "end_of_run_error": error,
            "threads": threads}


RAY_WORKER_MARKER = "RayTrainWorker"


RAY_START_FAILED = "timed out during startup"  # Ray gives its node 30 s to start: a busy host can miss it


def run_ray_train(overrides: Sequence[str], workdir: Path, timeout_s: float, batch: int,
                  config: str = DIGITS_CONFIG) -> Dict[str, Any]:
    """``_run_ray_train_once``, tried a second time when Ray itself failed to start."""
    result = _run_ray_train_once(overrides, workdir, timeout_s, batch, config)
    for _ in range(2):
        if result["returncode"] == 0 or RAY_START_FAILED not in result.get("stderr_tail", ""):
            break
        log("ray_jobs.train: Ray did not start in time (busy host); trying again")
        result = {**_run_ray_train_once(overrides, workdir, timeout_s, batch, config), "ray_start_retried": True}
    return result


def _run_ray_train_once(overrides: Sequence[str], workdir: Path, timeout_s: float, batch: int,
                        config: str = DIGITS_CONFIG) -> Dict[str, Any]:
    """``python -m ray_jobs.train`` in a subprocess; steady-state metrics from its run's metrics parts, and
    the CPU time of the training worker and of the whole job (driver, Ray daemons, workers, data
    tasks), sampled from /proc whenever a new log record lands."""
    name = f"bench-ray-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "ray_jobs.train", "-c", config, *overrides,
            f"run.output_uri={workdir}", f"run.name={name}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    layout = RunLayout(str(workdir / name))
    marks: Dict[int, Tuple[float, float]] = {}
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, text=True)
        seen = 0
        rc: Any = None
        while rc is None:
            if time.perf_counter() - began > timeout_s:
                proc.kill()
                proc.wait()
                rc = "timeout"
                break
            count = len(_read_records(layout))
            if count != seen:
                seen = count
                marks[count] = tree_cpu(proc.pid, RAY_WORKER_MARKER)
            time.sleep(0.25)
            rc = proc.poll()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - began
    final = _last_json(stdout)
    records = _read_records(layout)
    ips, n = steady_state(records, "images_per_sec")
    wait, _ = steady_state(records, "data_wait_fraction")
    step_s, _ = steady_state(records, "step_time_s")
    cpu = cpu_per_image(marks, records, batch)
    result = {
        "returncode": rc,
        "wall_s": rnd(wall, 2),
        "images_per_sec_wall": rnd(ips, 2),
        "step_time_s": rnd(step_s, 5),
        "data_wait_fraction": rnd(wait, 4),
        "intervals": n,
        "per_interval_images_per_sec": [rnd(r.get("images_per_sec"), 1) for r in records],
        "per_interval_data_wait_fraction": [rnd(r.get("data_wait_fraction"), 3) for r in records],
        "job_cpu_s_per_image": rnd(cpu[0], 7) if cpu else None,
        "worker_cpu_s_per_image": rnd(cpu[1], 7) if cpu else None,
        "final_line_images_per_sec": rnd((final or {}).get("images_per_sec"), 2),
        "overrides": list(overrides),
    }
    if rc != 0:
        result["stderr_tail"] = stderr[-3000:]
    return result


def _read_records(layout) -> List[Dict[str, Any]]:
    """The run's log records; [] before its first part exists or while a part is being replaced."""
    from speed.storage import StorageError

    try:
        return layout.read_metrics()
    except (OSError, StorageError):
        return []


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _last_json(text: str) -> Optional[Dict[str, Any]]:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def section_overhead(args, results: Dict[str, Any], workdir: Path) -> None:
    threads, quick = args.threads, args.quick
    cfg = digits_config()
    batch = cfg.train.global_batch_size
    with threads_as(threads):
        plain = PlainLoop(cfg.model, cfg.data.resolution, cfg.data.channels, batch)
        _, trainer, source = _trainer_and_data([])
        ours = _step_fn(trainer, source)
        # Interleaved rounds: each round times both loops back to back, so contention hits both.
        rounds, per_round = (3, 5) if quick else (5, 10)
        plain_t, our_t = Timings(), Timings()
        ratios, ratios_wall = [], []
        plain.step(0), ours(0)
        for r in range(rounds):
            p = time_calls(plain.step, 1, per_round)
            o = time_calls(ours, 1, per_round, start=1 + r * (per_round + 1))
            plain_t += p
            our_t += o
            ratios.append(o.cpu_median / p.cpu_median)
            ratios_wall.append(o.wall_median / p.wall_median)
    plain_cpu = plain_t.cpu_median / threads / batch  # CPU seconds per image
    step_cpu = our_t.cpu_median / threads / batch
    log(f"overhead: plain loop {1 / plain_cpu:.0f} img/CPU-s ({batch / plain_t.wall_median:.0f} wall), our train_step "
        f"{1 / step_cpu:.0f} img/CPU-s ({batch / our_t.wall_median:.0f} wall), {threads} thr")
    steps = 60 if quick else 300
    log_every = 10 if quick else 50
    run_overrides = timed_run_overrides(steps, log_every)

    def plain_now() -> Timings:
        with threads_as(threads):
            return time_calls(plain.step, 1, per_round * 2)

    # Each long run is bracketed by plain-loop measurements; its reference is their mean, so a
    # change of load between the runs shifts both sides alike.
    p1 = plain_now()
    inproc = run_inprocess_train(run_overrides, threads, workdir)
    log(f"overhead: in-process train() {inproc['images_per_sec_wall']} img/s wall, "
        f"{inproc['cpu_s_per_image']} CPU-s/img")
    p2 = plain_now()
    ray_run = run_ray_train([*run_overrides, f"ray.cpus_per_worker={max(1, threads)}"], workdir,
                            timeout_s=600 if quick else 1200, batch=batch)
    log(f"overhead: ray_jobs.train {ray_run['images_per_sec_wall']} img/s wall, worker "
        f"{ray_run['worker_cpu_s_per_image']} CPU-s/img, whole job {ray_run['job_cpu_s_per_image']} CPU-s/img "
        f"(rc {ray_run['returncode']}, wall {ray_run['wall_s']} s)")
    p3 = plain_now()
    per_image = lambda t: t.cpu_median / threads / batch  # noqa: E731
    inproc_ref = 0.5 * (per_image(p1) + per_image(p2))
    ray_ref = 0.5 * (per_image(p2) + per_image(p3))
    plain_wall_ips = 0.5 * (batch / p2.wall_median + batch / p3.wall_median)
    results["overhead"] = {
        "threads": threads,
        "batch": batch,
        "plain_loop_cpu_s_per_image": rnd(plain_cpu, 7),
        "plain_loop_cpu_s_per_image_brackets": [rnd(per_image(t), 7) for t in (p1, p2, p3)],
        "plain_loop_images_per_sec_wall_brackets": [rnd(batch / t.wall_median, 2) for t in (p1, p2, p3)],
        "train_step_cpu_s_per_image": rnd(step_cpu, 7),
        "train_step_images_per_sec_wall": rnd(batch / our_t.wall_median, 2),
        "train_step_over_plain_cpu_interleaved": rnd(median(ratios), 4),
        "train_step_over_plain_wall_interleaved": rnd(median(ratios_wall), 4),
        "inprocess_train": inproc,
        "ray_train": ray_run,
        "loadavg": loadavg(),
    }
    results["plain_loop_images_per_sec"] = rnd(1 / plain_cpu, 2)
    results["step_overhead_ratio"] = rnd(median(ratios), 4)
    if inproc.get("cpu_s_per_image"):
        results["inprocess_overhead_ratio"] = rnd(inproc["cpu_s_per_image"] / inproc_ref, 4)
    worker = ray_run.get("worker_cpu_s_per_image")
    if worker:
        # Per thread: the worker runs cpus_per_worker torch threads.
        worker /= max(1, threads)
        results["ray_images_per_sec"] = rnd(1 / worker, 2)
        results["ray_overhead_ratio"] = rnd(worker / ray_ref, 4)
    if ray_run.get("job_cpu_s_per_image"):
        results["ray_overhead_ratio_whole_job_cpu"] = rnd(ray_run["job_cpu_s_per_image"] / max(1, threads) / ray_ref, 4)
    if ray_run.get("images_per_sec_wall"):
        results["ray_overhead_ratio_wall"] = rnd(plain_wall_ips / ray_run["images_per_sec_wall"], 4)


# --- data: Ray Data from the S3 test server ------------------------------------------------------


def _data_feed():
    """benchmarks/data_feed.py (the data pipeline's own benchmark), whose moto start-up and
    process-tree CPU accounting this benchmark reuses when it is there."""
    try:
        from benchmarks import data_feed
    except Exception:
        return None
    needed = ("_ray_cpu_seconds", "_cpu_spent", "_EXCLUDED_PIDS")
    return data_feed if all(hasattr(data_feed, name) for name in needed) else None


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (speed.testing, as the tests start it), AWS_* pointed at it for
    the duration; its CPU is kept out of the data pipeline's CPU accounting."""
    with moto_s3("benchaccesskey", "benchsecret-0123456789") as (endpoint, proc):
        feed = _data_feed()
        if feed is not None:
            feed._EXCLUDED_PIDS.add(proc.pid)  # the object store's CPU is not the pipeline's
        yield endpoint


def write_s3_digits(bucket: str) -> Dict[str, str]:
    """The digits as a JPEG imagefolder and as Parquet shards on the test server (ray_jobs.prepare)."""
    import boto3

    from ray_jobs.prepare import prepare_digits
    from speed.config import load_config

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    uris = {}
    for fmt in ("imagefolder", "parquet"):
        uri = f"s3://{bucket}/digits-{fmt}"
        cfg = load_config("configs/prepare/digits.yaml", [f"prepare.output_uri={uri}", f"prepare.format={fmt}"],
                          phase="prepare")
        prepare_digits(cfg)
        uris[fmt] = uri
    return uris


def stream_config(fmt: str, uri: str, extra: Sequence[str] = ()):
    # The digits model geometry (8x8x1) decoded from the 32x32 RGB files: the trainer consumes
    # images as fast as in the in-memory digits run, the most demanding case for the feed.
    return digits_config([f"data.format={fmt}", f"data.uri={uri}", "data.resolution=8", "data.channels=1", *extra])


def feed_rate(fmt: str, uri: str, batch: int, epochs: int) -> Dict[str, Any]:
    """Images/s that Ray Data delivers to one consumer (iter_torch_batches, as StreamSource reads)."""
    from ray_jobs.data import build_train_dataset

    cfg = stream_config(fmt, uri)
    feed = _data_feed()
    per_epoch = []
    first_batch = []
    for epoch in range(epochs):
        dataset = build_train_dataset(cfg, seed=cfg.run.seed, epoch=epoch)
        cpu_before = feed._ray_cpu_seconds() if feed else None
        began = time.perf_counter()
        first = None
        rows = 0
        for rows_batch in dataset.iter_torch_batches(batch_size=batch, drop_last=True,
                                                     local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                                     local_shuffle_seed=epoch,
                                                     prefetch_batches=cfg.data.prefetch_batches):
            if first is None:
                first = time.perf_counter()
                rows_after_first = 0
            else:
                rows_after_first += len(rows_batch["label"])
            rows += len(rows_batch["label"])
        end = time.perf_counter()
        cpu = feed._cpu_spent(cpu_before, feed._ray_cpu_seconds()) if feed else None
        per_epoch.append({
            "rows": rows,
            "images_per_cpu_s": rnd(rows / cpu, 2) if cpu else None,
            "epoch_s": rnd(end - began, 3),
            "first_batch_s": rnd((first or end) - began, 3),
            "steady_images_per_sec": rnd(rows_after_first / max(end - (first or end), 1e-9), 2),
            "overall_images_per_sec": rnd(rows / max(end - began, 1e-9), 2),
        })
        first_batch.append((first or end) - began)
    later = per_epoch[1:] or per_epoch  # the first epoch also starts Ray's worker processes
    return {
        "format": fmt,
        "epochs": per_epoch,
        "first_batch_s_cold": per_epoch[0]["first_batch_s"],
        "first_batch_s_warm": rnd(median([e["first_batch_s"] for e in later]), 3),
        "steady_images_per_sec": rnd(median([e["steady_images_per_sec"] for e in later]), 2),
        "overall_images_per_sec": rnd(median([e["overall_images_per_sec"] for e in later]), 2),
        "images_per_cpu_s": later[-1].get("images_per_cpu_s"),
    }


def section_data(args, results: Dict[str, Any], workdir: Path) -> None:
    import ray

    quick = args.quick
    with moto_server() as endpoint:
        began = time.perf_counter()
        uris = write_s3_digits(f"bench-{uuid.uuid4().hex[:8]}")
        write_s = time.perf_counter() - began
        log(f"data: digits written to {endpoint} as imagefolder + parquet in {write_s:.1f} s")
        feeds = {}
        for attempt in range(3):  # Ray gives its node 30 s to start, which a busy host can miss
            try:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO_ROOT)}})
                break
            except Exception as exc:
                if RAY_START_FAILED not in str(exc) or attempt == 2:
                    raise
                log("data: Ray did not start in time (busy host); trying again")
                ray.shutdown()
                time.sleep(5)
        try:
            batch = digits_config().train.global_batch_size
            for fmt, uri in uris.items():
                feeds[fmt] = feed_rate(fmt, uri, batch, epochs=2 if quick else 3)
                log(f"data: {fmt} feed {feeds[fmt]['steady_images_per_sec']} img/s steady, "
                    f"{feeds[fmt]['overall_images_per_sec']} img/s with start-up")
        finally:
            ray.shutdown()
        # The trainer's consumption, wall-clock like the feed rate (the same step, timed in section train).
        consume = results.get("train_images_per_sec_fp32_wall")
        threads = args.threads
        runs = {}
        # Long enough to cross epoch boundaries (1,797 images = 28 steps of 64).
        steps = 70 if quick else 300
        log_every = 10 if quick else 50
        for fmt in ("imagefolder", "parquet"):
            overrides = [f"data.format={fmt}", f"data.uri={uris[fmt]}", "data.resolution=8", "data.channels=1",
                         f"ray.cpus_per_worker={max(1, threads)}", *timed_run_overrides(steps, log_every)]
            runs[fmt] = run_ray_train(overrides, workdir, timeout_s=480 if quick else 1200, batch=batch)
            log(f"data: ray_jobs.train on {fmt}: {runs[fmt]['images_per_sec_wall']} img/s, "
                f"data wait {runs[fmt]['data_wait_fraction']} (rc {runs[fmt]['returncode']})")
    results["data"] = {
        "endpoint": "moto on 127.0.0.1",
        "write_s": rnd(write_s, 2),
        "feed": feeds,
        "trainer_consumption_images_per_sec": consume,
        "feed_over_consumption": {f: rnd(v["steady_images_per_sec"] / consume, 3) if consume else None
                                  for f, v in feeds.items()},
        "epoch_feed_over_consumption": {f: rnd(v["overall_images_per_sec"] / consume, 3) if consume else None
                                        for f, v in feeds.items()},
        "ray_train_streaming": runs,
        "reused_from_benchmarks_data_feed": ["_ray_cpu_seconds", "_cpu_spent"] if _data_feed() else [],
        "loadavg": loadavg(),
    }
    waits = {f: r["data_wait_fraction"] for f, r in runs.items() if isinstance(r.get("data_wait_fraction"), float)}
    results["data_wait_fraction_by_format"] = waits
    results["data_wait_fraction"] = max(waits.values()) if waits else None  # the worse format
    results["data_feed_images_per_sec"] = {f: v["steady_images_per_sec"] for f, v in feeds.items()}


# --- sampling ------------------------------------------------------------------------------------


def _sampling_model(export_uri: Optional[str] = None):
    from speed.models import build_model, describe

    cfg = digits_config()
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    torch.manual_seed(0)
    model = build_model(cfg.model, description.input_size, description.in_channels).eval().requires_grad_(False)
    return cfg, description, model


def time_generate(cfg, description, model, sampler: str, steps: int, batch: int, threads: int) -> Dict[str, Any]:
    from speed.sample import generate_tensor

    sampling = copy.deepcopy(cfg.sampling)
    sampling.sampler, sampling.steps = sampler, steps
    labels = [i % 10 for i in range(batch)]
    with threads_as(threads):
        began, cpu = time.perf_counter(), time.process_time()
        generate_tensor(model, description, sampling, labels, list(range(batch)), 0, "cpu")
        took, took_cpu = time.perf_counter() - began, (time.process_time() - cpu) / threads
    return {"sampler": sampler, "steps": steps, "batch": batch, "guidance_scale": sampling.guidance_scale,
            "cpu_s": rnd(took_cpu, 3), "wall_s": rnd(took, 3), "images_per_sec": rnd(batch / took_cpu, 3),
            "images_per_sec_wall": rnd(batch / took, 3), "threads": threads}


def time_reference_loop(cfg, description, model, sampler: str, steps: int, batch: int, threads: int) -> Dict[str, Any]:
    """speed.diffusion's own p_sample_loop / ddim_sample_loop with one generator (DiT sample.py's shape)."""
    from speed.diffusion import guided_model
    from speed.diffusion.factory import build_sampling_diffusion

    diffusion = build_sampling_diffusion(1000, "linear", True, sampler, steps)
    forward = guided_model(model, guidance_scale=cfg.sampling.guidance_scale, null_class=10,
                           in_channels=description.in_channels)
    shape = (batch, description.in_channels, description.input_size, description.input_size)
    y = torch.tensor([i % 10 for i in range(batch)])
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    with threads_as(threads), torch.no_grad():
        began, cpu = time.perf_counter(), time.process_time()
        loop(forward, shape, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
        took, took_cpu = time.perf_counter() - began, (time.process_time() - cpu) / threads
    return {"sampler": sampler, "steps": steps, "batch": batch, "cpu_s": rnd(took_cpu, 3), "wall_s": rnd(took, 3),
            "images_per_sec": rnd(batch / took_cpu, 3), "images_per_sec_wall": rnd(batch / took, 3), "threads": threads}


def section_sampling(args, results: Dict[str, Any], workdir: Path) -> None:
    threads, quick = args.threads, args.quick
    cfg, description, model = _sampling_model()
    batch = 32 if quick else 64
    single = {
        "ddim50": time_generate(cfg, description, model, "ddim", 50, batch, threads),
        "ddpm250": time_generate(cfg, description, model, "ddpm", 250, batch // 2, threads),
        "reference_ddim50": time_reference_loop(cfg, description, model, "ddim", 50, batch, threads),
    }
    for key, row in single.items():
        log(f"sampling {key}: {row['images_per_sec']} img/s")
    out: Dict[str, Any] = {"model": cfg.model.name, "single_process": single,
                           "ddim50_over_ddpm250_speedup": rnd(single["ddim50"]["images_per_sec"]
                                                              / single["ddpm250"]["images_per_sec"], 3)}
    inference = REPO_ROOT / "ray_jobs" / "inference.py"
    if inference.exists():
        out["batch_job"] = run_batch_jobs(cfg, description, model, workdir, num_samples=batch * 2 if quick else batch * 4)
    else:
        out["batch_job"] = {"skipped": "ray_jobs/inference.py is not in this tree yet"}
    out["loadavg"] = loadavg()
    results["sampling"] = out
    results["sampling_images_per_sec"] = single["ddim50"]["images_per_sec"]


def run_batch_jobs(cfg, description, model, workdir: Path, num_samples: int) -> Dict[str, Any]:
    """ray_jobs.inference with 1 and 2 actors on an export of the (random-weight) digits model."""
    from speed.models.export import save_export

    export_dir = workdir / "sampling-export"
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    export_uri = save_export(state, description, str(export_dir))
    rows = {}
    for actors in (1, 2):
        out_uri = workdir / f"samples-{actors}"
        argv = [sys.executable, "-m", "ray_jobs.inference", "-c", DIGITS_CONFIG,
                f"inference.checkpoint_uri={export_uri}", f"inference.output_uri={out_uri}",
                f"inference.num_samples={num_samples}", f"inference.num_actors={actors}",
                f"inference.batch_size={max(1, num_samples // 4)}", "inference.num_cpus_per_actor=1",
                "sampling.sampler=ddim", "sampling.steps=50"]
        for attempt in range(3):
            began = time.perf_counter()
            try:
                proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                                      env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
                rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, stdout, stderr = "timeout", _text(exc.stdout), _text(exc.stderr)
            wall = time.perf_counter() - began
            if rc == 0 or RAY_START_FAILED not in stderr:
                break
            log("ray_jobs.inference: Ray did not start in time (busy host); trying again")
            shutil.rmtree(out_uri, ignore_errors=True)
        final = _last_json(stdout) or {}
        row = {"returncode": rc, "wall_s": rnd(wall, 2), "num_samples": num_samples,
               "images_per_sec_wall": rnd(num_samples / wall, 3), "final_line": final}
        for key, name in (("images_per_sec", "images_per_sec_job"), ("images_per_sec_per_actor", "images_per_sec_per_actor")):
            if isinstance(final.get(key), (int, float)):
                row[name] = rnd(float(final[key]), 3)
        if rc != 0:
            row["stderr_tail"] = stderr[-1500:]
        rows[f"actors_{actors}"] = row
        log(f"sampling batch job, {actors} actor(s): rc {rc}, {row['images_per_sec_wall']} img/s over the wall")
    return rows


# --- report --------------------------------------------------------------------------------------


def check_targets(results: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = results.get(key)
        if not isinstance(value, (int, float)):
            out[key] = {"target": f"{op} {bound}", "value": None, "met": None}
            continue
        met = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
        out[key] = {"target": f"{op} {bound}", "value": value, "met": bool(met)}
    return out


def write_markdown(results: Dict[str, Any], path: Path) -> None:
    meta = results["meta"]
    lines = ["# System throughput (CPU)", ""]
    lines += [f"`{meta['command']}` on {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, "
              f"{meta['threads']} torch thread(s) in every timed loop, {meta['date']}, {meta.get('total_s')} s. "
              f"Load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}.", "",
              "Rates are per on-CPU second of the timed process (`time.process_time`, or the job's processes "
              "read from /proc), so they hold on a shared host; wall-clock rates are in the JSON beside them "
              "(`*_wall`).", ""]
    lines += ["| metric | value | target | met |", "| --- | --- | --- | --- |"]
    targets = results.get("targets", {})
    for key in ("matmul_gflops_fp32", "matmul_gflops_bf16", "train_images_per_sec_fp32", "train_mfu_fp32",
                "train_mfu_bf16", "train_mfu_fp32_dit_s2", "plain_loop_images_per_sec", "ray_images_per_sec",
                "ray_overhead_ratio", "ray_overhead_ratio_whole_job_cpu", "ray_overhead_ratio_wall",
                "step_overhead_ratio", "inprocess_overhead_ratio", "data_wait_fraction", "sampling_images_per_sec"):
        if key not in results:
            continue
        target = targets.get(key, {})
        met = target.get("met")
        lines.append(f"| `{key}` | {results[key]} | {target.get('target', '')} | "
                     f"{'' if met is None else ('yes' if met else 'no')} |")
    lines.append("")
    if "train" in results:
        lines += ["## Training step (`Trainer.train_step`)", "",
                  "| config | model | batch | img/s | model GFLOP/s | matmul limit | MFU (fastest step) | MFU (median step) | MFU (wall) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["train"]:
            lines.append(f"| {row['config']} | {row['model']} ({row['geometry']}) | {row['batch']} | {row['images_per_sec']} | {row['model_gflops_per_sec']} | "
                         f"{row['matmul_limit_gflops']} | {row['mfu']} | {row.get('mfu_median_step')} | {row.get('mfu_wall')} |")
        lines.append("")
    if "overhead" in results:
        o = results["overhead"]
        inproc, ray_run = o["inprocess_train"], o["ray_train"]
        lines += ["## Plain loop vs our paths (same model, batch and threads)", "",
                  "| path | CPU-s per image | img/s wall |", "| --- | --- | --- |",
                  f"| plain single-process loop (interleaved; brackets around the runs below) | "
                  f"{o['plain_loop_cpu_s_per_image']}; {o['plain_loop_cpu_s_per_image_brackets']} | "
                  f"{o['plain_loop_images_per_sec_wall_brackets']} |",
                  f"| our `Trainer.train_step` (interleaved with the plain loop) | {o['train_step_cpu_s_per_image']} | "
                  f"{o['train_step_images_per_sec_wall']} |",
                  f"| our `speed.train.loop.train`, in-process | {inproc.get('cpu_s_per_image')} | "
                  f"{inproc.get('images_per_sec_wall')} |",
                  f"| `python -m ray_jobs.train`: training worker | {ray_run.get('worker_cpu_s_per_image')} | "
                  f"{ray_run.get('images_per_sec_wall')} |",
                  f"| `python -m ray_jobs.train`: whole job (driver, Ray daemons, worker) | "
                  f"{ray_run.get('job_cpu_s_per_image')} | (job wall {ray_run.get('wall_s')} s incl. start-up) |", ""]
    if "data" in results:
        d = results["data"]
        lines += ["## Ray Data feed from S3 (moto)", "",
                  f"Trainer consumption (the digits model at 8x8x1, wall): {d['trainer_consumption_images_per_sec']} img/s.", "",
                  "| format | first batch s (cold / warm) | img/s after the first batch | img/s per epoch incl. restart "
                  "| img per CPU-s of all Ray processes | steady / trainer | per epoch / trainer |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for fmt, feed in d["feed"].items():
            lines.append(f"| {fmt} | {feed.get('first_batch_s_cold')} / {feed.get('first_batch_s_warm')} | "
                         f"{feed['steady_images_per_sec']} | {feed['overall_images_per_sec']} | "
                         f"{feed.get('images_per_cpu_s')} | {d['feed_over_consumption'].get(fmt)} | {d.get('epoch_feed_over_consumption', {}).get(fmt)} |")
        lines += ["", "| `ray_jobs.train` streaming from S3 | img/s wall | data-wait fraction | per log interval |",
                  "| --- | --- | --- | --- |"]
        for fmt, run in d["ray_train_streaming"].items():
            lines.append(f"| {fmt} | {run.get('images_per_sec_wall')} | {run.get('data_wait_fraction')} | "
                         f"{run.get('per_interval_data_wait_fraction')} |")
        lines.append("")
    if "sampling" in results:
        s = results["sampling"]
        lines += ["## Sampling", "", "| what | batch | img/s (per CPU-s) | img/s wall |", "| --- | --- | --- | --- |"]
        for key, row in s["single_process"].items():
            lines.append(f"| single process {key} | {row['batch']} | {row['images_per_sec']} | {row.get('images_per_sec_wall')} |")
        job = s.get("batch_job", {})
        if "skipped" in job:
            lines.append(f"| batch job | - | skipped: {job['skipped']} | |")
        else:
            for key, row in job.items():
                lines.append(f"| batch job {key} | {row.get('num_samples')} | {row.get('images_per_sec_job', '')} | "
                             f"{row.get('images_per_sec_wall')} (incl. start-up) |")
        lines.append("")
    if results.get("train_profile_fp32"):
        lines += ["## Where a digits fp32 step's time goes (torch.profiler, self CPU time)", "",
                  "| op | ms/step | share | calls/step |", "| --- | --- | --- | --- |"]
        for row in results["train_profile_fp32"]:
            lines.append(f"| `{row['op']}` | {row['self_ms_per_step']} | {row['share']} | {row['calls_per_step']} |")
        lines.append("")
    if results.get("errors"):
        lines += ["## Errors", ""]
        for section, error in results["errors"].items():
            lines.append(f"- `{section}`: {error.strip().splitlines()[-1] if error else ''}")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    path.write_text("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a few minutes)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for throughput.json and throughput.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every timed loop (default 1)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of a digits fp32 step")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results: Dict[str, Any] = {
        "meta": {
            "command": "python -m benchmarks.throughput" + (" --quick" if args.quick else "")
                       + (f" --threads {args.threads}" if args.threads != 1 else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
            "quick": args.quick,
        },
        "errors": {},
        "notes": [],
    }
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="speed-throughput-"))
    sections = {
        "matmul": lambda: section_matmul(args, results),
        "train": lambda: section_train(args, results),
        "overhead": lambda: section_overhead(args, results, workdir),
        "data": lambda: section_data(args, results, workdir),
        "sampling": lambda: section_sampling(args, results, workdir),
    }
    try:
        for name, run in sections.items():
            if name in args.skip:
                continue
            log(f"section {name} (load average {loadavg()})")
            t0 = time.perf_counter()
            try:
                run()
            except Exception:
                results["errors"][name] = traceback.format_exc()[-2000:]
                log(f"section {name} failed:\n{results['errors'][name]}")
            results["meta"][f"{name}_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["total_s"] = round(time.perf_counter() - began, 1)
    results["meta"]["loadavg_end"] = loadavg()
    results["targets"] = check_targets(results)
    results["notes"] += auto_notes(results)
    (out_dir / "throughput.json").write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    write_markdown(results, out_dir / "throughput.md")
    summary = {k: results.get(k) for k in ("matmul_gflops_fp32", "matmul_gflops_bf16", "train_mfu_fp32", "train_mfu_bf16",
                                           "ray_overhead_ratio", "data_wait_fraction", "sampling_images_per_sec")}
    print(json.dumps({"event": "throughput_done", "out": str(out_dir), **summary}), flush=True)
    return 0


def auto_notes(results: Dict[str, Any]) -> List[str]:
    notes = []
    flags = results.get("matmul", {}).get("cpu_flags_bf16")
    if flags is not None and not any("bf16" in f or f.startswith("amx") for f in flags):
        notes.append("This CPU has no native bf16 matrix instructions (no avx512_bf16/amx): torch runs bf16 products "
                     "in a slow fallback kernel, so bf16 autocast is far slower than fp32 here; bf16 MFU is "
                     "against that same slow bf16 matmul rate.")
    for label, run in (("overhead", results.get("overhead", {}).get("ray_train")),
                       *((f"data ({fmt})", r) for fmt, r in results.get("data", {}).get("ray_train_streaming", {}).items())):
        if run and run.get("returncode") != 0:
            notes.append(f"The {label} ray_jobs.train run ended with {run.get('returncode')!r} (its steady-state "
                         f"intervals, {run.get('intervals')}, were recorded before that); its final JSON line is missing.")
    load = results["meta"].get("loadavg_start")
    cores = results["meta"].get("cores") or 1
    if isinstance(load, (int, float)) and load > 0.5 * cores:
        notes.append(f"The host was busy (load average {load} on {cores} cores at the start): absolute numbers are low "
                     "and noisy; ratios from interleaved runs are the robust part.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
