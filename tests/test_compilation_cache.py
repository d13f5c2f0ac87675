"""JAX's persistent compilation cache of the `detrax` command and `detrax.load` (detrax.serving.compilation_cache):
where it lives, how it is turned off, and a second process that compiles nothing."""

import json
import sys
from pathlib import Path

import jax

from detrax import cli
from detrax.serving import compilation_cache as cc

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from bench_startup import launch  # noqa: E402  (benchmarks/bench_startup.py: `detrax` in a process, counted)


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.folder() == str(tmp_path / "xdg" / "detrax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.folder() == str(tmp_path / "home" / ".cache" / "detrax" / "jax")
    monkeypatch.setenv(cc.ENV, "~/elsewhere")
    assert cc.folder() == str(tmp_path / "home" / "elsewhere")
    for off in ("off", "OFF", "0", "false", " no "):
        monkeypatch.setenv(cc.ENV, off)
        assert cc.folder() is None, off


def test_a_folder_jax_has_is_kept_and_the_flag_turns_it_off(compilation_cache, tmp_path, capsys):
    assert cc.enable() == compilation_cache  # the suite's (conftest): JAX had it first
    try:
        assert cli.main(["--no-compile-cache", "data", "synth", str(tmp_path / "d"), "--num-images", "2"]) == 0
        assert not jax.config.jax_enable_compilation_cache and cc.enable() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert cc.enable() == compilation_cache


def test_a_second_predict_compiles_nothing_and_detects_the_same(tmp_path):
    """Two `detrax predict` processes on one cache folder: the first compiles and fills it, the second compiles
    nothing (every program a cache hit) and writes the same detections."""
    cache = str(tmp_path / "cache")
    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        runs.append(launch(["predict", "random:tiny", "--generate", "1", "--out", str(out), "--threshold", "0"],
                           cache))
        runs[-1]["results"] = json.loads((out / "results.json").read_text())
    first, second = runs
    assert first["compiled"] > 0 and first["cache_hits"] == 0, first
    assert second["compiled"] == 0 and second["cache_hits"] == first["compiled"], second
    assert second["results"] == first["results"] and len(first["results"]) == 10  # tiny: 10 queries
    assert any(Path(cache).iterdir())


def test_a_cache_folder_that_cannot_be_made_is_one_line_not_a_failure(compilation_cache, tmp_path, monkeypatch,
                                                                     capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(cc.ENV, str(blocker / "cache"))
    jax.config.update("jax_compilation_cache_dir", None)  # as in a process JAX has given no folder
    try:
        assert cc.enable() is None
        assert capsys.readouterr().err == f"detrax: compilation cache off: cannot make {blocker / 'cache'}: Not a " \
                                          "directory\n"
        assert cc.enable() is None and capsys.readouterr().err == ""  # said once
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", compilation_cache)
