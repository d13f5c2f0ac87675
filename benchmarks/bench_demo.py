"""`detrax demo` as a newcomer runs it (the README's first command, after the install): the command's wall
minutes, and the AP50 and AP it reports on its 250 val images, with the AP50 of each evaluation during the run.
Those are in-sample figures: the `demo` preset was tuned on that very val split (the demo's seed). Beside them,
held out: the trained run evaluated (`detrax eval`) on 250 new scenes of the same generator drawn with another
seed, images no tuning ever saw.

    .venv/bin/python benchmarks/bench_demo.py [--workdir /tmp/bench_demo]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import record

from detrax.config import presets
from detrax.data.synthetic import write_dataset

HELD_OUT_SEED = 1001  # the demo draws its scenes with seed 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench_demo")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    detrax = os.path.join(os.path.dirname(sys.executable), "detrax")
    print(record.cpu(), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run([detrax, "demo", "--workdir", args.workdir], capture_output=True, text=True, check=False)
    minutes = (time.perf_counter() - t0) / 60
    if out.returncode:
        raise SystemExit(f"detrax demo failed (status {out.returncode}):\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    held = os.path.join(args.workdir, "held_out")
    write_dataset(held, 500, seed=HELD_OUT_SEED, val_fraction=0.5, shape=presets.DEMO_SHAPE)  # 250 val scenes
    ev = subprocess.run([detrax, "eval", args.workdir, "--data", held, "--split", "val", "--out",
                         os.path.join(held, "eval")], capture_output=True, text=True, check=False)
    if ev.returncode:
        raise SystemExit(f"detrax eval failed (status {ev.returncode}):\n{ev.stderr[-3000:]}")
    with open(os.path.join(held, "eval", "metrics.json")) as f:
        held_out = json.load(f)
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    figures = {"AP50": round(summary["AP50"], 4), "AP": round(summary["AP"], 4), "minutes": round(minutes, 1),
               "AP50_by_step": {r["step"]: round(r["AP50"], 4) for r in evals},
               "held_out_AP50": round(held_out["AP50"], 4), "held_out_AP": round(held_out["AP"], 4),
               "held_out_seed": HELD_OUT_SEED}
    print(f"AP50 {figures['AP50']:.3f} (AP {figures['AP']:.3f}) in {figures['minutes']} minutes; by step "
          f"{figures['AP50_by_step']}; held out: AP50 {figures['held_out_AP50']:.3f} (AP {figures['held_out_AP']:.3f})")
    record.finish(figures)


if __name__ == "__main__":
    main()
