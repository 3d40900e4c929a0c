"""Move a model between this trainer and diffusers:

    python -m ray_jobs.export_diffusers SRC DST [--vae VAE_URI]

SRC is anything this project prints or writes for weights (an export folder, its .safetensors, a
training checkpoint_<step> folder, a run folder): DST receives a diffusers DiTTransformer2DModel
folder (save_pretrained, safetensors; with the matching DDPMScheduler config and a model card), or,
with --vae (a local folder or s3:// prefix of a diffusers AutoencoderKL; nothing is downloaded), a
whole DiTPipeline folder for DiTPipeline.from_pretrained. A flow model exports its transformer only.

SRC may also be a diffusers folder (DiTTransformer2DModel or DiTPipeline): then DST becomes an
export here (ema.safetensors + model.json), usable as sample.checkpoint_uri or train.init_from.

Local paths or s3:// URIs (S3 settings from the AWS_* environment variables). Needs no Ray. Ends
with {"event": "export_diffusers_done", "direction": "to_diffusers" | "from_diffusers", ...}.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from speed.config.schema import StorageConfig
from speed.storage import absolute

from ray_jobs.common import JobArgumentParser, emit, run_main

PHASE = "export_diffusers"


def parse_args(argv: Sequence[str]):
    parser = JobArgumentParser(
        prog=f"python -m ray_jobs.{PHASE}",
        description="Export a model to a diffusers DiTTransformer2DModel / DiTPipeline folder, or import one.",
    )
    parser.add_argument("src", help="export folder, .safetensors, checkpoint or run folder; or a diffusers folder")
    parser.add_argument("dst", help="folder to write (local or s3://); must be new or empty")
    parser.add_argument("--vae", metavar="VAE_URI", default=None,
                        help="diffusers AutoencoderKL folder (local or s3://): write a whole DiTPipeline")
    return parser.parse_args(list(argv))


def _main(argv: List[str]) -> None:
    from speed.models.diffusers_interop import export_to_diffusers, import_from_diffusers, is_diffusers_folder

    args = parse_args(argv)
    storage_cfg = StorageConfig()
    src, dst = absolute(args.src), absolute(args.dst)
    if is_diffusers_folder(src, storage_cfg):
        if args.vae:
            raise ValueError("--vae: SRC is a diffusers folder, which is imported as an export here; "
                             "--vae applies only when exporting to diffusers")
        emit(f"{PHASE}_done", direction="from_diffusers", **import_from_diffusers(src, dst, storage_cfg=storage_cfg))
        return
    vae = absolute(args.vae) if args.vae else None
    emit(f"{PHASE}_done", direction="to_diffusers",
         **export_to_diffusers(src, dst, vae_uri=vae, storage_cfg=storage_cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(PHASE, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
