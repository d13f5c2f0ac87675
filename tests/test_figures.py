"""Every figure table of README.md and benchmarks/README.md is what `benchmarks/tables.py` writes from the results
files in `benchmarks/results/`, each of which says what measured it (CPU, date, commit, command)."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import tables  # noqa: E402  (benchmarks/tables.py)

FIELDS = {"benchmark", "cpu", "isa", "machine", "date", "commit", "command", "figures"}


@pytest.mark.parametrize("name", sorted(tables.FILES))
def test_each_figure_table_is_its_results(name):
    text = Path(tables.FILES[name]).read_text()
    assert f"<!-- figures: {name} -->" in text, f"{tables.FILES[name]} has no figure table"
    assert tables.render(text) == text, f"{tables.FILES[name]}'s figures differ from benchmarks/results/: " \
                                        "run `.venv/bin/python benchmarks/tables.py`"


def test_every_row_has_results_that_say_what_measured_them():
    for path in (BENCHMARKS / "results").glob("*.json"):
        r = json.loads(path.read_text())
        assert FIELDS <= r.keys() and path.name == f"{r['benchmark']}.{r['machine']}.json", (path, r.keys())
        python, script = r["command"].split()[:2]  # a script of benchmarks/ (bench_int8.py --set foreign for two)
        assert python == ".venv/bin/python" and script.startswith("benchmarks/"), r["command"]
        assert (BENCHMARKS.parent / script).is_file() and r["benchmark"].startswith(Path(script).stem), r["command"]
    for row in tables.ROWS:
        for r in tables.results(row.benchmark):
            row.figure(r["figures"])  # every figure the row reads is there


def test_a_changed_result_shows_in_its_table(tmp_path):
    """The check can fail: with one figure of a results file changed, the table differs in that figure alone."""
    text = Path(tables.FILES["readme"]).read_text()
    for path in (BENCHMARKS / "results").glob("*.json"):
        r = json.loads(path.read_text())
        if r["benchmark"] == "bench_matching":
            r["figures"]["B32"]["speedup_hungarian"] = 999.5
        (tmp_path / path.name).write_text(json.dumps(r))
    changed = tables.render(text, str(tmp_path))
    diff = [(a, b) for a, b in zip(text.splitlines(), changed.splitlines()) if a != b]
    assert len(diff) == len(tables.results("bench_matching")) >= 1 and all("999.5x" in b for _, b in diff), diff
