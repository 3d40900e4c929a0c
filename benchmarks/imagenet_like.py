"""ImageNet-like benchmark data, written to any URI (local folder or s3:// through speed.storage).

    python -m benchmarks.imagenet_like --out s3://bench/imagenet-like --images 2000 --classes 100 \
        [--formats imagefolder,parquet,webdataset] [--shards 8] [--seed 0]
    python -m benchmarks.imagenet_like --out s3://bench/listing-10k --images 10000 --tiny

Benchmarks only: nothing here is written to a user's bucket unless asked. The pictures are random
crops, rescales and mirrors of scikit-learn's two bundled photos (no download), with a light grain
so that JPEG sizes behave like photographs, saved at quality 88-92 (mean near 90). Sizes follow
ImageNet's train set roughly: 80% have a long side of 300-500 px (half of them exactly 500), 15% of 500-1000, 5% of
1000-1600; aspect ratios 4:3, 3:2, 1:1, 16:9 in either orientation; 1% are greyscale. The mean
file is about 110 KB, as in ImageNet. Layouts (each under ``<out>/<format>``):

* imagefolder: ``<wnid>/<wnid>_<index>.JPEG`` (wnid ``n%08d``) plus ``class_index.json``;
* parquet: the Hugging Face ImageNet-1k layout, ``data/train-00000-of-00008.parquet`` with an
  ``image`` struct {bytes, path} and an int64 ``label``;
* webdataset: ``train-000000.tar`` ... with ``<key>.jpg``, ``<key>.cls`` and ``<key>.json``
  ({"label": int, "wnid": str}) per sample.

``--tiny`` writes tiny 8x8 JPEGs (about 300 bytes) as an imagefolder (for listing and catalog timing:
the number of objects matters there, not their size). Prints one JSON line with what was written.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Tuple

import numpy as np

from speed import storage
from speed.data.webdataset import sample_members, tar_bytes

WRITE_THREADS = 32
GRAIN = 14.0  # grey levels of Gaussian grain: brings JPEG sizes to ImageNet's
ASPECTS = (4 / 3, 3 / 2, 1.0, 16 / 9)


def wnid(label: int) -> str:
    return f"n{label:08d}"


def _sources() -> List[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(image) for image in load_sample_images().images]  # two 427x640 RGB photos


def _size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) with ImageNet's spread of sizes and aspect ratios."""
    bucket = rng.random()
    if bucket < 0.40:
        long_side = 500  # Flickr's "medium" size: the commonest in ImageNet
    elif bucket < 0.80:
        long_side = rng.integers(300, 500)
    elif bucket < 0.95:
        long_side = rng.integers(501, 1001)
    else:
        long_side = rng.integers(1001, 1601)
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    short_side = max(64, int(round(long_side / aspect)))
    return (int(long_side), short_side) if rng.random() < 0.7 else (short_side, int(long_side))


def make_jpeg(rng: np.random.Generator, sources: List[np.ndarray]) -> bytes:
    """One ImageNet-like JPEG."""
    from PIL import Image

    width, height = _size(rng)
    photo = sources[rng.integers(len(sources))]
    # A crop at about the photo's own scale (its detail is what makes JPEG sizes realistic),
    # upscaled only for the few targets larger than the photo.
    scale = max(rng.uniform(0.8, 1.25), width / photo.shape[1], height / photo.shape[0])
    crop_w, crop_h = min(photo.shape[1], int(width / scale)), min(photo.shape[0], int(height / scale))
    top = rng.integers(0, photo.shape[0] - crop_h + 1)
    left = rng.integers(0, photo.shape[1] - crop_w + 1)
    crop = photo[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.7, 1.2) + rng.normal(0.0, GRAIN, size=pixels.shape)  # exposure and grain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.01:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(88, 93)))
    return buffer.getvalue()


def samples(count: int, classes: int, seed: int = 0) -> Iterator[Tuple[int, int, bytes]]:
    """(index, label, JPEG bytes) for ``count`` images spread evenly over ``classes`` labels."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    for index in range(count):
        yield index, index % classes, make_jpeg(rng, sources)


def _parallel_write(items, storage_cfg=None) -> None:
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for _ in pool.map(lambda item: storage.write_bytes(item[0], item[1], storage_cfg), items):
            pass


def write_imagefolder(out: str, data: List[Tuple[int, int, bytes]], classes: int) -> None:
    _parallel_write((storage.join(out, wnid(label), f"{wnid(label)}_{index:08d}.JPEG"), blob)
                    for index, label, blob in data)
    storage.write_text(storage.join(out, "class_index.json"), json.dumps({wnid(c): c for c in range(classes)}))


def write_parquet(out: str, data: List[Tuple[int, int, bytes]], shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def shard_bytes(shard: int, rows: np.ndarray) -> Tuple[str, bytes]:
        image = pa.StructArray.from_arrays(
            [pa.array([data[i][2] for i in rows], pa.binary()),
             pa.array([f"{wnid(data[i][1])}_{data[i][0]:08d}.JPEG" for i in rows], pa.string())],
            names=["bytes", "path"])
        table = pa.table({"image": image, "label": pa.array([data[i][1] for i in rows], pa.int64())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=256)  # HF's shards use small row groups too
        return storage.join(out, "data", f"train-{shard:05d}-of-{shards:05d}.parquet"), buffer.getvalue()

    groups = np.array_split(np.arange(len(data)), shards)
    _parallel_write(shard_bytes(shard, rows) for shard, rows in enumerate(groups) if rows.size)


def write_webdataset(out: str, data: List[Tuple[int, int, bytes]], shards: int) -> None:
    def shard_bytes(shard: int, rows: np.ndarray) -> Tuple[str, bytes]:
        members = []
        for i in rows:
            index, label, blob = data[i]
            members += sample_members(f"{wnid(label)}_{index:08d}", blob, label, "jpg", {"wnid": wnid(label)})
        return storage.join(out, f"train-{shard:06d}.tar"), tar_bytes(members)

    groups = np.array_split(np.arange(len(data)), shards)
    _parallel_write(shard_bytes(shard, rows) for shard, rows in enumerate(groups) if rows.size)


def write_tiny(out: str, count: int, classes: int) -> None:
    """``count`` copies of one 8x8 JPEG (about 300 bytes): listing and catalog cost depend on the
    number of objects, and the pipeline can still decode them for a time to the first batch."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="JPEG", quality=90)
    blob = buffer.getvalue()
    _parallel_write((storage.join(out, wnid(i % classes), f"{wnid(i % classes)}_{i:08d}.JPEG"), blob)
                    for i in range(count))


def generate(out: str, *, images: int, classes: int, formats: List[str], shards: int, seed: int = 0,
             tiny: bool = False) -> dict:
    started = time.perf_counter()
    if tiny:
        write_tiny(out, images, classes)
        return {"uri": out, "images": images, "classes": classes, "tiny": True,
                "write_s": round(time.perf_counter() - started, 1)}
    data = list(samples(images, classes, seed))
    sizes = np.array([len(blob) for _, _, blob in data])
    writers = {"imagefolder": lambda uri: write_imagefolder(uri, data, classes),
               "parquet": lambda uri: write_parquet(uri, data, shards),
               "webdataset": lambda uri: write_webdataset(uri, data, shards)}
    for name in formats:
        if name not in writers:
            raise SystemExit(f"--formats: unknown format {name!r}; choose from {', '.join(writers)}")
        writers[name](storage.join(out, name))
    return {"uri": out, "images": images, "classes": classes, "formats": formats, "shards": shards,
            "mean_kb": round(float(sizes.mean()) / 1024, 1), "median_kb": round(float(np.median(sizes)) / 1024, 1),
            "write_s": round(time.perf_counter() - started, 1)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100, help="at most 1000")
    parser.add_argument("--formats", default="imagefolder,parquet,webdataset")
    parser.add_argument("--shards", type=int, default=8, help="Parquet / tar shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny 8x8 JPEGs (listing and catalog benchmarks)")
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= 1000:
        parser.error("--classes must be between 1 and 1000")
    result = generate(args.out, images=args.images, classes=args.classes, formats=args.formats.split(","),
                      shards=args.shards, seed=args.seed, tiny=args.tiny)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
