"""Where along the diffusion process each strategy's model got better: the *unweighted* epsilon MSE
of the final EMA models of a ``benchmarks.speedup`` run, per tenth of the DDPM timesteps.

Flow models are measured on the same axis: at DDPM step i the flow time with the same log-SNR is
t_i = sigmoid(-lambda_i / 2), where the flow input is the DDPM one rescaled,
x_t = (1 - t_i) / sqrt(abar_i) x_i, and the velocity gives eps = x_t + (1 - t_i) v; so both
objectives' rows are the same quantity on the same noise levels and images.

    python -m benchmarks.timestep_mse RUNS_DIR [--out FILE.md] [--images N]

RUNS_DIR is the folder holding the benchmark's trial runs (``<run.output_uri>/speedup[-quick]``);
each ``<trial>/export`` is evaluated on the images of the dataset the trial trained on (named by its
``config.yaml``: digits, patches or an imagefolder), with the same timesteps and noise (seeded), so
the rows differ only by the weights. ``--out FILE.md`` also writes FILE.json and FILE.png (the
error per noise level with its seed band, and its ratio to the plain baseline). The training logs' ``loss_t*`` cannot answer this: they hold each
strategy's own *weighted* loss. Rows are averaged over the seeds of a cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from speed.experiments.plots import plot_bucket_errors

NUM_BUCKETS = 10


@torch.no_grad()
def bucket_mse(export_dir: Path, images: torch.Tensor, labels: torch.Tensor, draws_per_bucket: int = 1,
               seed: int = 0) -> List[float]:
    """Mean epsilon MSE of the model in ``export_dir`` per timestep bucket (same draws for every model)."""
    from speed.diffusion.respace import create_diffusion
    from speed.sample.weights import load_sampling_model

    model, description = load_sampling_model(str(export_dir))
    diffusion = create_diffusion(description.num_timesteps, description.schedule, learn_sigma=False)
    alphas_cumprod = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
    channels = description.in_channels
    generator = torch.Generator().manual_seed(seed)
    width = description.num_timesteps // NUM_BUCKETS
    out = []
    for bucket in range(NUM_BUCKETS):
        total, count = 0.0, 0
        for _ in range(draws_per_bucket):
            t = torch.randint(bucket * width, (bucket + 1) * width, (len(labels),), generator=generator)  # [N]
            noise = torch.randn(images.shape, generator=generator)  # [N, C, H, W]
            x_t = diffusion.q_sample(images, t, noise)
            if getattr(description, "objective", "ddpm") == "flow":
                eps = flow_eps(model, x_t, t, labels, alphas_cumprod)
            else:
                eps = model(x_t, t, labels)[:, :channels]  # [N, C, H, W]; learned-sigma channels dropped
            total += float(((eps - noise) ** 2).mean(dim=(1, 2, 3)).sum())
            count += len(labels)
        out.append(total / count)
    return out


def flow_eps(model, x_ddpm: torch.Tensor, steps: torch.Tensor, labels: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A flow model's eps prediction at the DDPM steps' noise levels (same log-SNR), from x_ddpm [N, C, H, W]."""
    abar = alphas_cumprod[steps]  # [N]
    t = torch.sqrt(1 - abar) / (torch.sqrt(abar) + torch.sqrt(1 - abar))  # t / (1 - t) = sqrt((1 - abar) / abar)
    scale = ((1 - t) / torch.sqrt(abar)).view(-1, 1, 1, 1)
    x_t = (scale * x_ddpm.double()).float()
    v = model(x_t, t.float(), labels)
    return x_t + (1 - t.float()).view(-1, 1, 1, 1) * v


def strategy_of(trial: str) -> str:
    """The variant of a trial folder: a cell (<cell run name>-seed<seed>) or an older t<index>-<strategy>-seed<seed>."""
    from speed.experiments.cells import Cell

    name = trial.rsplit("-seed", 1)[0]
    head, _, rest = name.partition("-")
    if head[:1] == "t" and head[1:].isdigit():
        return rest
    return Cell.from_run_name(name).name if name.count("-") == 2 else name


def trial_dataset(trial_dir: Path, cache: Dict[tuple, tuple], limit: Optional[int] = None):
    """(images, labels) of the dataset the trial trained on, from its resolved ``config.yaml``
    (the benchmark's own loader; the same images for every trial of one dataset)."""
    from benchmarks.speedup import load_dataset
    from speed.config import load_config

    cfg = load_config(str(trial_dir / "config.yaml"))
    key = (cfg.data.format, cfg.data.uri, cfg.data.resolution, cfg.data.channels)
    if key not in cache:
        images, labels = load_dataset(cfg)
        cache[key] = (images[:limit], labels[:limit]) if limit else (images, labels)
    return key, cache[key]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table (FILE.md), a .json and a .png plot beside it")
    parser.add_argument("--images", type=int, default=None, help="images of the dataset to evaluate on (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    exports = sorted(p.parent for p in args.runs_dir.glob("*/export/model.json"))
    if not exports:
        print(f"error: no <trial>/export/model.json under {args.runs_dir}; run benchmarks.speedup first", file=sys.stderr)
        return 2
    missing = [e.parent.name for e in exports if not (e.parent / "config.yaml").is_file()]
    if missing:
        print(f"error: no config.yaml in {', '.join(missing)} (the run's resolved config names its dataset); "
              "point RUNS_DIR at a benchmarks.speedup runs folder", file=sys.stderr)
        return 2
    datasets: Dict[tuple, tuple] = {}
    rows: Dict[str, List[List[float]]] = defaultdict(list)
    for export in exports:
        key, (images, labels) = trial_dataset(export.parent, datasets, args.images)
        values = bucket_mse(export, images, labels)
        rows[strategy_of(export.parent.name)].append(values)
        print(f"{export.parent.name}: " + " ".join(f"{v:.4f}" for v in values), file=sys.stderr, flush=True)
    if len(datasets) > 1:
        print(f"error: the runs under {args.runs_dir} trained on {len(datasets)} datasets "
              f"({', '.join(str(k) for k in datasets)}); their errors are not comparable: one runs folder per dataset",
              file=sys.stderr)
        return 2
    (data_format, data_uri, resolution, channels), (images, _) = next(iter(datasets.items()))
    dataset = f"{data_format}{' ' + data_uri if data_uri else ''} ({resolution}px, {channels} channel(s))"
    header = "| cell (seeds) | " + " | ".join(f"t {b * 100}-{b * 100 + 99}" for b in range(NUM_BUCKETS)) + " |"
    lines = [header, "| --- " * (NUM_BUCKETS + 1) + "|"]
    summary = {}
    for name, per_seed in rows.items():
        columns = list(zip(*per_seed))
        summary[name] = {"seeds": len(per_seed), "mse_by_bucket": [sum(c) / len(c) for c in columns],
                         "min_by_bucket": [min(c) for c in columns], "max_by_bucket": [max(c) for c in columns]}
        lines.append(f"| {name} ({len(per_seed)}) | " + " | ".join(f"{v:.4f}" for v in summary[name]["mse_by_bucket"])
                     + " |")
    baseline = next((b for b in ("ddpm-uniform-none", "uniform") if b in summary), None)
    if baseline is not None:
        base = summary[baseline]["mse_by_bucket"]
        for name, entry in summary.items():
            if name != baseline:
                ratio = [m / b for m, b in zip(entry["mse_by_bucket"], base)]
                entry[f"ratio_to_{baseline}"] = ratio
                lines.append(f"| {name} / {baseline} | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        description = (f"`python -m benchmarks.timestep_mse RUNS_DIR` over {len(exports)} runs on {len(images)} images "
                       f"of {dataset}, one seeded draw of t and noise per image and bucket; seed means.")
        args.out.write_text(f"# Unweighted epsilon MSE of the final EMA models per timestep bucket\n\n"
                            f"{description}\n\n{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"dataset": dataset, "images": len(images),
                                                             "cells": summary}, indent=1))
        args.out.with_suffix(".png").write_bytes(plot_bucket_errors(
            summary, baseline, [b * 100 + 50 for b in range(NUM_BUCKETS)], f"per-timestep error, {dataset}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
