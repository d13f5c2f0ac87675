"""Time to the first detection: `detrax predict` of one image in a fresh process, the first and the second time,
with JAX's persistent compilation cache (`detrax.serving.compilation_cache`, a new folder for the first) and with
it off. DETR-R50 (random weights saved as a detrax weights file: no download), one 640x480 image (the official val
transform: 800x1066). Each process's wall time from its start to its exit, and what it compiled (programs that
missed the cache; JAX's monitoring events). Goal: the second process with the cache at most 30% of the first's
time, compiling nothing.

    python benchmarks/bench_startup.py [--checkpoint detr_r50|FILE] [--size 480x640]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import record
from PIL import Image

import detrax

# `detrax predict` as the command runs it (cli.main() with no argv: the process is the command's), and what
# JAX compiled: backend compiles (cache hits included: JAX times both) and the cache's hits
CHILD = r"""
import json, sys
import jax.monitoring as monitoring
seen = {"compiles": 0, "hits": 0, "compile_s": 0.0}
def event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        seen["hits"] += 1
def duration(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
        seen["compiles"] += 1
        seen["compile_s"] += secs
monitoring.register_event_listener(event)
monitoring.register_event_duration_secs_listener(duration)
from detrax import cli
sys.argv = ["detrax", *sys.argv[1:]]
status = cli.main()
print("STARTUP " + json.dumps({**seen, "status": status}), file=sys.stderr)
sys.exit(status)
"""


def launch(args: list[str], cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["DETRAX_COMPILATION_CACHE"] = cache
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = [x for x in p.stderr.splitlines() if x.startswith("STARTUP ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"detrax {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    seen = json.loads(line[-1].split(" ", 1)[1])
    return {"seconds": round(wall, 2), "compiled": seen["compiles"] - seen["hits"], "cache_hits": seen["hits"],
            "compile_seconds": round(seen["compile_s"], 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="detr_r50", help="a weights file or run, or a preset (its random "
                    "weights saved first as a weights file, as a converted or trained model is)")
    ap.add_argument("--size", default="480x640", help="HxW of the image")
    args = ap.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    work = tempfile.mkdtemp(prefix="bench_startup_")
    image = os.path.join(work, "image.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
    checkpoint = args.checkpoint
    if not os.path.exists(checkpoint):
        checkpoint = os.path.join(work, "detr.safetensors")
        detrax.load(f"random:{args.checkpoint}").save(checkpoint)
    predict = ["predict", checkpoint, image, "--out", os.path.join(work, "out")]
    cache = os.path.join(work, "cache")
    runs = {"first": launch(predict, cache), "second": launch(predict, cache), "off": launch(predict, "off")}
    for name, r in runs.items():
        print(f"{name:6s} {r['seconds']:6.2f} s, compiled {r['compiled']} programs ({r['compile_seconds']} s "
              f"compiling or reading), {r['cache_hits']} from the cache", flush=True)
    figures = {"checkpoint": args.checkpoint, "image": args.size,
               "first_s": runs["first"]["seconds"], "second_s": runs["second"]["seconds"],
               "off_s": runs["off"]["seconds"],
               "second_over_first": round(runs["second"]["seconds"] / runs["first"]["seconds"], 3),
               "compiled_first": runs["first"]["compiled"], "compiled_second": runs["second"]["compiled"],
               "compile_seconds_first": runs["first"]["compile_seconds"],
               "compile_seconds_second": runs["second"]["compile_seconds"]}
    record.finish(figures)


if __name__ == "__main__":
    main()
