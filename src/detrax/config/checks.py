"""A config's names checked against the registries that own them (backbones, matchers, attention kernels).

The registries live in the wings above `config`; each registers a check here when it is imported (which
`import detrax` does), so nothing in `config` imports upward. A check takes a config section and returns the
fields it resolves (a backbone variant's depths), or raises ValueError naming the valid choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

CHECKS: dict[str, list[Callable[[Any], dict]]] = {}  # section class name -> checks


def register(section: str, check: Callable[[Any], dict]) -> None:
    """Run `check(cfg)` on every `section` ("ModelConfig", "LossConfig", ...) built from now on."""
    CHECKS.setdefault(section, []).append(check)


def choice(field: str, value: str, valid: Iterable[str]) -> dict:
    """Nothing to resolve; a clear error when `value` is not one of `valid`."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{field} must be one of {', '.join(valid)}, not {value!r}")
    return {}


def apply(cfg: Any) -> None:
    """Every registered check of `cfg`'s section; the fields they resolve are set on the (frozen) config."""
    for check in CHECKS.get(type(cfg).__name__, []):
        for name, value in check(cfg).items():
            object.__setattr__(cfg, name, value)
