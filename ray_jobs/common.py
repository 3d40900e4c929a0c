"""What every job shares: the command line, connecting to Ray, and the final JSON line.

Every exit of a job (``run_main``) prints exactly one JSON line on stdout: the job's result, or
``{"event": "<phase>_failed", "error": "..."}``; a command-line mistake exits 2 (usage on stderr),
a config/storage/weights problem exits 2, anything unexpected exits 1 (traceback on stderr).
``--help`` prints help and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from speed.config import Config, ConfigError, load_config
from speed.storage import StorageError, absolute_paths, redact
from speed.train.checkpoint import CheckpointError

log = logging.getLogger("speed")

PHASES = ("train", "inference", "sample", "evaluate", "tune", "prepare")
OVERRIDES_HELP = "key=value config overrides (dotted keys, e.g. train.steps=100 run.name=my-run)"
CONFIG_HELP = "config YAML (default: the embedded digits config)"


class UsageError(ConfigError):
    """A command line argparse refused; ``usage`` is the parser's usage text."""

    def __init__(self, message: str, usage: str = "", prog: str = ""):
        super().__init__(message)
        self.usage = usage
        self.prog = prog


class JobArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``UsageError`` instead of exiting, so ``run_main`` can print
    the job's JSON line; ``--help`` still prints help and exits 0."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message, self.format_usage(), self.prog)


def add_config_arguments(parser: argparse.ArgumentParser, default_config: Optional[str] = None) -> None:
    parser.add_argument("-c", "--config", default=default_config, help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def parse_args(phase: str, argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None):
    parser = JobArgumentParser(
        prog=f"python -m ray_jobs.{phase}",
        description=f"speed {phase} job. Overrides are dotted config keys, e.g. train.steps=100.",
    )
    add_config_arguments(parser, default_config)
    # Intermixed: options may come before, between or after the overrides.
    return parser.parse_intermixed_args(argv)


def load_job_config(phase: str, argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None) -> Config:
    args = parse_args(phase, argv, default_config)
    # Relative paths are the driver's: resolve them here, once, before anything reaches a worker.
    return absolute_paths(load_config(args.config, args.overrides, phase=phase))


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SPEED_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def interactive() -> bool:
    """True when stderr is a terminal. Progress bars are drawn only then: under CI or in
    ``ray job submit`` logs the output is the log and the JSON line."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


_RAY_DATA_QUIET = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start")


def quiet_ray_data() -> None:
    """Switch off Ray Data's progress bars (and its per-execution banner) on this driver."""
    import ray.data

    context = ray.data.DataContext.get_current()
    for name in _RAY_DATA_QUIET:
        if hasattr(context, name):
            setattr(context, name, False)


def init_ray(cfg: Config, runtime_env: Optional[Dict[str, Any]] = None):
    """Connect to the cluster named by ray.address / RAY_ADDRESS (ray job submit sets it), else start
    a local Ray bound to 127.0.0.1. Without a terminal, Ray Data draws no progress bars."""
    import ray

    if ray.is_initialized():
        return ray
    quiet = not interactive()
    if quiet:
        quiet_ray_data()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already carries its runtime env (cluster/runtime_env.yaml sets the
        # thread policy); adding ours would conflict with it.
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        env = dict(runtime_env or {})
        env_vars = {"OMP_WAIT_POLICY": "PASSIVE"}
        if quiet:
            env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        env["env_vars"] = {**env_vars, **(env.get("env_vars") or {})}
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env=env,
        )
    return ray


class _LogProgress:
    """tqdm's interface for non-interactive output: one log line at most every ``interval_s``."""

    def __init__(self, total: int, unit: str, desc: str, interval_s: float):
        self.total, self.unit, self.desc, self.interval_s = total, unit, desc, interval_s
        self.n = 0
        self.began = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            rate = self.n / max(now - self.began, 1e-9)
            log.info("%s: %d/%d %s (%.1f %s/s)", self.desc, self.n, self.total, self.unit, rate, self.unit)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, *, unit: str, desc: str, mininterval: float = 2.0, interval_s: float = 60.0, **kwargs):
    """A tqdm bar on stderr when ``interactive()``, else a log line every ``interval_s`` seconds."""
    if not interactive():
        return _LogProgress(total, unit, desc, interval_s)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, mininterval=mininterval, **kwargs)


_emitted = 0


def emit(event: str, **fields: Any) -> Dict[str, Any]:
    """Print the job's one machine-readable result line on stdout."""
    global _emitted
    record = {"event": event, **fields}
    print(json.dumps(record, default=str), flush=True)
    _emitted += 1
    return record


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray's errors carry whole remote tracebacks)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_main(phase: str, main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a job's main so that every exit prints one JSON line: ``main``'s own result, or
    ``<phase>_failed`` with a one-line error. Returns the exit code: 0, or what ``main`` returned
    as an int; 2 for command-line, config, storage and weights problems; 1 for anything else (the
    traceback goes to stderr); 130 on Ctrl-C. ``--help`` returns 0 without a JSON line."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    emitted_before = _emitted

    def fail(message: str, code: int) -> int:
        message = redact(message)
        if _emitted == emitted_before:
            emit(f"{phase}_failed", error=message)
        return code

    try:
        result = main(argv)
    except UsageError as exc:
        message = redact(str(exc))
        print(f"{exc.usage}{exc.prog}: error: {message}", file=sys.stderr, flush=True)
        return fail(f"{message} (see --help)", 2)
    except (ConfigError, StorageError, CheckpointError, FileNotFoundError, ValueError) as exc:
        message = redact(str(exc))
        print(f"error: {message}", file=sys.stderr, flush=True)
        return fail(message, 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return fail("interrupted (KeyboardInterrupt)", 130)
    except SystemExit as exc:
        # --help (code 0) prints help and nothing else; any other exit still gets its JSON line.
        code = exc.code
        if code in (0, None):
            return 0
        if isinstance(code, int):
            return fail(f"exited with status {code} (see stderr)", code)
        print(code, file=sys.stderr, flush=True)
        return fail(str(code), 1)
    except Exception as exc:  # noqa: BLE001 - the job's last line must say it failed
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        return fail(one_line(exc), 1)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0



def _job_phase_of_main() -> Optional[str]:
    """The phase when this process runs ``python -m ray_jobs[.PHASE]``, else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name == "ray_jobs.__main__":
        return "cli"
    if name.startswith("ray_jobs."):
        return name.split(".", 1)[1]
    return None


def _install_last_resort_hook() -> None:
    """``run_main`` gives every exit its JSON line; this covers what happens before it runs (an
    import error in the job's own module): the traceback, then ``<phase>_failed``."""
    phase = _job_phase_of_main()
    if phase is None or getattr(sys.excepthook, "_speed_job_hook", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if _emitted == 0:
            try:
                emit(f"{phase}_failed", error=redact(one_line(value)))
            except Exception:  # noqa: BLE001 - stdout may be gone; the traceback is already out
                pass

    hook._speed_job_hook = True
    sys.excepthook = hook


_install_last_resort_hook()
