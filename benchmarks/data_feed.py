"""Does the data keep up? Images per CPU per format, time to the first batch, and the CPUs per GPU.

    python -m benchmarks.data_feed [--images 1000] [--classes 100] [--resolution 256] [--cpus 2]
        [--gpu-rate 557] [--catalog-objects 10000,100000] [--out benchmarks/results/data_feed]

Starts moto's S3 server on 127.0.0.1 (unless ``--use-env``: the endpoint in the AWS_* variables),
writes ImageNet-like JPEGs with ``benchmarks.imagenet_like`` (300-500 px on the long side for
most, about 110 KB, quality near 90) as an imagefolder, as Hugging Face-layout Parquet and as
WebDataset tar shards, then measures for each format:

* **decode + crop per CPU**: images per CPU-second of the record-level work alone (reading the
  container, decoding, ADM's centre crop to ``--resolution``, scaling to [-1, 1]), in this process,
  with ``data.decode`` fast and exact; latents: choosing the orientation of stored posteriors;
* **through Ray Data**: ``ray_jobs.data.build_train_dataset`` -> ``iter_torch_batches`` the way a
  Train worker reads it: the time to the first batch (catalog, Ray Data start-up and first
  reads) and the steady feed rate of a second epoch, in wall time and in CPU-seconds consumed by
  this driver and its Ray processes (not the S3 server): images per CPU-second, the figure that
  stays meaningful on a small or busy machine;
* **catalog**: the time to the first batch of an imagefolder of ``--catalog-objects`` tiny JPEGs,
  with the catalog built (a listing of every object) and then reused (one listing of the class
  folders). moto is slow at listing and writing many objects; real S3 lists ~1,000 objects per
  request.

Then prints the sizing rule, CPUs per GPU = ceil(1.2 x trainer rate / images per CPU-second
through Ray Data) per format (20% headroom keeps the data wait under 5%), for ``--gpu-rate``
(default 557 img/s: DiT-XL/2 on one H200 in benchmarks/results/gpu_check.json), and writes
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from speed.testing import start_moto_server, stop_server  # noqa: E402

GPU_CHECK_RATE = 557.0  # img/s, DiT-XL/2 256px bf16 on one H200 (benchmarks/results/gpu_check.json)
HEADROOM = 1.2
FORMATS = ("imagefolder", "parquet", "webdataset")


def _start_moto():
    proc, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    return proc


def _ray_cpu_seconds() -> Dict[int, float]:
    """{pid: CPU seconds so far} of this process and its descendants (its local Ray), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, used = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: seconds for pid, seconds in used.items() if ours(pid)}


_EXCLUDED = set()


def _cpu_spent(before, after) -> float:
    return sum(s - before.get(pid, 0.0) for pid, s in after.items() if pid not in _EXCLUDED)


def _cfg(fmt: str, uri: str, args, *extra):
    from speed.config import load_config

    return load_config("configs/digits/speed.yaml", [
        f"data.format={fmt}", f"data.uri={uri}", f"data.resolution={args.resolution}", "data.channels=3",
        f"data.read_cpus={args.read_cpus}", "data.shuffle_buffer=256", f"model.num_classes={args.classes}",
        "sample.classes=[0,1]", *extra])


# --- record-level work, one process --------------------------------------------------------------


def decode_rates(root: str, args) -> Dict[str, Dict[str, float]]:
    """Images per CPU-second of each format's record-level work, fast and exact decode."""
    import pyarrow.parquet as pq

    from speed import storage
    from speed.data import records
    from speed.data.catalog import scan_dataset
    from speed.data.webdataset import iter_samples

    out: Dict[str, Dict[str, float]] = {}
    for fmt in FORMATS:
        cfg = _cfg(fmt, storage.join(root, fmt), args)
        catalog = scan_dataset(cfg.data, cfg.storage)
        fs, _ = storage.filesystem(catalog.uri, cfg.storage)
        # The container's bytes are fetched first: the object store's time is not the CPU's.
        raw = [storage.read_bytes(catalog.file_uri(f), cfg.storage) for f in catalog.files]
        out[fmt] = {}
        for decode in ("exact", "fast", "exact", "fast"):  # the first pass warms up; the last of each counts
            spec = records.decode_spec(cfg.data.__class__(**{**cfg.data.__dict__, "decode": decode}), catalog,
                                       num_classes=args.classes, seed=0, epoch=0)
            started, count = time.process_time(), 0
            if fmt == "imagefolder":
                for i in range(0, len(raw), 32):
                    rows, _ = records.imagefolder_records(catalog.files[i : i + 32], raw[i : i + 32], spec)
                    count += len(rows["label"])
            elif fmt == "parquet":
                import pyarrow as pa

                for relative, blob in zip(catalog.files, raw):
                    table = pq.read_table(io.BytesIO(blob))
                    table = table.append_column("path", pa.array([catalog.file_path(relative)] * len(table)))
                    for start in range(0, len(table), 32):
                        rows, _ = records.parquet_records(table.slice(start, 32), spec)
                        count += len(rows["label"])
            else:
                for relative, blob in zip(catalog.files, raw):
                    samples = list(iter_samples(io.BytesIO(blob)))
                    for start in range(0, len(samples), 32):
                        chunk = samples[start : start + 32]
                        batch = {name: [s.get(name) for s in chunk] for name in ("jpg", "cls", "json")}
                        batch.update(__key__=[s["__key__"] for s in chunk], __url__=[catalog.file_path(relative)] * len(chunk))
                        rows, _ = records.webdataset_records(batch, spec)
                        count += len(rows["label"])
            out[fmt][decode] = round(count / (time.process_time() - started), 1)
        print(f"decode + crop, {fmt}: {out[fmt]['fast']:.1f} img/CPU-s fast, {out[fmt]['exact']:.1f} exact",
              file=sys.stderr, flush=True)
    out["latents"] = {"fast": _latent_rate(), "exact": None}
    print(f"latents (orientation of stored posteriors): {out['latents']['fast']:.0f} rows/CPU-s", file=sys.stderr)
    return out


def _latent_rate(rows: int = 4096) -> float:
    from speed.data.batches import decode_latent_batch

    rng = np.random.default_rng(0)
    blob = rng.standard_normal((2, 4, 32, 32)).astype(np.float16).tobytes()
    keys = [f"n{i % 1000:08d}/{i}.JPEG" for i in range(rows)]
    started = time.process_time()
    for start in range(0, rows, 256):
        decode_latent_batch(keys[start : start + 256], np.zeros(256, np.int64), [blob] * 256, [blob] * 256,
                            latent_shape=[4, 32, 32], random_flip=True, seed=0, epoch=0)
    return round(rows / (time.process_time() - started), 1)


# --- through Ray Data ----------------------------------------------------------------------------


def feed(cfg, batch_size: int) -> Dict[str, float]:
    """Time to the first batch (catalog + start-up) and the steady rate of the next epoch."""
    from ray_jobs.data import build_train_dataset, preflight_data

    started = time.perf_counter()
    preflight_data(cfg)
    result: Dict[str, float] = {}
    for epoch in range(2):
        began, cpu_began, seen, first = time.perf_counter(), _ray_cpu_seconds(), 0, None
        dataset = build_train_dataset(cfg, seed=0, epoch=epoch)
        for batch in dataset.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=cfg.data.shuffle_buffer,
                                                prefetch_batches=cfg.data.prefetch_batches):
            if first is None:
                first = time.perf_counter()
                if epoch == 0:
                    result["first_batch_s"] = round(first - started, 2)
            seen += len(batch["label"])
        wall, cpu = time.perf_counter() - began, _cpu_spent(cpu_began, _ray_cpu_seconds())
    result.update(images=seen, images_per_s=round(seen / wall, 1), images_per_cpu_s=round(seen / cpu, 1))
    return result


def catalog_first_batch(counts: List[int], args) -> List[Dict[str, Any]]:
    """Time to the first batch of an imagefolder of ``count`` tiny JPEGs: catalog built, then reused.

    moto's server takes ~70 PUTs/s, so the objects are put straight into the backend of an
    in-process moto server (``ThreadedMotoServer``); the listing, the catalog and the reads still
    go through HTTP, as from S3."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer
    from PIL import Image

    from ray_jobs.data import _catalogs, build_train_dataset, preflight_data
    from speed.testing import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="JPEG", quality=90)
    blob = buffer.getvalue()
    out = []
    try:
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        backend.create_bucket("catalog-bench", "us-east-1")
        for count in counts:
            classes = min(1000, max(1, count // 100))
            for i in range(count):
                backend.put_object("catalog-bench", f"listing-{count}/n{i % classes:08d}/n{i % classes:08d}_{i:08d}.JPEG",
                                   blob)
            row: Dict[str, Any] = {"objects": count, "classes": classes}
            for label in ("built", "reused"):
                _catalogs.clear()  # a fresh driver: nothing cached in memory
                cfg = _cfg("imagefolder", f"s3://catalog-bench/listing-{count}", args, "data.resolution=8",
                           "model.num_classes=1000", f"storage.endpoint_url={endpoint}")
                started = time.perf_counter()
                summary = preflight_data(cfg)
                catalog_s = time.perf_counter() - started
                batch = next(iter(build_train_dataset(cfg, seed=0).iter_torch_batches(batch_size=64)))
                assert len(batch["label"]) == 64
                row[f"{label}_catalog"] = summary["catalog"]
                row[f"{label}_catalog_s"] = round(catalog_s, 2)
                row[f"{label}_first_batch_s"] = round(time.perf_counter() - started, 2)
            print(f"catalog, {count} objects: first batch {row['built_first_batch_s']} s with the catalog built "
                  f"({row['built_catalog_s']} s to list and write it), {row['reused_first_batch_s']} s reused "
                  f"({row['reused_catalog_s']} s)", file=sys.stderr, flush=True)
            out.append(row)
    finally:
        server.stop()
    return out


# --- the report ----------------------------------------------------------------------------------


def sizing(per_cpu: Dict[str, float], rate: float) -> Dict[str, Dict[str, float]]:
    return {fmt: {"images_per_cpu_s": value, "cpus_per_gpu": math.ceil(HEADROOM * rate / value),
                  "cpus_per_8_gpu_node": math.ceil(8 * HEADROOM * rate / value)}
            for fmt, value in per_cpu.items() if value}


def markdown(result: Dict[str, Any]) -> str:
    a = result["settings"]
    if a["catalog_only"]:
        return "\n".join(["# Time to the first batch against the number of objects", "",
                          f"Measured on {result['machine']}, a 2-core machine shared with other jobs.",
                          *_catalog_lines(result), "", f"Command: `{result['command']}`", ""])
    lines = [
        "# Data feed: images per CPU, time to the first batch, CPUs per GPU",
        "",
        f"Measured on {result['machine']} from the moto S3 test server on the same machine "
        f"({a['images']} ImageNet-like JPEGs, mean {result['data']['mean_kb']} KB, {a['classes']} classes, "
        f"{a['resolution']} px ADM crops, `--cpus {a['cpus']}` for the local Ray, data.read_cpus={a['read_cpus']}). "
        "A 2-core machine shared with other jobs: the per-CPU-second figures are the ones to carry to a cluster.",
        "",
        "| format | decode+crop, fast (img/CPU-s) | exact (img/CPU-s) | through Ray Data (img/CPU-s) | "
        "steady feed (img/s) | first batch (s) |",
        "|---|---|---|---|---|---|",
    ]
    for fmt in FORMATS:
        d, f = result["decode"][fmt], result["feed"].get(fmt, {})
        lines.append(f"| {fmt} | {d['fast']} | {d['exact']} | {f.get('images_per_cpu_s', '-')} | "
                     f"{f.get('images_per_s', '-')} | {f.get('first_batch_s', '-')} |")
    lines.append(f"| latents | {result['decode']['latents']['fast']} (rows) | - | - | - | - |")
    lines += ["", "Fast decode (JPEG draft mode) over exact: "
              + ", ".join(f"{fmt} x{result['decode'][fmt]['fast'] / result['decode'][fmt]['exact']:.2f}" for fmt in FORMATS),
              "", f"## Sizing: CPUs per GPU at {result['gpu_rate']} img/s per GPU (x{HEADROOM} headroom)", "",
              "| format | img/CPU-s through Ray Data | CPUs per GPU | CPUs per 8-GPU node |", "|---|---|---|---|"]
    for fmt, row in result["sizing"].items():
        lines.append(f"| {fmt} | {row['images_per_cpu_s']} | {row['cpus_per_gpu']} | {row['cpus_per_8_gpu_node']} |")
    lines += _catalog_lines(result)
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _catalog_lines(result: Dict[str, Any]) -> List[str]:
    if not result.get("catalog"):
        return []
    lines = ["", "## Time to the first batch against the number of objects (imagefolder, tiny JPEGs, moto)", "",
             "| objects | class folders | catalog built: list + write (s) | first batch (s) | catalog reused (s) | "
             "first batch (s) |", "|---|---|---|---|---|---|"]
    for row in result["catalog"]:
        lines.append(f"| {row['objects']} | {row['classes']} | {row['built_catalog_s']} | {row['built_first_batch_s']} | "
                     f"{row['reused_catalog_s']} | {row['reused_first_batch_s']} |")
    return lines + ["", "moto (one Python process) lists and serves objects far slower than S3, which returns 1,000 "
                    "keys per request; the reused catalog needs one delimited listing of the class folders and one "
                    "read of the catalog instead of a listing of every object."]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray")
    parser.add_argument("--read-cpus", type=float, default=1.0, help="data.read_cpus")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-rate", type=float, default=GPU_CHECK_RATE, help="trainer img/s per GPU")
    parser.add_argument("--catalog-objects", default="", help="comma-separated object counts, e.g. 10000,100000")
    parser.add_argument("--formats", default=",".join(FORMATS), help="formats to stream through Ray Data")
    parser.add_argument("--catalog-only", action="store_true", help="only the --catalog-objects measurement")
    parser.add_argument("--out", default="benchmarks/results/data_feed")
    parser.add_argument("--use-env", action="store_true", help="use the S3 endpoint in the AWS_* variables")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    moto = None if args.use_env else _start_moto()
    if moto is not None:
        _EXCLUDED.add(moto.pid)
    try:
        import boto3
        import ray

        from benchmarks.imagenet_like import generate

        data, decode = {}, {}
        if not args.catalog_only:
            bucket = f"data-feed-{int(time.time())}"
            boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL")).create_bucket(Bucket=bucket)
            root = f"s3://{bucket}/imagenet-like"
            data = generate(root, images=args.images, classes=args.classes, formats=list(FORMATS), shards=args.shards)
            print(f"wrote {json.dumps(data)}", file=sys.stderr, flush=True)
            decode = decode_rates(root, args)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        fed = {}
        for fmt in [] if args.catalog_only else [f for f in args.formats.split(",") if f]:
            fed[fmt] = feed(_cfg(fmt, f"{root}/{fmt}", args), args.batch_size)
            print(f"Ray Data, {fmt}: first batch {fed[fmt]['first_batch_s']} s; {fed[fmt]['images_per_s']} img/s, "
                  f"{fed[fmt]['images_per_cpu_s']} img/CPU-s", file=sys.stderr, flush=True)
        catalog = catalog_first_batch([int(c) for c in args.catalog_objects.split(",") if c], args)
        ray.shutdown()
    finally:
        if moto is not None:
            stop_server(moto)
    per_cpu = {fmt: row["images_per_cpu_s"] for fmt, row in fed.items()}
    if decode.get("latents", {}).get("fast"):
        per_cpu["latents"] = decode["latents"]["fast"]  # no image decode: CPUs are not what limits latents
    result = {
        "event": "data_feed", "machine": f"{os.cpu_count()}-core {platform.machine()} ({platform.system()})",
        "settings": vars(args), "data": data, "decode": decode, "feed": fed, "catalog": catalog,
        "gpu_rate": args.gpu_rate, "sizing": sizing(per_cpu, args.gpu_rate),
        "command": "python -m benchmarks.data_feed " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"sizing at {args.gpu_rate:g} img/s per GPU:", file=sys.stderr)
    for fmt, row in result["sizing"].items():
        print(f"  {fmt}: {row['cpus_per_gpu']} CPUs per GPU ({row['cpus_per_8_gpu_node']} per 8-GPU node)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("event", "decode", "feed", "sizing", "catalog")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
