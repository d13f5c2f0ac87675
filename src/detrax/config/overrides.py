"""`key=value` strings into a config: with the CLI, the one place that turns strings into values."""

from __future__ import annotations

import dataclasses
from typing import Any

from detrax.config.schema import Config


def _parse(value: str, like: Any, annotation: Any) -> Any:
    if "str" in str(annotation):  # a field that takes text (num_classes: a number or auto) checks it itself
        return value
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, tuple):
        kind = type(like[0]) if like else int
        return tuple(kind(v) for v in value.strip("()[] ").split(",") if v.strip())
    return type(like)(value)


SHORTCUTS = {"steps": "train.steps", "epochs": "train.epochs", "batch_size": "train.batch_size"}


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply `key=value` strings (dotted keys reach nested configs; `steps`, `epochs` and `batch_size` are short
    for their train.* keys) to a frozen dataclass config."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if isinstance(cfg, Config):
            key = SHORTCUTS.get(key.strip(), key)
        cfg = _set(cfg, key.strip().split("."), value.strip(), key)
    return cfg


def _set(obj: Any, path: list[str], value: str, full: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in fields:
        raise ValueError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}")
    current = getattr(obj, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full!r} is a section; set one of its fields")
        try:
            new = _parse(value, current, fields[head].type)
        except ValueError as e:
            raise ValueError(f"bad value for {full!r}: {e}") from None
    else:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {'.'.join(path)!r}: {head!r} has no fields")
        new = _set(current, path[1:], value, full)
    return dataclasses.replace(obj, **{head: new})
