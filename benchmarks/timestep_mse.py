"""Where along the diffusion process each strategy's model got better: the *unweighted* epsilon MSE
of the final EMA models of a ``benchmarks.speedup`` run, per tenth of the DDPM timesteps.

Flow models are measured on the same axis: at DDPM step i the flow time with the same log-SNR is
t_i = sigmoid(-lambda_i / 2), where the flow input is the DDPM one rescaled,
x_t = (1 - t_i) / sqrt(abar_i) x_i, and the velocity gives eps = x_t + (1 - t_i) v; so both
objectives' rows are the same quantity on the same noise levels and images.

    python -m benchmarks.timestep_mse RUNS_DIR [--out FILE.md] [--images N]

RUNS_DIR is the folder holding the benchmark's trial runs (``<run.output_uri>/speedup[-quick]``);
each ``<trial>/export`` is evaluated on the same digits, timesteps and noise (seeded), so the rows
differ only by the weights. The training logs' ``loss_t*`` cannot answer this: they hold each
strategy's own *weighted* loss. Rows are averaged over the seeds of a strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

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
    """The variant of a trial folder: a cell (<cell>-seed<seed>) or an older t<index>-<strategy>-seed<seed>."""
    name = trial.rsplit("-seed", 1)[0]
    head, _, rest = name.partition("-")
    return rest if head[:1] == "t" and head[1:].isdigit() else name


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) and a .json beside it")
    parser.add_argument("--images", type=int, default=1797, help="digits images to evaluate on (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from speed.data.digits import load_digits

    exports = sorted(p.parent for p in args.runs_dir.glob("*/export/model.json"))
    if not exports:
        print(f"error: no <trial>/export/model.json under {args.runs_dir}; run benchmarks.speedup first", file=sys.stderr)
        return 2
    rows: Dict[str, List[List[float]]] = defaultdict(list)
    for export in exports:
        description = json.loads((export / "model.json").read_text())
        images, labels = load_digits(description.get("resolution", 8), description.get("in_channels", 1))
        images, labels = images[: args.images], labels[: args.images]
        values = bucket_mse(export, images, labels)
        rows[strategy_of(export.parent.name)].append(values)
        print(f"{export.parent.name}: " + " ".join(f"{v:.4f}" for v in values), file=sys.stderr, flush=True)
    header = "| strategy (seeds) | " + " | ".join(f"t {b * 100}-{b * 100 + 99}" for b in range(NUM_BUCKETS)) + " |"
    lines = [header, "| --- " * (NUM_BUCKETS + 1) + "|"]
    summary = {}
    for name, per_seed in rows.items():
        mean = [sum(col) / len(col) for col in zip(*per_seed)]
        summary[name] = {"seeds": len(per_seed), "mse_by_bucket": mean}
        lines.append(f"| {name} ({len(per_seed)}) | " + " | ".join(f"{v:.4f}" for v in mean) + " |")
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
        args.out.write_text(
            f"# Unweighted epsilon MSE of the final EMA models per timestep bucket\n\n"
            f"`python -m benchmarks.timestep_mse {args.runs_dir.name}` over {len(exports)} runs, "
            f"{min(args.images, 1797)} digits, one seeded draw of t and noise per image and bucket.\n\n{table}\n"
        )
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
