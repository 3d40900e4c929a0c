"""Batch sampling for FID-50K: python -m ray_jobs.inference -c CONFIG [key=value ...] (phase inference).

A Ray Data job over sample indices 0..inference.num_samples-1, cut into index-aligned shards of
inference.batch_size. An ActorPoolStrategy of inference.num_actors actors (each loading the EMA
weights once) turns shards into images; sample i depends only on (inference.seed, i), so the
images are identical whatever the number of actors. Shards are written atomically and skipped on
rerun (a killed job resumes); then one ADM-format samples.npz and a preview grid are written.

inference.checkpoint_uri names an export folder, a .safetensors file, a training checkpoint folder
or a run folder (its export, or its newest complete checkpoint while there is no export yet):
every path python -m ray_jobs.train prints. Unset, it is the export of the configured run
(run.output_uri/run.name/export). The driver resolves it once and the actors load what it resolved.
Ends with {"event": "sample_done", "num_samples", "npz", "images_per_sec", ...} on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from speed import storage
from speed.config.schema import Config, ConfigError
from speed.sample import (
    PREVIEW_NAME,
    RESULT_NAME,
    ShardPlan,
    claim_output,
    guided_forward,
    job_weights,
    make_grid_png,
    pending_ranges,
    read_description,
    sampling_diffusion,
    sampling_manifest,
    write_samples_npz,
)
from speed.sample.worker import ShardSampler
from speed.train.run_layout import SAMPLES_DIR, RunLayout

from ray_jobs.common import emit, init_ray, load_job_config, progress_bar, run_main

log = logging.getLogger("speed.inference")


def default_output_uri(cfg: Config) -> str:
    sampling = cfg.sampling
    name = f"{sampling.sampler}{sampling.steps}-cfg{sampling.guidance_scale:g}-seed{cfg.inference.seed}"
    return RunLayout.for_run(cfg.run, cfg.storage).path(SAMPLES_DIR, name)


def _check_settings(cfg: Config, description) -> None:
    """Fail on the driver, before any actor starts, for settings the model cannot use."""
    sampling_diffusion(description, cfg.sampling)
    guided_forward(None, description, cfg.sampling)
    if description.is_latent and not cfg.vae.path:
        raise ConfigError(
            "vae.path is not set; this checkpoint samples SD-VAE latents, which need the VAE to decode them "
            "(a diffusers AutoencoderKL folder, e.g. a copy of stabilityai/sd-vae-ft-ema)"
        )


@contextmanager
def ray_data_progress_bars(enabled: bool) -> Iterator[None]:
    """Ray Data's per-operator bars off while ours (images, with an ETA) runs; restored after."""
    import ray

    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = enabled
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def _progress(total: int):
    """Our bar (images, with an ETA) on a terminal; a log line a minute otherwise."""
    return progress_bar(total, unit="img", desc="sampling", smoothing=0.1)


def sample_shards(cfg: Config, checkpoint_uri: str, output_uri: str, pending: List[Sequence[int]]) -> Dict[str, Any]:
    """Run the actor pool over the pending index ranges; returns counts and throughput."""
    import ray

    num_actors = max(1, min(cfg.inference.num_actors, len(pending)))
    generated = 0
    sampling_seconds = 0.0
    began = time.perf_counter()
    # A Dataset keeps the context it was created under: switch the bars off before creating it.
    with ray_data_progress_bars(False), _progress(sum(int(e) - int(s) for s, e in pending)) as progress:
        dataset = ray.data.from_items([{"start": int(s), "end": int(e)} for s, e in pending])
        dataset = dataset.map_batches(
            ShardSampler,
            fn_constructor_kwargs={"cfg": cfg, "checkpoint_uri": checkpoint_uri, "output_uri": output_uri},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=cfg.inference.num_gpus_per_actor or None,
            num_cpus=cfg.inference.num_cpus_per_actor,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for start, end, seconds, written in zip(batch["start"], batch["end"], batch["seconds"], batch["written"]):
                progress.update(int(end) - int(start))
                if written:
                    generated += int(end) - int(start)
                    sampling_seconds += float(seconds)
    wall = time.perf_counter() - began
    return {
        "generated": generated,
        "num_actors": num_actors,
        "wall_seconds": wall,
        "images_per_sec": generated / wall if wall > 0 else 0.0,
        # Time inside the sampler only: what one actor sustains once loaded.
        "images_per_sec_per_actor": generated / sampling_seconds if sampling_seconds > 0 else 0.0,
    }


def run_inference(cfg: Config) -> Dict[str, Any]:
    inference = cfg.inference
    key = "inference.checkpoint_uri"
    # Resolved once, on the driver (fail fast, before Ray starts); the actors load exactly this.
    source = job_weights(inference.checkpoint_uri, cfg, key=key)
    description = read_description(source, cfg.storage, key=key)
    checkpoint_uri = source.uri
    _check_settings(cfg, description)
    output_uri = inference.output_uri or default_output_uri(cfg)
    storage.preflight(output_uri, cfg.storage, key="inference.output_uri", must_exist=False, writable=True)
    resuming = claim_output(output_uri, sampling_manifest(cfg, description, checkpoint_uri), cfg.storage)
    plan = ShardPlan(inference.num_samples, inference.batch_size)
    pending = pending_ranges(plan, output_uri, cfg.storage)
    total_shards = len(plan.ranges())
    log.info("%s: %d of %d shards to sample into %s from %s (step %d)", "resuming" if resuming else "starting",
             len(pending), total_shards, output_uri, checkpoint_uri, description.step)
    stats: Dict[str, Any] = {"generated": 0, "num_actors": 0, "wall_seconds": 0.0, "images_per_sec": 0.0,
                             "images_per_sec_per_actor": 0.0}
    if pending:
        init_ray(cfg)
        stats = sample_shards(cfg, checkpoint_uri, output_uri, pending)
    channels = 3 if description.is_latent else description.in_channels
    image_shape = (description.resolution, description.resolution, channels)
    npz_uri, first_images = write_samples_npz(output_uri, plan, image_shape, cfg.storage)
    preview_uri = storage.join(output_uri, PREVIEW_NAME)
    nrow = max(1, min(8, len(first_images)))
    storage.write_bytes(preview_uri, make_grid_png(first_images, nrow=nrow), cfg.storage)
    record = {
        "num_samples": inference.num_samples,
        "npz": npz_uri,
        "preview": preview_uri,
        "output_uri": output_uri,
        "weights": checkpoint_uri,
        "model_step": description.step,
        "shards_sampled": len(pending),
        "shards_reused": total_shards - len(pending),
        "sampler": cfg.sampling.sampler,
        "steps": cfg.sampling.steps,
        "guidance_scale": cfg.sampling.guidance_scale,
        **stats,
    }
    storage.write_text(storage.join(output_uri, RESULT_NAME), json.dumps(record, indent=2) + "\n", cfg.storage)
    return record


def _main(argv: List[str]) -> None:
    cfg = load_job_config("inference", argv)
    emit("sample_done", **run_inference(cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("inference", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
