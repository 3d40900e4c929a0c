"""The seed's form: python -m ray_jobs -c CONFIG -p PHASE [key=value ...]."""

from __future__ import annotations

import argparse
import importlib
import sys

from ray_jobs.common import PHASES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs", description="Run a speed job by phase.")
    parser.add_argument("-p", "--phase", required=True, choices=PHASES)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(f"ray_jobs.{args.phase}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
