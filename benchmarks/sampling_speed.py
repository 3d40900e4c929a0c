"""Sampling speed of one inference actor on the embedded digits model (DiT-T/2, 8x8x1).

    python -m benchmarks.sampling_speed [--threads 1] [--batch 64] [--repeats 2] [--device cpu]
                                        [--ray-actors 0] [--out FILE]

Times ``speed.sample.generate`` (exactly what each ``ray_jobs.inference`` actor runs per shard)
for DDPM-250 and DDIM-50 with the digits config's sampling settings (guidance 2.0, so every
step is one forward of 2 x batch). Weights are random: the cost of a step does not depend on
them. ``--threads`` is the actor's inference.num_cpus_per_actor. With ``--ray-actors N`` the Ray
job itself also runs (N actors, DDIM-50) and its per-actor rate is reported next to it.
Prints one JSON line; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch

from speed.config import load_config
from speed.sample import generate, load_sampling_model
from speed.models import build_model, describe
from speed.models.export import save_export

SETTINGS = {"ddpm250": ["sampling.sampler=ddpm", "sampling.steps=250"],
            "ddim50": ["sampling.sampler=ddim", "sampling.steps=50"]}


def digits_export(folder: str) -> str:
    cfg = load_config(None, [])  # the embedded default: DiT-T/2 on 8x8x1 digits
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    torch.manual_seed(0)
    model = build_model(cfg.model, description.input_size, description.in_channels)
    for param in model.parameters():
        param.data.normal_(0.0, 0.02)
    save_export(model.state_dict(), description, folder)
    return folder


def time_generate(export: str, overrides, batch: int, repeats: int, device: str) -> dict:
    cfg = load_config(None, overrides)
    model, description = load_sampling_model(export, device=torch.device(device))
    labels = np.arange(batch) % description.model["num_classes"]
    generate(model, description, cfg.sampling, labels[:2], np.arange(2), 0, device)  # warm-up
    rates = []
    for repeat in range(repeats):
        began = time.perf_counter()
        generate(model, description, cfg.sampling, labels, np.arange(batch) + repeat * batch, 0, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(batch / (time.perf_counter() - began))
    return {"images_per_sec": max(rates), "runs": rates, "batch": batch,
            "guidance_scale": cfg.sampling.guidance_scale, "model": description.model["name"]}


def time_ray_job(export: str, actors: int, threads: int, batch: int) -> dict:
    from ray_jobs import inference

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*SETTINGS["ddim50"], f"inference.checkpoint_uri={export}",
                                 f"inference.output_uri={out}/samples", f"inference.num_actors={actors}",
                                 f"inference.num_cpus_per_actor={threads}", f"inference.batch_size={batch}",
                                 f"inference.num_samples={batch * actors * 3}", f"run.output_uri={out}"])
        record = inference.run_inference(cfg)
    return {key: record[key] for key in ("num_samples", "num_actors", "images_per_sec", "images_per_sec_per_actor")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-actors", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        export = digits_export(folder)
        result = {"threads": args.threads, "device": args.device, "torch": torch.__version__}
        for name, overrides in SETTINGS.items():
            result[name] = time_generate(export, overrides, args.batch, args.repeats, args.device)
            print(f"{name}: {result[name]['images_per_sec']:.1f} images/s per actor", file=sys.stderr)
        if args.ray_actors:
            result["ray_ddim50"] = time_ray_job(export, args.ray_actors, args.threads, args.batch)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
