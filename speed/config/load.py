"""The one configuration loader (the only OmegaConf user).

Merge order, later wins:
  1. the schema defaults;
  2. every ``base.yaml`` from the configs root down to the chosen file's folder;
  3. files named by the chosen file's ``include:`` list (each with its own base chain), then the file;
  4. ``phases.<phase>`` of the merged tree, when a phase is given;
  5. ``key=value`` overrides from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speed.config.schema import Config, ConfigError
from speed.config.validate import dotted_keys, validate_config

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/digits/speed.yaml"
# Keys that only steer loading; they never reach the schema.
_LOADER_KEYS = ("include", "phases")
_SECRET_KEYS = ("secret_access_key", "access_key_id", "session_token", "password", "token")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config file relative to the working directory, then to the project root."""
    candidate = Path(path)
    for root in (Path.cwd(), PACKAGE_ROOT):
        full = candidate if candidate.is_absolute() else root / candidate
        if full.is_file():
            return full.resolve()
    raise ConfigError(
        f"config file '{path}' does not exist (looked in the working directory and {PACKAGE_ROOT.name}/); "
        f"pass -c with a file under configs/, e.g. -c {DEFAULT_CONFIG}"
    )


def _configs_root(path: Path) -> Path:
    """The nearest ancestor folder named 'configs', else the file's own folder."""
    for parent in path.parents:
        if parent.name == "configs":
            return parent
    return path.parent


def _read_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report the file
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if node is None:
        return OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return node


def _file_chain(path: Path, seen: Optional[set] = None) -> List[DictConfig]:
    """base.yaml files from the configs root down, then includes, then the file itself.

    ``seen`` holds every file already placed in the chain, so a base.yaml shared by the file and
    an include is applied once, before both.
    """
    seen = set() if seen is None else seen
    if path in seen:
        raise ConfigError(f"config include cycle through '{path}'")
    seen.add(path)
    root = _configs_root(path)
    folders = [root]
    for part in path.parent.relative_to(root).parts:
        folders.append(folders[-1] / part)
    chain: List[DictConfig] = []
    for folder in folders:
        base = (folder / "base.yaml").resolve()
        if base.is_file() and base != path and base not in seen:
            seen.add(base)
            chain.append(_read_yaml(base))
    node = _read_yaml(path)
    includes = node.pop("include") if "include" in node else None
    if includes is not None:
        items = [includes] if isinstance(includes, str) else list(includes)
        for item in items:
            included = (path.parent / str(item)).resolve()
            if not included.is_file():
                raise ConfigError(f"include: '{item}' named in '{path}' does not exist")
            chain.extend(_file_chain(included, seen))
    chain.append(node)
    return chain


def _close_matches(key: str) -> str:
    matches = difflib.get_close_matches(key, dotted_keys(Config()), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _friendly(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not in" in msg:
        return ConfigError(f"unknown config key '{key}' (from {source}){_close_matches(key)}")
    return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}")


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        dotlist.append(item)
    try:
        return OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {dotlist}: {exc}") from exc


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Sequence[str] = (),
    phase: Optional[str] = None,
) -> Config:
    """Load, merge and validate a configuration; raise ConfigError naming the bad key."""
    config_path = resolve_config_path(path or DEFAULT_CONFIG)
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.create({})
    for node in _file_chain(config_path):
        merged = OmegaConf.merge(merged, node)
    override_node = parse_overrides(overrides)
    phases = merged.pop("phases", None) if "phases" in merged else None
    merged.pop("include", None) if "include" in merged else None
    layers = [(merged, str(config_path))]
    if phase is not None and phases is not None and phase in phases:
        layers.append((phases[phase], f"{config_path} phases.{phase}"))
    layers.append((override_node, "command-line overrides"))
    cfg = schema
    for node, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as exc:
            raise _friendly(exc, source) from exc
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, str(config_path)) from exc
    validate_config(config)
    return config


def config_from_dict(data: Dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. the resolved config stored in a checkpoint)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "stored config") from exc
    validate_config(config)
    return config


def apply_overrides(config: Config, overrides: Dict[str, Any] | Sequence[str]) -> Config:
    """Return a copy of ``config`` with dotted-key overrides (a dict or key=value strings) applied."""
    if isinstance(overrides, dict):
        node = OmegaConf.create({})
        for key, value in overrides.items():
            OmegaConf.update(node, key, value, force_add=True)
    else:
        node = parse_overrides(overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), node)
        new = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _friendly(exc, "overrides") from exc
    validate_config(new)
    return new


def to_dict(config: Any, redact: bool = True) -> Dict[str, Any]:
    """Plain-data copy of a config (or section); secrets are replaced by '***' unless redact=False."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("***" if redact and k in _SECRET_KEYS and v else scrub(v)) for k, v in node.items()
            }
        if isinstance(node, (list, tuple, ListConfig)):
            return [scrub(v) for v in node]
        return node

    return scrub(data)


def all_keys() -> List[str]:
    return dotted_keys(Config())
