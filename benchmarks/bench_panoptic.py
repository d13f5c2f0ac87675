"""The synthetic panoptic recipe on the CPU, end to end: `detrax data synth --panoptic` (1500 train, 500 val
scenes of 128x160), the first stage (`demo_panoptic_detector`: the detector on every segment's box), then the
second (`demo_panoptic`: the mask head on the frozen detector) twice from the same detector, once with the
official mask-head init (`model.mask_attention_gain=1`, the peer) and once with the preset's, each for the
preset's epochs; PQ of each on the val split, and the wall time of each stage. The recipe was tuned on that val
split (in-sample); beside it, held out: the preset's model evaluated (`detrax eval`) on 500 new scenes of another
seed.

    .venv/bin/python benchmarks/bench_panoptic.py [--out /tmp/bench_panoptic] [--images 2000]

Prints the CPU model, each stage's time and metrics, and last one JSON object with `pq`, `pq_official_init`,
their ratio and the minutes (stage 1 + stage 2 with the preset).
"""

import argparse
import dataclasses
import json
import os
import shutil
import time

import record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_panoptic")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    from detrax import cli
    from detrax.config import presets
    from detrax.data.synthetic import write_panoptic_dataset
    from detrax.training.devices import prefer_eigen_convolutions
    from detrax.training.loop import Run, fit

    prefer_eigen_convolutions()  # as the `detrax` command
    print(record.cpu(), flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    data = os.path.join(args.out, "data")
    write_panoptic_dataset(data, args.images, args.seed)
    figures: dict = {"images": args.images}

    def run(name, cfg, init=None):
        t0 = time.perf_counter()
        result = fit(cfg, Run(data, os.path.join(args.out, name), init=init, quiet=True))
        minutes = (time.perf_counter() - t0) / 60
        print(f"{name}: {minutes:.1f} min, {json.dumps({k: round(v, 4) for k, v in result['eval'].items()})}",
              flush=True)
        return result["eval"], minutes

    boxes, figures["stage1_min"] = run("detector", presets.get("demo_panoptic_detector"))
    figures["stage1_AP50"] = round(boxes["AP50"], 3)
    cfg = presets.get("demo_panoptic")
    official = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_attention_gain=1.0))
    pq, figures["stage2_min"] = run("masks", cfg, os.path.join(args.out, "detector"))
    pq0, _ = run("masks_official_init", official, os.path.join(args.out, "detector"))
    for suffix in ("", "_th", "_st"):
        figures[f"pq{suffix}"] = round(pq[f"PQ{suffix}"], 3)
        figures[f"pq{suffix}_official_init"] = round(pq0[f"PQ{suffix}"], 3)
    figures["ratio_pq_vs_official_init"] = round(pq["PQ"] / max(pq0["PQ"], 1e-9), 2)
    held = os.path.join(args.out, "held_out")
    write_panoptic_dataset(held, 625, args.seed + 1000, val_fraction=0.8)  # 500 val scenes no tuning saw
    if cli.main(["eval", os.path.join(args.out, "masks"), "--data", held, "--split", "val", "--out",
                 os.path.join(held, "eval")]) != 0:
        raise SystemExit("detrax eval of the held-out scenes failed")
    with open(os.path.join(held, "eval", "metrics.json")) as f:
        held_out = json.load(f)
    for suffix in ("", "_th", "_st"):
        figures[f"held_out_pq{suffix}"] = round(held_out[f"PQ{suffix}"], 3)
    figures["held_out_seed"] = args.seed + 1000
    figures["minutes"] = round(figures["stage1_min"] + figures["stage2_min"], 1)
    figures["stage1_min"], figures["stage2_min"] = round(figures["stage1_min"], 1), round(figures["stage2_min"], 1)
    record.finish(figures)


if __name__ == "__main__":
    main()
