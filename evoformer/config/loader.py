"""OmegaConf at the edge: YAML files and ``key=value`` overrides -> a validated :class:`Config`.

Files merge left to right, then the overrides. Every mistake becomes one :class:`UserError` line
naming where it came from (file or override) and what is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from evoformer.config.schema import Config
from evoformer.config.validate import validate
from evoformer.errors import UserError


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        ftype = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if ftype is not None and dataclasses.is_dataclass(ftype):
            keys += _all_keys(ftype, key + ".")
    return keys


def _explain(err: OmegaConfBaseException, where: str) -> UserError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err).split("\n")[0]:
        guess = difflib.get_close_matches(str(key), _all_keys(Config), n=1, cutoff=0.6)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        return UserError(f"{where}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).split("\n")[0]
        return UserError(f"{where}: bad value for '{key}': {msg}")
    return UserError(f"{where}: {str(err).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        # Merging into a DictConfig always yields a DictConfig; OmegaConf's stub says any node.
        return cast(DictConfig, OmegaConf.merge(base, other))
    except OmegaConfBaseException as err:
        raise _explain(err, where) from None


def _read_yaml(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a config file must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> dict:
    """``a.b=1`` -> nested dict, value parsed as YAML (so 1e-3, true, [1,2] work)."""
    if "=" not in text:
        raise UserError(
            f"override '{text}' is not of the form key=value (e.g. train.max_steps=100)"
        )
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge ``files`` then ``overrides`` into the schema, validate, return a typed Config."""
    cfg = OmegaConf.structured(Config)
    for path in files:
        cfg = _merge(cfg, _read_yaml(path), path)
    for text in overrides:
        cfg = _merge(cfg, parse_override(text), f"override '{text}'")
    try:
        # to_object of a structured Config node builds a Config; the stub cannot say so.
        obj = cast(Config, OmegaConf.to_object(cfg))
    except OmegaConfBaseException as err:
        raise _explain(err, "config") from None
    validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (what is written to the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_help(cls: type = Config, prefix: str = "") -> str:
    """A reference of every key with its default and help text, generated from the schema."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if factory is not None and dataclasses.is_dataclass(factory):
            lines.append(f"\n{key}:  {f.metadata.get('help', '')}")
            lines.append(config_help(factory, key + "."))
            continue
        default = f.default if factory is None else factory()
        lines.append(f"  {key} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
