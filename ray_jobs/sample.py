"""A grid of samples: python -m ray_jobs.sample -c CONFIG [key=value ...] (phase sample).

One row per class in sample.classes, sample.per_class columns; column j of every row starts from
the same noise (index j with sample.seed), so rows differ only by class. Guidance and sampler come
from sampling.* (e.g. sampling.guidance_scale=1.5). Sampling runs in one Ray task that asks for
inference.num_gpus_per_actor GPUs, so a GPU node of the cluster does the work.

The weights: sample.checkpoint_uri (else inference.checkpoint_uri) names an export folder, a
.safetensors file, a training checkpoint folder or a run folder (its export, or its newest
complete checkpoint while there is no export yet): every path python -m ray_jobs.train prints.
Unset, it is the export of the configured run (run.output_uri/run.name/export), so
python -m ray_jobs.sample right after python -m ray_jobs.train needs no keys.
Ends with {"event": "sample_grid_done", "png": URI, ...} on stdout.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from speed import storage
from speed.config.schema import Config
from speed.train.run_layout import SAMPLES_DIR, RunLayout

from ray_jobs.common import emit, init_ray, load_job_config, run_main

log = logging.getLogger("speed.sample")


def grid_labels_and_indices(classes: Sequence[int], per_class: int):
    labels = [int(c) for c in classes for _ in range(per_class)]
    indices = [j for _ in classes for j in range(per_class)]
    return labels, indices


def default_png_uri(cfg: Config) -> str:
    sampling = cfg.sampling
    name = f"grid-{sampling.sampler}{sampling.steps}-cfg{sampling.guidance_scale:g}-seed{cfg.sample.seed}.png"
    return RunLayout.for_run(cfg.run, cfg.storage).path(SAMPLES_DIR, name)


def render_grid(cfg: Config, checkpoint_uri: str, png_uri: str, key: str = "sample.checkpoint_uri") -> Dict[str, Any]:
    """Load the model, sample the grid, write the PNG (runs inside the Ray task)."""
    import torch

    from speed.sample import generate, load_sampling_model, make_grid_png
    from speed.sample.worker import load_vae_for, sampling_device

    torch.set_num_threads(max(1, int(cfg.inference.num_cpus_per_actor)))
    device = sampling_device(cfg.inference.num_gpus_per_actor)
    model, description = load_sampling_model(checkpoint_uri, cfg.storage, key=key, device=device)
    vae = load_vae_for(cfg, description, device)
    labels, indices = grid_labels_and_indices(cfg.sample.classes, cfg.sample.per_class)
    began = time.perf_counter()
    images = generate(model, description, cfg.sampling, labels, indices, cfg.sample.seed, device, vae)
    seconds = time.perf_counter() - began
    storage.write_bytes(png_uri, make_grid_png(images, nrow=cfg.sample.per_class), cfg.storage)
    return {"png": png_uri, "num_images": len(labels), "seconds": seconds, "device": str(device)}


def weights_key(cfg: Config) -> str:
    """The key the grid's weights come from (for error messages)."""
    return "inference.checkpoint_uri" if not cfg.sample.checkpoint_uri and cfg.inference.checkpoint_uri \
        else "sample.checkpoint_uri"


def run_sample(cfg: Config) -> Dict[str, Any]:
    from speed.sample import job_weights, read_description
    from speed.sample.generate import sampling_diffusion

    key = weights_key(cfg)
    # Resolved once, on the driver (fail fast, before Ray starts); the task loads exactly this.
    source = job_weights(cfg.sample.checkpoint_uri or cfg.inference.checkpoint_uri, cfg, key=key)
    description = read_description(source, cfg.storage, key=key)
    sampling_diffusion(description, cfg.sampling)  # a sampler of the other objective fails here, before Ray
    checkpoint_uri = source.uri
    log.info("sampling a grid of %s (step %d) from %s", description.model.get("name"), description.step, checkpoint_uri)
    png_uri = cfg.sample.output_uri or default_png_uri(cfg)
    ray = init_ray(cfg)
    task = ray.remote(num_cpus=cfg.inference.num_cpus_per_actor, num_gpus=cfg.inference.num_gpus_per_actor)(render_grid)
    result = ray.get(task.remote(cfg, checkpoint_uri, png_uri, key))
    return {**result, "weights": checkpoint_uri, "model_step": description.step, "classes": list(cfg.sample.classes),
            "per_class": cfg.sample.per_class, "seed": cfg.sample.seed, "guidance_scale": cfg.sampling.guidance_scale,
            "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps}


def _main(argv: List[str]) -> None:
    cfg = load_job_config("sample", argv)
    emit("sample_grid_done", **run_sample(cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("sample", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
