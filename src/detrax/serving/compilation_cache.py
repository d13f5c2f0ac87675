"""JAX's persistent compilation cache for the `detrax` command and `detrax.load`: a program compiled once (a model's
inference at one batch shape, a train step) is read back from disk by the next process instead of compiled again,
so a second `detrax predict` or `detrax eval` of the same model and sizes compiles nothing.

Where: $DETRAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/detrax/jax, else ~/.cache/detrax/jax; at most `MAX_BYTES`
(the least recently used programs go first). Off: DETRAX_COMPILATION_CACHE=off, or `detrax --no-compile-cache`.
A cache folder JAX already has (JAX_COMPILATION_CACHE_DIR, `jax.config`) is left as it is. A cached program is the
machine code XLA compiled, so its numbers are the same. Time to the first detection, first and second process:
benchmarks/bench_startup.py."""

from __future__ import annotations

import os
import sys

import jax

ENV = "DETRAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
MAX_BYTES = 4 << 30


def folder() -> str | None:
    """The cache folder this process would use, or None where the environment turns it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "detrax", "jax")


def enable() -> str | None:
    """Turn the cache on for this process (again and again: the first call decides). Returns the folder in use,
    or None when it is off. A folder that cannot be made costs one line on stderr, never the command."""
    if not jax.config.jax_enable_compilation_cache:  # type: ignore[attr-defined]
        return None
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if current:
        return current
    path = folder()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"detrax: compilation cache off: cannot make {path}: {e.strerror or e}", file=sys.stderr)
        disable()  # said once
        return None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program: nothing compiles twice
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # a process that compiled before this call looks again
    return path


def disable() -> None:
    """Off for the rest of this process, whatever folder JAX was given (`detrax --no-compile-cache`)."""
    jax.config.update("jax_enable_compilation_cache", False)
