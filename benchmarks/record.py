"""A benchmark's result as a file: `benchmarks/results/<benchmark>.<machine>.json` holds the JSON line the benchmark
prints (`figures`) with the CPU (its name and widest vector instructions), date, commit and command that gave it,
one file per benchmark and kind of machine (a run on another kind of CPU does not overwrite this one's).
`tables.py` writes the READMEs' figure tables from these files. Every benchmark ends with `finish(figures)`: the
file written, then the JSON line printed last."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu() -> str:
    """The CPU's model name (lscpu's, else /proc/cpuinfo's, else the platform's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    if not out and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            out = f.read().replace("model name", "Model name")
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return name or platform.processor() or platform.machine()


def isa() -> str:
    """The widest vector instructions of this CPU, as they change every figure: `amx` (Intel's matrix tiles),
    `avx512-bf16`, `avx512`, `avx2`, else `other`."""
    flags: set[str] = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    for name, needs in (("amx", {"amx_tile"}), ("avx512-bf16", {"avx512_bf16"}), ("avx512", {"avx512f"}),
                        ("avx2", {"avx2"})):
        if needs <= flags:
            return name
    return "other"


def machine(cpu_name: str, instructions: str) -> str:
    """The kind of machine a results file is for: `amd-epyc-avx2`, `amd-epyc-avx512-bf16`, `intel-xeon-amx`, ...;
    else the CPU name as a slug."""
    for pattern, kind in ((r"EPYC", "amd-epyc"), (r"Xeon", "intel-xeon")):
        if re.search(pattern, cpu_name):
            return f"{kind}-{instructions}"
    return re.sub(r"[^a-z0-9]+", "-", f"{cpu_name} {instructions}".lower()).strip("-")


def commit() -> str:
    """HEAD's short hash, `+changes` when the tree differs from it (besides results files)."""
    git = lambda *a: subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, check=False).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line for line in git("status", "--porcelain").splitlines() if "benchmarks/results/" not in line]
    return head + ("+changes" if changed else "")


def finish(figures: dict, name: str | None = None) -> str:
    """Write `figures` (the benchmark's JSON line) to its results file, with the CPU, date, commit and command;
    then print the JSON line, last. Returns the file's path."""
    name = name or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    cpu_name, instructions = cpu(), isa()
    record = {"benchmark": name, "cpu": cpu_name, "isa": instructions, "machine": machine(cpu_name, instructions),
              "date": datetime.date.today().isoformat(), "commit": commit(),
              "command": shlex.join([".venv/bin/python", f"benchmarks/{os.path.basename(sys.argv[0])}", *sys.argv[1:]]),
              "figures": figures}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.{record['machine']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"results: {os.path.relpath(path, REPO)}", file=sys.stderr)
    print(json.dumps(figures), flush=True)
    return path
