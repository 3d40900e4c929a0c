"""What every job shares: the command line, connecting to Ray, and the final JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from speed.config import Config, ConfigError, load_config
from speed.storage import StorageError, redact
from speed.train.checkpoint import CheckpointError

log = logging.getLogger("speed")

PHASES = ("train", "inference", "sample", "evaluate", "tune", "prepare")


def parse_args(phase: str, argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None):
    parser = argparse.ArgumentParser(
        prog=f"python -m ray_jobs.{phase}",
        description=f"speed {phase} job. Overrides are dotted config keys, e.g. train.steps=100.",
    )
    parser.add_argument("-c", "--config", default=default_config, help="config YAML (default: the embedded digits config)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def load_job_config(phase: str, argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None) -> Config:
    args = parse_args(phase, argv, default_config)
    return load_config(args.config, args.overrides, phase=phase)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SPEED_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def init_ray(cfg: Config, runtime_env: Optional[Dict[str, Any]] = None):
    """Connect to the cluster named by ray.address / RAY_ADDRESS (ray job submit sets it), else start
    a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already carries its runtime env (cluster/runtime_env.yaml sets the
        # thread policy); adding ours would conflict with it.
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}, **(runtime_env or {})}
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env=env,
        )
    return ray


def emit(event: str, **fields: Any) -> Dict[str, Any]:
    """Print the job's one machine-readable result line on stdout."""
    record = {"event": event, **fields}
    print(json.dumps(record, default=str), flush=True)
    return record


def run_main(phase: str, main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a job's main with friendly errors: config and storage problems print one clear line."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (ConfigError, StorageError, CheckpointError, FileNotFoundError, ValueError) as exc:
        message = redact(str(exc))
        print(f"error: {message}", file=sys.stderr, flush=True)
        emit(f"{phase}_failed", error=message)
        return 2
    return 0
