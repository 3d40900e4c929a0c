"""One brief check on a single-GPU machine (run through benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 430] [--cpu-smoke]

Everything in one call, in this order, each part skipped (and said so) when the time budget
would run out:

1. the measured matmul limit: bf16 (and fp32 / TF32) 8192^3 products timed with CUDA events;
2. correctness: bf16 against fp32 on a small config (DiT-S/2, 32x32x4 latents): the same
   ``Trainer`` steps from the same initial weights and draws, comparing losses and the direction
   of the total weight update;
3. DiT-XL/2 on synthetic 32x32x4 latents (ImageNet-256's SD-VAE latent shape), bf16 FSDP2 on one
   rank of an NCCL process group (MASTER_ADDR=127.0.0.1), the real ``Trainer.train_step`` after
   ``speed.train.parallelize.parallelize``: eager, + activation checkpointing, + torch.compile,
   both; and the plain single-process module (what one worker trains without FSDP); then flow
   matching (SiT's objective) and token routing (half the tokens skip the middle blocks), eager;
   images/s and MFU (FLOPs counted with FlopCounterMode on the meta device) against the measured
   bf16 rate and against the datasheet's dense bf16 rate;
4. sampling: DDIM-50 with guidance 1.5 on the XL/2 model (the inference actor's fp32+TF32
   setting, and bf16 autocast), latents only (no VAE decode: there are no VAE weights here).

A short table is printed last; ``--out`` also gets gpu_check.json and gpu_check.txt.
``--cpu-smoke`` runs every code path on the CPU with a tiny model (gloo, aot_eager compile) to
test the script's logic without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 of an H100/H200 SXM by the datasheet (the page the targets refer to).
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
TARGET_MFU = 0.40
FLOW_OVERRIDES = ("diffusion.objective=flow", "model.learn_sigma=false", "sampling.sampler=euler")

_T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


# --- device and process group --------------------------------------------------------------------


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], reps: int) -> float:
        """Seconds per call of fn over reps calls (CUDA events on GPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / reps
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - began) / reps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_one_rank_group(device: torch.device) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def make_env(device: torch.device, fsdp: bool):
    """A DistEnv for this one rank. ``DistEnv.distributed`` is False for a world of one (a single
    process trains the plain module), so to measure FSDP2 on one GPU a subclass reports True."""
    from speed.train.distributed import DistEnv

    if not fsdp:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device)

    @dataclass(frozen=True)
    class OneRankFSDPEnv(DistEnv):
        @property
        def distributed(self) -> bool:  # type: ignore[override]
            return dist.is_available() and dist.is_initialized()

    return OneRankFSDPEnv(rank=0, world_size=1, local_rank=0, device=device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# --- configs -------------------------------------------------------------------------------------


@dataclass
class Geometry:
    model: str
    resolution: int  # image resolution; latents are resolution / 8, 4 channels
    batch: int


def train_config(geometry: Geometry, *, mixed_precision: str, compile: bool, ac: bool, strategy: str = "fsdp",
                 extra: Sequence[str] = ()):
    from speed.config import load_config

    overrides = [
        f"model.name={geometry.model}", "model.num_classes=1000", "data.format=latents",
        f"data.resolution={geometry.resolution}", f"train.global_batch_size={geometry.batch}",
        f"train.micro_batch_size={geometry.batch}", f"parallel.mixed_precision={mixed_precision}",
        f"parallel.compile={str(compile).lower()}", f"parallel.activation_checkpointing={str(ac).lower()}",
        f"parallel.strategy={strategy}", "run.output_uri=/tmp/speed-gpu-check", "train.on_nonfinite=raise",
        "ray.num_workers=1",
        "optim.lr=1e-4", *extra,
    ]
    return load_config("configs/imagenet_256/speed.yaml", overrides, phase="train")


def count_train_flops(cfg) -> Tuple[float, float]:
    """(FLOPs of one forward + backward of training_losses at the config's micro-batch, forward FLOPs),
    counted by FlopCounterMode on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from speed.diffusion.factory import build_training_diffusion
    from speed.models import build_model, describe

    description = describe(cfg.model, cfg.data, cfg.diffusion)
    model = build_model(cfg.model, description.input_size, description.in_channels, device="meta")
    diffusion = build_training_diffusion(cfg.diffusion, cfg.model.learn_sigma)
    n = cfg.train.micro_batch_size
    shape = (n, description.in_channels, description.input_size, description.input_size)
    x = torch.empty(shape, device="meta")
    t = torch.zeros(n, dtype=torch.long, device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
    forward = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=torch.empty(shape, device="meta"))
        losses["loss"].sum().backward()
    del out
    return float(counter.get_total_flops()), forward


# --- 1. matmul -----------------------------------------------------------------------------------


def measure_matmul(clock: Clock, smoke: bool) -> Dict[str, Any]:
    n = 512 if smoke else 8192
    device = clock.device
    out: Dict[str, Any] = {"size": n}
    settings = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
    if device.type == "cuda":
        settings.append(("tf32", torch.float32, True))
    for name, dtype, tf32 in settings:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        seconds = clock.time(lambda: a @ b, reps=10 if name == "bf16" else 4)
        out[f"{name}_tflops"] = round(2 * n**3 / seconds / 1e12, 2 if device.type == "cuda" else 5)
        a = b = None  # free both before the next dtype allocates its own
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    free_memory()
    return out


# --- 2. correctness: bf16 against fp32 -----------------------------------------------------------


def full_params(model) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = value.detach().float().clone()
    return out


def run_steps_for_check(cfg, env, x, y, steps: int) -> Tuple[List[float], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    from speed.train.loop import build_trainer

    trainer = build_trainer(cfg, env)
    before = full_params(trainer.model)
    losses = []
    for step in range(steps):
        trainer.train_step(step, x, y)
        losses.append(trainer.metrics.read(env)["loss"])
    after = full_params(trainer.model)
    del trainer
    free_memory()
    return losses, before, after


def correctness_check(device: torch.device, smoke: bool, fsdp: bool = True) -> Dict[str, Any]:
    geometry = Geometry("DiT-N/2" if smoke else "DiT-S/2", 64 if smoke else 256, 8 if smoke else 32)
    steps = 4 if smoke else 30
    env = make_env(device, fsdp=fsdp)
    gen = torch.Generator().manual_seed(123)
    shape = (geometry.batch, 4, geometry.resolution // 8, geometry.resolution // 8)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, 1000, (geometry.batch,), generator=gen).to(device)
    extra = ["optim.lr=1e-3"]  # large enough to leave adaLN-Zero's all-zero output within the steps
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = train_config(geometry, mixed_precision=precision, compile=False, ac=False, extra=extra,
                           strategy="fsdp" if fsdp else "none")
        runs[precision] = run_steps_for_check(cfg, env, x, y, steps)
    (l32, init32, end32), (l16, init16, end16) = runs["fp32"], runs["bf16"]
    same_init = all(torch.equal(init32[k], init16[k]) for k in init32)
    rel = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(l32, l16)]
    d32 = torch.cat([(end32[k] - init32[k]).flatten() for k in init32])
    d16 = torch.cat([(end16[k] - init16[k]).flatten() for k in init16])
    cosine = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    finite = all(math.isfinite(v) for v in l16)
    result = {
        "model": geometry.model, "latents": f"{shape[2]}x{shape[3]}x4", "batch": geometry.batch, "steps": steps,
        "strategy": "fsdp2 (1 rank)" if fsdp else "plain module", "same_initial_weights": same_init,
        "loss_fp32_first_last": [round(l32[0], 5), round(l32[-1], 5)],
        "loss_bf16_first_last": [round(l16[0], 5), round(l16[-1], 5)],
        "loss_rel_diff_median": round(sorted(rel)[len(rel) // 2], 5), "loss_rel_diff_max": round(max(rel), 5),
        "update_cosine_bf16_vs_fp32": round(cosine, 5),
    }
    result["passed"] = bool(same_init and finite and result["loss_rel_diff_median"] < 0.02
                            and result["loss_rel_diff_max"] < 0.1 and cosine > 0.9)
    return result


# --- 3. DiT-XL/2 training throughput -------------------------------------------------------------


@dataclass
class Variant:
    name: str
    strategy: str  # fsdp | none
    compile: bool
    ac: bool
    est_s: float  # rough cost on an H200, to skip what the budget cannot hold
    extra: Tuple[str, ...] = ()  # config overrides of the variant (objective, routing)


def measure_variant(variant: Variant, geometry: Geometry, device: torch.device, clock: Clock, warmup: int,
                    steps: int, flops_per_step: float, limits: Dict[str, float], compile_backend: Optional[str]) -> Dict[str, Any]:
    from speed.train.loop import build_trainer

    cfg = train_config(geometry, mixed_precision="bf16", compile=variant.compile, ac=variant.ac, strategy=variant.strategy,
                       extra=variant.extra)
    env = make_env(device, fsdp=variant.strategy == "fsdp")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    with _compile_backend(compile_backend):
        trainer = build_trainer(cfg, env)
        build_s = time.perf_counter() - began
        gen = torch.Generator().manual_seed(0)
        shape = (geometry.batch, 4, geometry.resolution // 8, geometry.resolution // 8)
        x = torch.randn(shape, generator=gen).to(device)
        y = torch.randint(0, 1000, (geometry.batch,), generator=gen).to(device)
        first = time.perf_counter()
        trainer.train_step(0, x, y)
        clock.sync()
        first_s = time.perf_counter() - first
        for step in range(1, warmup):
            trainer.train_step(step, x, y)
        clock.sync()
        began = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step, x, y)
        clock.sync()
        step_s = (time.perf_counter() - began) / steps
        loss = trainer.metrics.read(env)["loss"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if variant.extra and getattr(trainer, "train_flops_per_image", None):
        flops_per_step = trainer.train_flops_per_image * geometry.batch  # routing changes the work per step
    achieved = flops_per_step / step_s / 1e12
    row = {
        "variant": variant.name, "strategy": trainer.strategy_name, "compile": variant.compile, "ac": variant.ac,
        "batch": geometry.batch, "images_per_sec": round(geometry.batch / step_s, 2), "step_s": round(step_s, 4),
        "model_tflops": round(achieved, 2), "build_s": round(build_s, 1), "first_step_s": round(first_s, 1),
        "peak_mem_gib": round(peak, 1), "loss": round(loss, 5),
    }
    if limits.get("measured"):
        row["mfu_measured"] = round(achieved / limits["measured"], 4)
    if limits.get("datasheet"):
        row["mfu_datasheet"] = round(achieved / limits["datasheet"], 4)
    del trainer, x, y
    free_memory()
    reset_compiler()
    return row


@contextlib.contextmanager
def _compile_backend(backend: Optional[str]):
    """Make ``nn.Module.compile()`` (what parallelize calls) use ``backend``; None keeps inductor."""
    if backend is None:
        yield
        return
    original = torch.nn.Module.compile

    def compile_with(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with
    try:
        yield
    finally:
        torch.nn.Module.compile = original


# --- 4. sampling ---------------------------------------------------------------------------------


def measure_sampling(geometry: Geometry, device: torch.device, clock: Clock, batch: int, steps: int,
                     bf16: bool) -> Dict[str, Any]:
    from speed.sample import guided_forward, sample_generators, sampling_diffusion
    from speed.models import build_model, describe

    cfg = train_config(geometry, mixed_precision="bf16", compile=False, ac=False,
                       extra=["sampling.sampler=ddim", f"sampling.steps={steps}", "sampling.guidance_scale=1.5"])
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    torch.manual_seed(0)
    model = build_model(cfg.model, description.input_size, description.in_channels).to(device).eval().requires_grad_(False)
    for param in model.parameters():  # away from adaLN-Zero's zeros; the cost does not depend on values
        param.data.normal_(0.0, 0.02)
    if device.type == "cuda":
        # The inference actor's setting (speed.sample.worker.ShardSampler): fp32 with TF32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    diffusion = sampling_diffusion(description, cfg.sampling)
    forward = guided_forward(model, description, cfg.sampling)
    shape = (batch, description.in_channels, description.input_size, description.input_size)
    y = torch.arange(batch, device=device) % 1000
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return diffusion.ddim_sample_loop(forward, shape, model_kwargs={"y": y}, device=device, clip_denoised=False,
                                              eta=0.0, generator=sample_generators(0, range(batch)))

    run_short = sampling_diffusion(description, type(cfg.sampling)(**{**cfg.sampling.__dict__, "steps": 2}))
    with torch.no_grad(), autocast:  # warm-up: kernels and cuBLAS handles
        run_short.ddim_sample_loop(forward, shape, model_kwargs={"y": y}, device=device, clip_denoised=False,
                                   generator=sample_generators(0, range(batch)))
    clock.sync()
    began = time.perf_counter()
    out = run()
    clock.sync()
    seconds = time.perf_counter() - began
    finite = bool(torch.isfinite(out).all())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    del model, out
    free_memory()
    return {"model": geometry.model, "sampler": f"ddim{steps}", "guidance": 1.5, "batch": batch,
            "precision": "bf16 autocast" if bf16 else "fp32+tf32", "seconds": round(seconds, 2),
            "images_per_sec": round(batch / seconds, 2), "finite": finite, "vae_decode": "not included"}


# --- main ----------------------------------------------------------------------------------------


def format_table(report: Dict[str, Any]) -> str:
    lines = []
    env = report.get("env", {})
    mm = report.get("matmul", {})
    lines.append(f"GPU check: {env.get('device_name')} | torch {env.get('torch')} | "
                 f"bf16 matmul {mm.get('bf16_tflops')} TFLOP/s measured ({mm.get('size')}^3), "
                 f"datasheet {report.get('limits', {}).get('datasheet')} | total {report.get('total_s')} s")
    lines.append(f"{'variant':<34} {'img/s':>9} {'step s':>8} {'TFLOP/s':>8} {'MFU meas':>9} {'MFU sheet':>9} "
                 f"{'mem GiB':>8} {'1st step s':>10}")
    for row in report.get("train", []):
        if "skipped" in row or "error" in row:
            lines.append(f"{row['variant']:<34} {row.get('skipped') or row.get('error')}")
            continue
        lines.append(f"{row['variant']:<34} {row['images_per_sec']:>9} {row['step_s']:>8} {row['model_tflops']:>8} "
                     f"{row.get('mfu_measured', ''):>9} {row.get('mfu_datasheet', ''):>9} {row['peak_mem_gib']:>8} "
                     f"{row['first_step_s']:>10}")
    for row in report.get("sampling", []):
        if "skipped" in row or "error" in row:
            lines.append(f"sampling: {row.get('skipped') or row.get('error')}")
            continue
        lines.append(f"sampling {row['model']} {row['sampler']} cfg{row['guidance']} {row['precision']} batch {row['batch']}: "
                     f"{row['images_per_sec']} img/s (latents, no VAE decode)")
    check = report.get("correctness")
    if check:
        if "passed" in check:
            lines.append(f"bf16 vs fp32 ({check['model']}, {check['steps']} steps): loss rel diff median "
                         f"{check['loss_rel_diff_median']} max {check['loss_rel_diff_max']}, update cosine "
                         f"{check['update_cosine_bf16_vs_fp32']} -> {'PASS' if check['passed'] else 'FAIL'}")
        else:
            lines.append(f"bf16 vs fp32: {check.get('error') or check.get('skipped')}")
    best = max((r.get("mfu_measured", 0) for r in report.get("train", []) if "mfu_measured" in r), default=None)
    if best is not None:
        lines.append(f"target: DiT-XL/2 MFU >= {TARGET_MFU} of measured bf16 -> best {best} "
                     f"{'MET' if best >= TARGET_MFU else 'MISSED'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for gpu_check.json / gpu_check.txt")
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting new parts after this")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: tests the logic only")
    parser.add_argument("--batch", type=int, default=None, help="DiT-XL/2 images per step (default 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    clock = Clock(device)
    deadline = _T0 + args.budget_s
    remaining = lambda: deadline - time.perf_counter()  # noqa: E731
    report: Dict[str, Any] = {"env": {"torch": torch.__version__, "smoke": smoke}}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        report["env"].update(device_name=name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                             memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        report["env"]["device_name"] = "cpu (smoke)"
    with contextlib.suppress(Exception):
        import timm

        report["env"]["timm"] = timm.__version__
    fsdp_ok = True
    try:
        init_one_rank_group(device)
    except Exception as exc:  # no NCCL here: the plain-module variant and sampling still run
        traceback.print_exc()
        report["process_group_error"] = f"{type(exc).__name__}: {exc}"
        fsdp_ok = False
    compile_backend = "aot_eager" if smoke else None

    def save() -> None:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            report["total_s"] = round(time.perf_counter() - _T0, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
            (out / "gpu_check.txt").write_text(format_table(report) + "\n")

    def part(name: str, fn: Callable[[], Any], need_s: float) -> Any:
        save()
        if remaining() < need_s:
            say(f"{name}: skipped ({remaining():.0f} s left, needs ~{need_s:.0f})")
            return {"skipped": f"time budget ({remaining():.0f} s left, needs ~{need_s:.0f} s)"}
        say(f"{name} ...")
        try:
            result = fn()
            say(f"{name}: {json.dumps(result)[:400]}")
            return result
        except Exception as exc:
            traceback.print_exc()
            free_memory()
            reset_compiler()
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    report.setdefault("train", [])
    report.setdefault("sampling", [])
    try:
        report["matmul"] = part("matmul", lambda: measure_matmul(clock, smoke), 10)
        datasheet = None
        if device.type == "cuda":
            datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in report["env"]["device_name"]), None)
        measured = report["matmul"].get("bf16_tflops")
        report["limits"] = {"measured": measured, "datasheet": datasheet}
        report["correctness"] = part("correctness bf16 vs fp32", lambda: correctness_check(device, smoke, fsdp_ok), 30)

        geometry = Geometry("DiT-N/2" if smoke else "DiT-XL/2", 64 if smoke else 256,
                            args.batch or (4 if smoke else 128))
        warmup, steps = (2, 2) if smoke else (3, args.steps or 8)
        try:
            flops = count_train_flops(train_config(geometry, mixed_precision="bf16", compile=False, ac=False))
        except Exception as exc:
            traceback.print_exc()
            report["flops_error"] = f"{type(exc).__name__}: {exc}"
            flops = (float("nan"), float("nan"))
        report["flops"] = {"train_flops_per_step": flops[0], "forward_flops_per_step": flops[1],
                           "train_gflops_per_image": round(flops[0] / geometry.batch / 1e9, 2)}
        say(f"model FLOPs: {report['flops']}")
        variants = [
            Variant("fsdp2 bf16 eager", "fsdp", False, False, 30),
            Variant("fsdp2 bf16 eager + AC", "fsdp", False, True, 30),
            Variant("fsdp2 bf16 compile", "fsdp", True, False, 150),
            Variant("plain module bf16 autocast eager", "none", False, False, 30),
            Variant("fsdp2 bf16 compile + AC", "fsdp", True, True, 150),
            Variant("fsdp2 bf16 eager, flow matching (SiT)", "fsdp", False, False, 30, FLOW_OVERRIDES),
            Variant("fsdp2 bf16 eager, routing 0.5", "fsdp", False, False, 30, ("model.routing.fraction=0.5",)),
        ]
        report["train"] = []
        report["sampling"] = []
        sampling_done = False
        for variant in variants:
            if variant.strategy == "fsdp" and not fsdp_ok:
                report["train"].append({"variant": variant.name, "skipped": "no process group (see process_group_error)"})
                continue
            if variant.compile and not sampling_done:
                # Sampling before the compile variants, so a slow compile cannot crowd it out.
                for bf16 in (False, True):
                    row = part(f"sampling ddim50 {'bf16' if bf16 else 'fp32+tf32'}",
                               lambda: measure_sampling(geometry, device, clock, 4 if smoke else 64, 5 if smoke else 50, bf16), 40)
                    report["sampling"].append(row)
                sampling_done = True
            row = part(variant.name, lambda: measure_variant(variant, geometry, device, clock, warmup, steps, flops[0],
                                                             report["limits"], compile_backend),
                       variant.est_s if not smoke else 1)
            row.setdefault("variant", variant.name)
            report["train"].append(row)
    except KeyboardInterrupt:
        say("interrupted (time limit): reporting what is done")
        report["interrupted"] = True
    report["total_s"] = round(time.perf_counter() - _T0, 1)
    table = format_table(report)
    save()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: NCCL/gloo shutdown can hang after the work is done
