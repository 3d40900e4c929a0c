"""digits-FID and training FLOPs per image of the training accelerators, at equal steps.

    python -m benchmarks.accelerators [--out DIR] [--variants a,b] [key=value ...]

Trains the digits recipe (``configs/digits/*.yaml``: DiT-D/2, batch 64, 1000 steps, EMA
evaluated at the end on 250 samples with DDIM-50) once per variant, with one seed, in-process
with ``speed.train.loop.train`` (no Ray), and reports each run's final digits-FID, class
accuracy, ``train_flops_per_image`` (forward + backward, from the log records) and wall time:

  plain          configs/digits/baseline.yaml          DiT, uniform timesteps
  routing        configs/digits/routing.yaml           + TREAD routing (half the tokens skip blocks 1-2)
  lightning      configs/digits/lightning.yaml         LightningDiT-D/2 blocks (RMSNorm, SwiGLU, QK-norm, RoPE)
  speed          configs/digits/speed.yaml             SpeeD timesteps
  routing_speed  configs/digits/routing_speed.yaml     routing + SpeeD

Overrides apply to every variant (e.g. ``train.steps=500``). Writes ``<out>/accelerators.json``
(default out: benchmarks/results); runs live under ``<run.output_uri>/accelerators/<variant>``.
One seed and a 250-sample FID: differences of a few tenths are within run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

VARIANTS = {
    "plain": "configs/digits/baseline.yaml",
    "routing": "configs/digits/routing.yaml",
    "lightning": "configs/digits/lightning.yaml",
    "speed": "configs/digits/speed.yaml",
    "routing_speed": "configs/digits/routing_speed.yaml",
}


def run_variant(name: str, overrides: Sequence[str]) -> Dict[str, Any]:
    import torch

    from speed.config import load_config
    from speed.data.digits import load_digits
    from speed.train import loop
    from speed.train.distributed import DistEnv
    from speed.train.run_layout import RunLayout
    from speed.train.sources import IndexedSource, LocalReporter

    cfg = load_config(VARIANTS[name], ["parallel.strategy=none", *overrides])
    cfg.run.output_uri = str(Path(cfg.run.output_uri).resolve() / "accelerators")
    cfg.run.name = name
    torch.manual_seed(cfg.run.seed)
    images, labels = load_digits(cfg.data.resolution, cfg.data.channels)
    layout = RunLayout.for_run(cfg.run, cfg.storage)
    began = time.perf_counter()
    result = loop.train(cfg, DistEnv(), IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size),
                        LocalReporter(layout, keep=cfg.train.keep_checkpoints), progress=False)
    wall = time.perf_counter() - began
    final: Dict[str, Any] = {}
    for record in result.history:
        final.update(record)
    fid_key = next((k for k in ("digits_fid", "fid_digits") if k in final), None)
    return {
        "variant": name,
        "config": VARIANTS[name],
        "steps": result.steps,
        "digits_fid": final.get(fid_key) if fid_key else None,
        "class_accuracy": final.get("class_accuracy"),
        "train_flops_per_image": final.get("train_flops_per_image"),
        "final_loss": result.final_loss,
        "wall_s": round(wall, 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    names: List[str] = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        row = run_variant(name, args.overrides)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerators.json").write_text(json.dumps({"overrides": args.overrides, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
