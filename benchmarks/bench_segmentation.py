"""The panoptic model's forward pass (DETR-R50 with the official mask head, 250 classes, random weights) on the
CPU: detrax (XLA, jitted, the detector and mask head in one call) against HF transformers' DetrForSegmentation in
PyTorch (eval, no_grad), the same architecture and image, each in its own process, alternating over `--rounds`.

    .venv/bin/python benchmarks/bench_segmentation.py [--size 640x640] [--batch 1] [--iters 3] [--rounds 2]

Prints the CPU model, each worker's median seconds per forward, and last one JSON object with
`ratio_detrax_vs_hf` (detrax's median over HF's).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import record


def image(b, h, w):
    return np.random.default_rng(0).standard_normal((b, h, w, 3)).astype(np.float32)


def worker_detrax(b, h, w, iters):
    import dataclasses

    import jax
    from flax import nnx

    from detrax.config import presets
    from detrax.models.detr import DETR
    from detrax.serving.infer import run_model
    from detrax.training.devices import prefer_eigen_convolutions

    prefer_eigen_convolutions()
    cfg = dataclasses.replace(presets.get("detr_r50_panoptic").model, dropout=0.0)
    model = DETR(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, m: run_model(nnx.merge(graphdef, s), x, m))
    x, m = image(b, h, w), np.ones((b, h, w), bool)
    t0 = time.perf_counter()
    jax.block_until_ready(forward(state, x, m))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(forward(state, x, m))
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_s": first, "masks_shape": list(out["pred_masks"].shape)}


def worker_hf(b, h, w, iters):
    import torch
    import transformers

    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(depths=[3, 4, 6, 3], out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, num_labels=250)
    model = transformers.DetrForSegmentation(cfg).eval()
    x = torch.from_numpy(image(b, h, w)).permute(0, 3, 1, 2).contiguous()
    times = []
    with torch.no_grad():
        out = model(x, pixel_mask=torch.ones((b, h, w), dtype=torch.long))
        for _ in range(iters):
            t0 = time.perf_counter()
            out = model(x, pixel_mask=torch.ones((b, h, w), dtype=torch.long))
            times.append(time.perf_counter() - t0)
    return {"times": times, "masks_shape": list(out.pred_masks.shape)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="640x640")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=("detrax", "hf"))
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    if args.worker:
        fn = worker_detrax if args.worker == "detrax" else worker_hf
        print(json.dumps(fn(args.batch, h, w, args.iters)))
        return
    print(record.cpu(), flush=True)
    runs: dict = {"detrax": [], "hf": []}
    for _ in range(args.rounds):
        for kind in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--size", args.size, "--batch",
                                  str(args.batch), "--iters", str(args.iters)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    figures: dict = {"size": args.size, "batch": args.batch}
    for kind, rs in runs.items():
        figures[f"{kind}_median_s"] = round(statistics.median(t for r in rs for t in r["times"]), 3)
        print(f"{kind:7s} forward median {figures[f'{kind}_median_s']:.3f} s, pred_masks {rs[-1]['masks_shape']}")
    if runs["detrax"][-1]["masks_shape"] != runs["hf"][-1]["masks_shape"]:
        raise SystemExit("the two models' pred_masks differ in shape: not the same work")
    figures["detrax_first_call_s"] = round(statistics.median(r["first_s"] for r in runs["detrax"]), 1)
    figures["ratio_detrax_vs_hf"] = round(figures["detrax_median_s"] / figures["hf_median_s"], 3)
    print(f"ratio detrax / HF: {figures['ratio_detrax_vs_hf']}")
    record.finish(figures)


if __name__ == "__main__":
    main()
