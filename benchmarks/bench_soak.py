"""Soak: train the `demo` preset on synthetic data for a fixed time (default 20 minutes) with evaluation and
checkpoints along the way, sampling the process's resident memory; the run is ended by SIGTERM, the way a
scheduler ends one, so the stop-and-save path is part of the soak. Memory is flat when the second half of the
run holds no more than the first (after warm-up): the ratio late / early RSS is printed, with the growth
rate fitted over the second half.

    .venv/bin/python benchmarks/bench_soak.py [--minutes 20] [--images 2000] [--trace]

`--trace` also follows Python's own allocations (tracemalloc, which slows the Python parts of the run): the
sites whose memory grew most between the end of warm-up and the end are printed, with the count of live Python
objects, so that a growth of the RSS can be told apart from a growth of Python objects.
"""

import argparse
import gc
import os
import signal
import tempfile
import threading
import time

import numpy as np
import record


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--workdir", default=None)
    p.add_argument("--trace", action="store_true", help="tracemalloc: the Python sites that grew most")
    args = p.parse_args()
    if args.trace:
        import tracemalloc

        tracemalloc.start(8)
    from detrax.config import presets
    from detrax.config.overrides import override
    from detrax.data.synthetic import write_dataset
    from detrax.training.loop import Run, fit

    workdir = args.workdir or tempfile.mkdtemp(prefix="soak-")
    data = os.path.join(workdir, "data")
    write_dataset(data, args.images, seed=0, val_fraction=0.1)
    cfg = override(presets.get("demo"), ["train.epochs=10000", "train.lr_drop=10000", "train.eval_every=5",
                                                 "train.ckpt_every=500"])
    samples, t0 = [], time.time()
    done = threading.Event()
    snaps = {}

    def sample():
        while not done.wait(args.every):
            samples.append((time.time() - t0, rss_mb()))
            if args.trace and "warm" not in snaps and samples[-1][0] > 0.1 * args.minutes * 60:
                snaps["warm"] = (tracemalloc.take_snapshot(), len(gc.get_objects()))

    def stop():
        if not done.wait(args.minutes * 60):
            os.kill(os.getpid(), signal.SIGTERM)  # fit saves a checkpoint and returns

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=stop, daemon=True)]
    for t in threads:
        t.start()
    summary = fit(cfg, Run(data, os.path.join(workdir, "run"), quiet=True))
    done.set()
    if args.trace and "warm" in snaps:
        end, objects = tracemalloc.take_snapshot(), len(gc.get_objects())
        stats = end.compare_to(snaps["warm"][0], "traceback")
        traced = sum(s.size_diff for s in stats) / 2**20
        print(f"Python objects {snaps['warm'][1]} -> {objects}; traced Python memory grew {traced:.2f} MB from "
              "warm-up to the end; largest growths:")
        for stat in stats[:10]:
            print(f"  {stat.size_diff / 2**10:+.1f} KiB in {stat.count_diff:+d} blocks")
            for line in stat.traceback.format()[-6:]:
                print("     " + line)
    t, rss = np.array(samples).T
    warm = t > 0.1 * t[-1]  # after compilation and the first evaluation
    half = t > t[-1] / 2
    early, late = rss[warm & ~half], rss[half]
    slope = np.polyfit(t[half] / 60, late, 1)[0] if half.sum() > 2 else float("nan")
    figures = {"minutes": round(t[-1] / 60, 1), "steps": summary["step"], "stopped_by": summary["stopped"],
               "samples": len(rss), "rss_start_mb": round(float(rss[0]), 1), "rss_peak_mb": round(float(rss.max()), 1),
               "rss_early_mean_mb": round(float(early.mean()), 1), "rss_late_mean_mb": round(float(late.mean()), 1),
               "late_over_early": round(float(late.mean() / early.mean()), 3),
               "growth_mb_per_min_second_half": round(float(slope), 2),
               "growth_mb_per_1000_steps": round(float(slope) * t[-1] / 60 / max(1, summary["step"]) * 1000, 2),
               "eval": summary["eval"]}
    print(f"{figures['steps']} steps in {figures['minutes']} min; RSS start {figures['rss_start_mb']} MB, peak "
          f"{figures['rss_peak_mb']} MB; late/early {figures['late_over_early']}, "
          f"growth {figures['growth_mb_per_min_second_half']} MB/min over the second half")
    record.finish(figures)


if __name__ == "__main__":
    main()
