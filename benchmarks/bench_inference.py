"""DETR-R50 forward latency and peak memory: detrax (JAX/XLA) against HF transformers' DETR (PyTorch), CPU.

Each (framework, shape) runs in its own subprocess so that its peak RSS is its own; both use every core.
Prints one line per measurement, the ratios detrax / PyTorch, and last a JSON object of every figure.

    .venv/bin/python benchmarks/bench_inference.py [--iters 5] [--sizes 800x1216,640x640] [--bf16]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import record


def worker_detrax(h, w, iters, bf16=False):
    import dataclasses

    import jax
    from flax import nnx

    import detrax
    from detrax.config import presets
    from detrax.models.detr import DETR

    cfg = dataclasses.replace(presets.detr_r50().model, num_classes=91)  # COCO
    det = detrax.Detector(DETR(dataclasses.replace(cfg, dtype="bfloat16") if bf16 else cfg, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
    m = np.ones((1, h, w), bool)
    t0 = time.perf_counter()
    out = jax.block_until_ready(det(x, m))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(det(x, m))
        times.append(time.perf_counter() - t0)
    res = {"compile_s": compile_s, "times": times}
    if bf16:  # accuracy against the same weights in float32
        ref = detrax.Detector(DETR(cfg, rngs=nnx.Rngs(0)))(x, m)
        res["max_box_error"] = float(np.abs(np.asarray(out["pred_boxes"]) - np.asarray(ref["pred_boxes"])).max())
    return res


def worker_torch(h, w, iters, channels_last, bf16=False):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DetrConfig(use_timm_backbone=False, num_labels=91, backbone_config=transformers.ResNetConfig(
        depths=[3, 4, 6, 3], out_features=["stage4"]))
    model = transformers.DetrForObjectDetection(cfg).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32))
    m = torch.ones((1, h, w), dtype=torch.long)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(pixel_values=x, pixel_mask=m)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(pixel_values=x, pixel_mask=m)
            times.append(time.perf_counter() - t0)
    res = {"times": times}
    if bf16:  # accuracy against the same weights in float32
        with torch.inference_mode():
            ref = model(pixel_values=x, pixel_mask=m)
        res["max_box_error"] = float((out.pred_boxes.float() - ref.pred_boxes).abs().max())
    return res


KINDS = ("detrax", "torch", "torch_cl", "detrax_bf16", "torch_bf16")  # torch_bf16: channels_last + autocast


def run_worker(kind, h, w, iters):
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--sizes", f"{h}x{w}", "--iters", str(iters)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {h}x{w} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sizes", default="800x1216,640x640")
    p.add_argument("--worker", choices=KINDS)
    p.add_argument("--bf16", action="store_true", help="also bfloat16: detrax's dtype option, PyTorch's autocast")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.worker:
        h, w = sizes[0]
        res = worker_detrax(h, w, args.iters, args.worker == "detrax_bf16") if args.worker.startswith("detrax") \
            else worker_torch(h, w, args.iters, args.worker != "torch", args.worker == "torch_bf16")
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    figures = {}
    for h, w in sizes:
        row = {}
        for kind in KINDS if args.bf16 else KINDS[:3]:
            r = run_worker(kind, h, w, args.iters)
            row[kind] = {"median_s": round(statistics.median(r["times"]), 4), "min_s": round(min(r["times"]), 4),
                         "peak_rss_mib": round(r["peak_rss_mib"], 1)}
            if "compile_s" in r:
                row[kind]["compile_s"] = round(r["compile_s"], 2)
            if "max_box_error" in r:
                row[kind]["max_box_error_vs_fp32"] = round(r["max_box_error"], 5)
            print(f"{h}x{w} {kind:9s} median {row[kind]['median_s']:.3f} s  min {row[kind]['min_s']:.3f} s  "
                  f"peak RSS {row[kind]['peak_rss_mib']:.0f} MiB" +
                  (f"  compile {row[kind]['compile_s']:.1f} s" if "compile_s" in row[kind] else ""), flush=True)
        best = min(row["torch"]["median_s"], row["torch_cl"]["median_s"])
        row["ratio_vs_torch_fp32"] = round(row["detrax"]["median_s"] / row["torch"]["median_s"], 3)
        row["ratio_vs_torch_best"] = round(row["detrax"]["median_s"] / best, 3)
        row["memory_ratio_vs_torch"] = round(row["detrax"]["peak_rss_mib"] / row["torch"]["peak_rss_mib"], 3)
        print(f"{h}x{w} ratio detrax/torch: {row['ratio_vs_torch_fp32']} (NCHW fp32), "
              f"{row['ratio_vs_torch_best']} (best of NCHW, channels_last); memory {row['memory_ratio_vs_torch']}")
        if args.bf16:
            row["ratio_bf16_vs_torch_bf16"] = round(row["detrax_bf16"]["median_s"] / row["torch_bf16"]["median_s"], 3)
            row["ratio_vs_torch_any"] = round(min(row["detrax"]["median_s"], row["detrax_bf16"]["median_s"]) / min(
                best, row["torch_bf16"]["median_s"]), 3)
            print(f"{h}x{w} bf16: detrax/torch {row['ratio_bf16_vs_torch_bf16']}; best of each, any precision: "
                  f"{row['ratio_vs_torch_any']}")
        figures[f"{h}x{w}"] = row
    record.finish(figures)


if __name__ == "__main__":
    main()
