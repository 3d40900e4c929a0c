"""The batch sampling job at scale: per-actor efficiency against one process, and start-up apart.

    python -m benchmarks.sampling_job [--num-samples 2000] [--actors 1,2] [--threads 1] [--batch 64]
                                      [--out benchmarks/results/sampling_job]

On the digits model (DiT-T/2, 8x8x1, random weights: a step costs the same), DDIM-50 with the
digits config's guidance: first ``speed.sample.generate`` in this process with ``--threads``
threads (the single-process rate), then ``ray_jobs.inference`` with each actor count, each actor
given the same threads. Reports, per run: wall time, the rate inside the samplers per actor
(``images_per_sec_per_actor``), its efficiency against the single process, the end-to-end
rate, and the start-up (wall time minus the time the samplers would need at their own rate:
Ray start, actor start, model load, npz assembly). Writes ``<out>.json`` and ``<out>.md``.
On a machine with fewer free cores than actors x threads the actors share cores, and the
per-actor efficiency says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.sampling_speed import SETTINGS, digits_export, time_generate
from speed.config import load_config


def ray_job(export: str, actors: int, threads: int, batch: int, num_samples: int) -> dict:
    from ray_jobs import inference

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*SETTINGS["ddim50"], f"inference.checkpoint_uri={export}",
                                 f"inference.output_uri={out}/samples", f"inference.num_actors={actors}",
                                 f"inference.num_cpus_per_actor={threads}", f"inference.batch_size={batch}",
                                 f"inference.num_samples={num_samples}", f"run.output_uri={out}",
                                 f"ray.num_cpus={max(os.cpu_count() or 1, actors * threads)}"])
        began = time.perf_counter()
        record = inference.run_inference(cfg)
        wall = time.perf_counter() - began
    import ray

    ray.shutdown()  # each actor count gets a fresh Ray: start-up is part of what is measured
    per_actor = record["images_per_sec_per_actor"]
    sampling = record["generated"] / (actors * per_actor) if per_actor else 0.0
    return {"actors": actors, "num_samples": record["num_samples"], "wall_s": round(wall, 1),
            "images_per_sec": round(record["num_samples"] / wall, 2), "images_per_sec_per_actor": round(per_actor, 2),
            "sampling_s": round(sampling, 1), "startup_s": round(wall - sampling, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_job", description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/sampling_job")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        export = digits_export(folder)
        single = time_generate(export, SETTINGS["ddim50"], args.batch, 3, "cpu")["images_per_sec"]
        print(f"single process, {args.threads} thread(s): {single:.2f} img/s", file=sys.stderr, flush=True)
        runs = []
        for actors in [int(a) for a in args.actors.split(",")]:
            run = ray_job(export, actors, args.threads, args.batch, args.num_samples)
            run["efficiency_per_actor"] = round(run["images_per_sec_per_actor"] / single, 3)
            runs.append(run)
            print(f"{actors} actor(s): {json.dumps(run)}", file=sys.stderr, flush=True)
    result = {"event": "sampling_job", "machine": f"{os.cpu_count()} cores", "threads": args.threads,
              "batch": args.batch, "sampler": "ddim50", "single_process_images_per_sec": round(single, 2), "runs": runs,
              "command": "python -m benchmarks.sampling_job " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The batch sampling job at scale", "",
             f"DiT-T/2 digits model, DDIM-50, batch {args.batch}, {args.threads} thread(s) per actor, on a "
             f"{os.cpu_count()}-core machine shared with other jobs. Single process at equal threads: "
             f"{single:.2f} img/s.", "",
             "| actors | samples | wall (s) | end-to-end img/s | img/s per actor (in the sampler) | efficiency per actor | "
             "start-up (s) |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['actors']} | {run['num_samples']} | {run['wall_s']} | {run['images_per_sec']} | "
                     f"{run['images_per_sec_per_actor']} | {run['efficiency_per_actor']} | {run['startup_s']} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
