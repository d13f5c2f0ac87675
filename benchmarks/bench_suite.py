"""The test suite as CI runs it: a fresh clone of this repository's HEAD (committed work only) in a temporary
folder, `CI=true bash .ci/run` timed there (install, ruff, mypy, pytest with 2 workers): its wall minutes, the
CPU minutes of everything it ran, pytest's own minutes and its count of passed tests.

    .venv/bin/python benchmarks/bench_suite.py

Run it on a quiet machine: the figure is the wall time. Fails if `.ci/run` fails."""

import argparse
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time

import record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--keep", default=None, help="clone into this folder and leave it (default: a temporary one)")
    args = p.parse_args()
    where = args.keep or tempfile.mkdtemp(prefix="bench_suite_")
    clone = os.path.join(where, "detrax")
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", record.REPO, clone], check=True)
    print(f"{record.cpu()}: .ci/run in {clone}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(["bash", ".ci/run"], cwd=clone, env={**os.environ, "CI": "true"}, capture_output=True,
                         text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(f".ci/run failed (status {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    last = out.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", last)
    pytest_s = re.search(r" in ([\d.]+)s", last)
    if not (passed and pytest_s):
        raise SystemExit(f"no pytest summary in .ci/run's last line: {last!r}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)
    figures = {"minutes": round(wall / 60, 1), "pytest_minutes": round(float(pytest_s.group(1)) / 60, 1),
               "passed": int(passed.group(1)), "cpu_minutes": round(cpu / 60, 1), "summary": last}
    print(f".ci/run {figures['minutes']} min (pytest {figures['pytest_minutes']} min, {figures['passed']} passed), "
          f"{figures['cpu_minutes']} CPU minutes")
    record.finish(figures)


if __name__ == "__main__":
    main()
