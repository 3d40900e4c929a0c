"""The seed's form: python -m ray_jobs -c CONFIG -p PHASE [key=value ...].

Equivalent to python -m ray_jobs.PHASE -c CONFIG [key=value ...]; a command-line mistake prints
usage on stderr and {"event": "<phase>_failed", ...} ("cli_failed" while the phase is unknown)
on stdout, and exits 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional, Sequence

from ray_jobs.common import PHASES, JobArgumentParser, UsageError, add_config_arguments, run_main


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(
        prog="python -m ray_jobs",
        description="Run a speed job by phase: the same as python -m ray_jobs.PHASE -c CONFIG [key=value ...].",
        epilog="example: python -m ray_jobs -p train train.steps=200 run.name=try1; then "
               "python -m ray_jobs -p sample run.name=try1 (samples that run's export)",
    )
    parser.add_argument("-p", "--phase", required=True, choices=PHASES, help="the job to run")
    add_config_arguments(parser)
    return parser


def known_phase(argv: Sequence[str]) -> Optional[str]:
    """The phase named on the command line when it is a valid one (for the failure event's name)."""
    probe = JobArgumentParser(add_help=False)
    probe.add_argument("-p", "--phase")
    try:
        args, _ = probe.parse_known_args(list(argv))
    except UsageError:
        return None
    return args.phase if args.phase in PHASES else None


def _dispatch(argv: List[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    forward = (["-c", args.config] if args.config else []) + list(args.overrides)
    module = importlib.import_module(f"ray_jobs.{args.phase}")
    return module.main(forward)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(known_phase(argv) or "cli", _dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
