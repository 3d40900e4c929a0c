"""Where the progress sampler would put its samples, replayed on a finished run's loss curves.

    python -m benchmarks.progress_replay RUN_DIR [--at 200,500,1000,2000] [--out FILE.json] [key=value ...]

RUN_DIR is a DDPM run folder (``<run.output_uri>/speedup/<trial>``, say the plain baseline's). Its
log records hold the training loss per tenth of the timesteps (``loss_t0`` .. ``loss_t9``) every
``train.log_every`` steps. The replay feeds a ``progress`` strategy on the run's own noise schedule
(``diffusion.timesteps.progress.*`` from the overrides, the defaults otherwise) one update per training step with those losses,
linear between log records, at the centres of its bins, and prints the density it would sample
from per tenth of the timesteps next to the losses. It answers why the sampler trains where it
does without another training run; the live sampler sees per-sample losses, which are noisier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

TENTHS = 10


def replay(history: Sequence[Dict[str, float]], diffusion, at: Sequence[int] = ()) -> List[Dict[str, object]]:
    """[{"step", "loss_by_tenth", "mass_by_tenth"}] at the logged steps in ``at`` (every logged step if empty),
    for the progress strategy of ``diffusion`` (a DiffusionConfig with ``timesteps.name: progress``)."""
    from speed.diffusion.factory import build_strategy_from_config

    strategy = build_strategy_from_config(diffusion)
    total = strategy.num_timesteps
    centres = (torch.arange(strategy.bins) * total + total // 2) // strategy.bins  # [bins] one step per bin
    tenth_of_bin = (centres * TENTHS) // total  # [bins]
    records = [r for r in history if all(f"loss_t{b}" in r for b in range(TENTHS))]
    if not records:
        raise ValueError("no log record holds loss_t0..loss_t9: replay a DDPM run's folder")
    out, previous, previous_step = [], None, 0
    for record in records:
        current = torch.tensor([float(record[f"loss_t{b}"]) for b in range(TENTHS)], dtype=torch.float64)
        steps = max(1, int(record["step"]) - previous_step)
        for k in range(steps):
            losses = current if previous is None else previous + (current - previous) * (k + 1) / steps
            strategy.update(centres, losses[tenth_of_bin])
        previous, previous_step = current, int(record["step"])
        if not at or previous_step in at:
            mass = strategy.pmf.double().reshape(TENTHS, total // TENTHS).sum(dim=1)
            out.append({"step": previous_step, "loss_by_tenth": current.tolist(), "mass_by_tenth": mass.tolist()})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--at", default="", help="comma-separated logged steps to report (default: every one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("overrides", nargs="*", help="diffusion.timesteps.progress.* overrides, e.g. ...floor=0.5")
    args = parser.parse_intermixed_args(argv)
    from speed.train.run_layout import RunLayout

    if not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir} is not a run folder (no config.yaml)", file=sys.stderr)
        return 2
    from speed.config import load_config

    # The run's own noise schedule, with its timesteps replaced by the progress strategy.
    cfg = load_config(str(args.run_dir / "config.yaml"), ["diffusion.timesteps.name=progress", *args.overrides])
    if cfg.diffusion.objective != "ddpm":
        print(f"error: {args.run_dir} trained with diffusion.objective={cfg.diffusion.objective}; its loss_t* "
              "tenths are not DDPM steps: replay a DDPM run", file=sys.stderr)
        return 2
    history = RunLayout(str(args.run_dir)).read_metrics()
    try:
        rows = replay(history, cfg.diffusion, [int(s) for s in args.at.split(",") if s])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| step | " + " | ".join(f"t {b * 100}-{b * 100 + 99}" for b in range(TENTHS)) + " |")
    print("| --- " * (TENTHS + 1) + "|")
    for row in rows:
        print(f"| {row['step']} loss | " + " | ".join(f"{v:.3g}" for v in row["loss_by_tenth"]) + " |")
        print(f"| {row['step']} progress mass | " + " | ".join(f"{v:.3f}" for v in row["mass_by_tenth"]) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
