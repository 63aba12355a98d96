"""Reading and writing a :class:`~vlamp.train.config.RunConfig`: YAML files (or a recipe's name),
dotted ``key=value`` overrides, decoding with types checked by draccus (LeRobot's config library),
and saving next to every run."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

import draccus
import yaml

from vlamp.io import write_text_atomic
from vlamp.models.config import with_size
from vlamp.precision.errors import VlampError
from vlamp.train.config import RunConfig
from vlamp.train.recipes import config_file


def keys(cls: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of a config class, dotted (``train.steps``)."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = _dataclass_type(cls, f)
        if sub is not None:
            out.update(keys(sub, name + "."))
        else:
            out[name] = f
    return out


def _dataclass_type(cls: type, f: dataclasses.Field) -> type | None:
    t = typing.get_type_hints(cls)[f.name]
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _check_keys(tree: dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in tree.items():
        dotted = prefix + str(key)
        if key not in fields:
            legal = list(keys(cls, prefix))
            close = difflib.get_close_matches(dotted, legal, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; legal keys: {', '.join(legal)}"
            raise VlampError(f"{where}: unknown config key {dotted!r}{hint}")
        sub = _dataclass_type(cls, fields[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise VlampError(f"{where}: {dotted!r} is a section; give its keys, e.g. "
                                 f"{dotted}.{dataclasses.fields(sub)[0].name}=...")
            _check_keys(value, sub, where, dotted + ".")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "--resume=true"]`` -> a nested dict; values are read as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        text = item.removeprefix("--")
        if "=" not in text:
            raise VlampError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlampError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
                ) -> RunConfig:
    """Builds a :class:`RunConfig` from defaults, a YAML file (or a recipe's name, see
    :func:`config_file`) and ``key=value`` overrides.

    Raises:
        VlampError: On a missing or malformed file, an unknown key (naming the closest legal one)
            or a value of the wrong type.
    """
    tree: dict[str, Any] = {}
    if path:
        p = config_file(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise VlampError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise VlampError(f"config file {str(p)!r} must hold a mapping of keys, got "
                             f"{type(loaded).__name__}")
        tree = loaded or {}
        _check_keys(tree, RunConfig, str(p))
    over = parse_overrides(overrides or [])
    _check_keys(over, RunConfig, "command line")
    return decode(_merge(tree, over))


def with_overrides(config: RunConfig, overrides: list[str], where: str = "command line") -> RunConfig:
    """``config`` with ``key=value`` overrides applied, checked as :func:`load_config` checks them.

    Raises:
        VlampError: On an override that is not key=value, an unknown key or a wrong type.
    """
    over = parse_overrides(overrides)
    _check_keys(over, RunConfig, where)
    return decode(_merge(to_dict(config), over))


def decode(tree: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a nested dict, with types checked by draccus."""
    if isinstance(tree.get("model"), dict):
        tree = {**tree, "model": with_size(tree["model"])}
    try:
        return draccus.decode(RunConfig, tree)
    except VlampError:
        raise
    except Exception as e:  # draccus.DecodingError, or a __post_init__ check it wrapped
        cause = e.__cause__ if isinstance(e.__cause__, VlampError) else e
        raise VlampError(f"bad config value: {cause}") from None


def to_dict(config: RunConfig) -> dict[str, Any]:
    return draccus.encode(config)


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
    """Writes the config as YAML (temporary file, then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
