"""Convert an official DiT checkpoint to a safetensors export:

    python -m ray_jobs.convert_dit SRC.pt DST_FOLDER --model DiT-XL/2 --image-size 256

SRC (local or s3://) is read with torch.load(weights_only=True): a file whose unpickling would
run code is refused. DST_FOLDER receives ema.safetensors + model.json, usable as
inference.checkpoint_uri; the published DiT-XL/2-256 weights then reproduce DiT's samples.
Ends with {"event": "convert_done", "weights": URI, ...} on stdout. Needs no Ray.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from speed.config.schema import StorageConfig
from speed.models.convert import DIT_NUM_CLASSES, convert_dit_checkpoint

from ray_jobs.common import emit, run_main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.convert_dit",
                                     description="Convert a facebookresearch/DiT .pt checkpoint to a safetensors export.")
    parser.add_argument("src", help="DiT checkpoint (.pt), local path or s3:// URI")
    parser.add_argument("dst", help="export folder to write (local or s3://)")
    parser.add_argument("--model", default="DiT-XL/2", help="DiT preset the weights belong to (default DiT-XL/2)")
    parser.add_argument("--image-size", type=int, default=256, help="image resolution: 256 or 512 (default 256)")
    parser.add_argument("--num-classes", type=int, default=DIT_NUM_CLASSES, help="classes (default 1000, ImageNet)")
    return parser.parse_args(list(argv))


def _main(argv: List[str]) -> None:
    args = parse_args(argv)
    weights_uri, description = convert_dit_checkpoint(
        args.src, args.dst, model_name=args.model, image_size=args.image_size, num_classes=args.num_classes,
        storage_cfg=StorageConfig(),
    )
    emit("convert_done", weights=weights_uri, model=args.model, image_size=args.image_size,
         input_size=description.input_size, in_channels=description.in_channels)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("convert_dit", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
