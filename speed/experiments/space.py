"""Search spaces over dotted config keys: parsing, checking, grid expansion and trial names.

A search space (``tune.search_space``) maps a dotted config key to its values:

- a list ``[a, b, c]`` or ``{grid: [a, b, c]}``: every value, crossed with the other grid keys;
- ``{choice: [a, b, c]}``: one value drawn per trial;
- ``{uniform: [lo, hi]}`` / ``{loguniform: [lo, hi]}``: a float drawn per trial;
- a scalar: that one value for every trial.

Everything here is pure (no Ray): the Tune job turns dimensions into ``ray.tune`` domains, the
benchmark expands grids itself. ``check_search_space`` applies every grid point (and each choice
value and range end) to the base config, so a bad value fails before any trial starts and names
its key.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

from speed.config.schema import Config, ConfigError

KINDS = ("grid", "choice", "uniform", "loguniform")
# Set per trial by the experiment runner: a search space may not vary them.
RESERVED_KEYS = ("run.name", "run.output_uri", "train.resume_from")
# Keys that name a trial's timestep strategy and its seed (the baseline is matched on these).
STRATEGY_KEY = "diffusion.timesteps.name"
SEED_KEY = "run.seed"
# A pseudo-key: a cell of the compute-to-quality grid (<objective>-<strategy>-<accelerator>,
# speed.experiments.cells), which sets several config keys together.
CELL_KEY = "cell"
# Above this many combinations the check applies each value on its own instead of the product.
_MAX_CHECKED_COMBINATIONS = 256


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # grid | choice | uniform | loguniform
    values: Tuple[Any, ...]  # grid/choice values, or (lo, hi)

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"


def _plain(value: Any) -> Any:
    """OmegaConf containers and tuples -> plain lists/dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def parse_search_space(space: Mapping[str, Any], known_keys: Iterable[str] | None = None) -> List[Dimension]:
    """Dimensions of a ``tune.search_space`` mapping; ConfigError names the offending key."""
    if known_keys is None:
        from speed.config.load import all_keys

        known_keys = all_keys()
    known = set(known_keys)
    dims: List[Dimension] = []
    for key, raw in (space or {}).items():
        where = f"tune.search_space['{key}']"
        if key == CELL_KEY:
            dims.append(_cell_dimension(raw, where))
            continue
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"tune.search_space names unknown config key '{key}'{hint}")
        if key in RESERVED_KEYS or key.startswith("tune."):
            raise ConfigError(
                f"{where}: '{key}' is set per trial by the experiment runner and cannot be searched over"
            )
        value = _plain(raw)
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in KINDS:
                raise ConfigError(
                    f"{where} must be a list of values or one of {{grid: [...]}}, {{choice: [...]}}, "
                    f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {value!r}"
                )
            kind, values = next(iter(value.items()))
        elif isinstance(value, list):
            kind, values = "grid", value
        else:
            kind, values = "grid", [value]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}: {kind} needs [lo, hi] numbers, got {values!r}")
            lo, hi = float(values[0]), float(values[1])
            if not lo < hi:
                raise ConfigError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}: loguniform needs lo > 0, got {lo}")
            values = [lo, hi]
        dims.append(Dimension(key=key, kind=kind, values=tuple(values)))
    return dims


def _cell_dimension(raw: Any, where: str) -> Dimension:
    from speed.experiments.cells import ACCELERATORS, Cell

    values = _plain(raw)
    if isinstance(values, dict) and list(values) == ["grid"]:
        values = values["grid"]
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where} must be a list of cells <objective>-<strategy>-<accelerator>, got {raw!r}")
    for value in values:
        try:
            cell = Cell.parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if cell.accelerator not in ACCELERATORS:
            raise ConfigError(f"{where}: {value!r} names accelerator {cell.accelerator!r}; choose one of "
                              f"{', '.join(ACCELERATORS)}")
    return Dimension(key=CELL_KEY, kind="grid", values=tuple(str(v) for v in values))


def expand_cell(values: Mapping[str, Any], sampling_steps: int) -> Dict[str, Any]:
    """A trial's values with its ``cell`` replaced by the config overrides the cell stands for
    (the cell's own keys win over the other values)."""
    import yaml

    from speed.experiments.cells import Cell

    out = {k: v for k, v in values.items() if k != CELL_KEY}
    if CELL_KEY in values:
        for item in Cell.parse(str(values[CELL_KEY])).overrides(sampling_steps):
            key, text = item.split("=", 1)
            out[key] = yaml.safe_load(text)
    return out


def grid_points(dims: Sequence[Dimension]) -> List[Dict[str, Any]]:
    """The cartesian product of the grid dimensions (in key order, last key fastest)."""
    grid = [d for d in dims if d.is_grid]
    if not grid:
        return [{}]
    return [dict(zip([d.key for d in grid], combo)) for combo in itertools.product(*[d.values for d in grid])]


def num_trials(dims: Sequence[Dimension], num_samples: int = 1) -> int:
    return len(grid_points(dims)) * max(1, num_samples)


def _check_values(dims: Sequence[Dimension]) -> List[Dict[str, Any]]:
    """Override sets that together exercise every value a trial can get."""
    options = [list(d.values) for d in dims]
    total = math.prod(len(o) for o in options) if options else 1
    if total <= _MAX_CHECKED_COMBINATIONS:
        return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*options)]
    # Too many: each value on its own, the other keys at their first value.
    first = {d.key: d.values[0] for d in dims}
    out = []
    for d in dims:
        for v in d.values:
            out.append({**first, d.key: v})
    return out


def check_search_space(cfg: Config, dims: Sequence[Dimension]) -> int:
    """Apply every grid point (and choice value / range end) to ``cfg``; returns the count checked.

    Raises ConfigError naming the key and value, before any trial starts.
    """
    from speed.config.load import apply_overrides

    checked = 0
    for overrides in _check_values(dims):
        try:
            apply_overrides(cfg, expand_cell(overrides, cfg.sampling.steps))
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            raise ConfigError(f"tune.search_space: the trial {{{shown}}} is not a valid config: {exc}") from exc
        checked += 1
    return checked


# --- trial names ----------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def trial_slug(overrides: Mapping[str, Any], max_len: int = 80) -> str:
    """A readable, folder-safe name for a trial's overrides, e.g. ``speed-seed1-k5-tau700``.

    Strategy names stand alone; other keys are their last component followed by the value. Long
    slugs are cut and get a short hash of the full overrides, so distinct trials stay distinct.
    """
    parts = []
    for key, value in overrides.items():
        last = key.rsplit(".", 1)[-1]
        text = _format_value(value)
        parts.append(text if key.startswith("diffusion.timesteps.") and last in ("name", "sampling", "weighting")
                     else f"{last}{text}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._-") or "base"
    if len(slug) > max_len:
        digest = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
        slug = slug[: max_len - 9].rstrip("._-") + "-" + digest
    return slug


def trial_run_name(index: int, overrides: Mapping[str, Any]) -> str:
    """``run.name`` of trial ``index``: stable across restarts of the same experiment, so a
    restarted trial finds its own checkpoints (``t003-speed-seed1``)."""
    return f"t{index:03d}-{trial_slug(overrides)}"


def variant_label(overrides: Mapping[str, Any], exclude: Sequence[str] = (SEED_KEY,)) -> str:
    """The overrides except the seed: trials with the same label differ only by seed."""
    kept = {k: v for k, v in overrides.items() if k not in exclude}
    if not kept:
        return "base"
    if list(kept) == [STRATEGY_KEY]:
        return str(kept[STRATEGY_KEY])
    return ", ".join(f"{k.rsplit('.', 1)[-1] if k != STRATEGY_KEY else 'strategy'}={_format_value(v)}"
                     for k, v in kept.items())
