"""How many training images per second the Ray Data pipeline delivers, per CPU, from S3.

    python benchmarks/data_feed.py [--images 512] [--resolution 256] [--cpus 2] [--read-cpus 1]

Starts moto's S3 server on 127.0.0.1 (unless AWS_ENDPOINT_URL is set and --use-env is given),
writes ImageNet-like JPEGs (random 500x375 crops of scikit-learn's sample photos, quality 90,
~100 KB each) as an imagefolder dataset and as Parquet shards, then streams each through
``ray_jobs.data.build_train_dataset`` into ``iter_torch_batches`` the way a Train worker does.
The first pass warms Ray's workers up; the second is measured, both in wall time (images/s, and
per CPU given to Ray) and in CPU time actually consumed by the driver and all Ray processes
(images per CPU second, counting this process and its descendants only: the figure that stays
meaningful on a shared, busy machine). A decode-only
baseline (PIL decode + ADM crop, one process) shows the ceiling. Prints one line per measurement on
stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from speed.testing import start_moto_server  # noqa: E402


def _start_moto() -> subprocess.Popen:
    """moto's S3 server (speed.testing), with the AWS_* variables pointed at it."""
    proc, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    return proc


def _photos(count: int, seed: int = 0):
    """ImageNet-like JPEG bytes: random 500x375 crops (some mirrored) of the sklearn sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = load_sample_images().images  # two 427x640 photos
    for i in range(count):
        photo = sources[i % len(sources)]
        top, left = rng.integers(0, photo.shape[0] - 375), rng.integers(0, photo.shape[1] - 500)
        crop = photo[top : top + 375, left : left + 500]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buffer, format="JPEG", quality=90)
        yield i % 10, buffer.getvalue()


def _write_datasets(bucket_uri: str, count: int, shards: int):
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    from speed import storage

    photos = list(_photos(count))
    _write_datasets.jpegs = [data for _, data in photos]
    folder = f"{bucket_uri}/imagefolder"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: storage.write_bytes(f"{folder}/n{item[1][0]:08d}/img_{item[0]:06d}.JPEG", item[1][1]),
                      enumerate(photos)))
    table_uri = f"{bucket_uri}/parquet"
    for shard, rows in enumerate(np.array_split(np.arange(count), shards)):
        image = pa.StructArray.from_arrays(
            [pa.array([photos[i][1] for i in rows], pa.binary()), pa.array([f"img_{i:06d}.JPEG" for i in rows])],
            names=["bytes", "path"])
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": image, "label": pa.array([photos[i][0] for i in rows], pa.int64())}), buffer)
        storage.write_bytes(f"{table_uri}/part-{shard:05d}.parquet", buffer.getvalue())
    mean_kb = sum(len(p[1]) for p in photos) / count / 1024
    return folder, table_uri, mean_kb


def _ray_cpu_seconds() -> dict:
    """{pid: CPU seconds used so far} for this driver and its descendants (its local Ray: GCS,
    raylet, workers), read from /proc (Linux). Unlike wall time, CPU time does not depend on what
    else runs on the machine, and other people's Ray processes are not counted."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, used = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: seconds for pid, seconds in used.items() if ours(pid)}


_EXCLUDED_PIDS = set()  # the S3 test server: the object store's cost, not the pipeline's


def _cpu_spent(before: dict, after: dict) -> float:
    # Processes started in between count in full; ones that ended are missed (workers persist).
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items() if pid not in _EXCLUDED_PIDS)


def _feed_rate(cfg, batch_size: int):
    """(images per wall second, images per CPU second) of the second epoch."""
    from ray_jobs.data import build_train_dataset

    for epoch in range(2):  # epoch 0 warms up Ray's workers; epoch 1 is measured
        dataset = build_train_dataset(cfg, seed=0, epoch=epoch)
        started, cpu_started, seen = time.perf_counter(), _ray_cpu_seconds(), 0
        for batch in dataset.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=cfg.data.shuffle_buffer,
                                                prefetch_batches=cfg.data.prefetch_batches):
            seen += len(batch["label"])
        wall, cpu = time.perf_counter() - started, _cpu_spent(cpu_started, _ray_cpu_seconds())
    return seen / wall, seen / cpu


def _decode_rate(jpegs, resolution: int) -> float:
    """Images per CPU second of decode + ADM crop + scaling alone, in this process."""
    from speed.data.transforms import load_and_crop, to_model_array

    started = time.process_time()
    for data in jpegs:
        to_model_array(load_and_crop(data, resolution, 3)[None])
    return len(jpegs) / (time.process_time() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray")
    parser.add_argument("--read-cpus", type=float, default=1.0, help="data.read_cpus: CPUs per decode task")
    parser.add_argument("--shards", type=int, default=8, help="Parquet shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--use-env", action="store_true", help="use the S3 endpoint in the AWS_* variables")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    moto = None if args.use_env else _start_moto()
    if moto is not None:
        _EXCLUDED_PIDS.add(moto.pid)
    try:
        import boto3
        import ray

        from speed.config import load_config

        bucket = f"data-feed-{int(time.time())}"
        boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL")).create_bucket(Bucket=bucket)
        folder, table_uri, mean_kb = _write_datasets(f"s3://{bucket}", args.images, args.shards)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        decode = _decode_rate(_write_datasets.jpegs, args.resolution)
        print(f"decode + crop alone: {decode:.1f} images per CPU second", file=sys.stderr, flush=True)
        results = {"images": args.images, "resolution": args.resolution, "cpus": args.cpus, "read_cpus": args.read_cpus,
                   "jpeg_kb": round(mean_kb, 1), "decode_only_images_per_cpu_s": round(decode, 1)}
        for fmt, uri in (("imagefolder", folder), ("parquet", table_uri)):
            cfg = load_config("configs/digits/speed.yaml", [
                f"data.format={fmt}", f"data.uri={uri}", f"data.resolution={args.resolution}", "data.channels=3",
                f"data.read_cpus={args.read_cpus}", "data.shuffle_buffer=256"])
            rate, per_cpu_second = _feed_rate(cfg, args.batch_size)
            results[f"{fmt}_images_per_s"] = round(rate, 1)
            results[f"{fmt}_images_per_s_per_cpu"] = round(rate / args.cpus, 1)
            results[f"{fmt}_images_per_cpu_s"] = round(per_cpu_second, 1)
            print(f"{fmt}: {rate:.1f} images/s with {args.cpus} CPUs = {rate / args.cpus:.1f} images/s per CPU; "
                  f"{per_cpu_second:.1f} images per CPU second consumed ({args.resolution}px crops of ~{mean_kb:.0f} KB "
                  "JPEGs)", file=sys.stderr, flush=True)
        print(json.dumps({"event": "data_feed", **results}), flush=True)
        ray.shutdown()
    finally:
        if moto is not None:
            moto.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
