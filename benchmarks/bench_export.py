"""DETR-R50 inference on the CPU in the runtimes people deploy with: detrax's XLA, and detrax exported to ONNX
(`detrax export --format onnx`, any batch and size) run by ONNX Runtime and OpenVINO (fp32; bf16 where the CPU
has bfloat16 instructions), and quantized to int8 (`--quantize int8`, calibrated on 8 synthetic scenes) in both,
against HF transformers' DETR in PyTorch (fp32 NCHW, fp32 channels_last, bf16 autocast). Same architecture,
random weights (speed does not depend on their values), 91 classes. (int8's accuracy: bench_int8.py.)

    .venv/bin/python benchmarks/bench_export.py [--sizes 800x1216,640x640] [--batches 1,4] [--threads 1,2]
                                                [--iters 3]

Each framework runs in its own process per thread count (pinned to that many cores; ONNX Runtime's, OpenVINO's
and PyTorch's thread counts set to it), over every size and batch. Prints one line per measurement (median seconds
per call), the CPU model, how far each detrax runtime's outputs are from XLA's, and last one JSON object whose
`ratio_<size>_b<batch>` keys are detrax's best runtime over PyTorch's best setting (any precision),
`ratio_float_...` detrax's best float runtime over the same, and `ratio_fp32_...` detrax's best fp32 over
PyTorch's best fp32, at the largest thread count; the same keys ending `_t<n>` at each other count n.
PyTorch's bf16 autocast on a CPU without bfloat16 instructions is several times slower than its fp32: there it
runs once per shape (`--slow-iters`), at the largest thread count only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import record


def cpu() -> dict:
    return {"model": record.cpu(), "bf16": record.isa() in ("amx", "avx512-bf16"), "cores": os.cpu_count()}


def inputs(b, h, w):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    return pixels, np.ones((b, h, w), bool)


def timed(fn, iters):
    fn()  # compile / warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def detector():
    import dataclasses

    from flax import nnx

    import detrax
    from detrax.config import presets

    cfg = dataclasses.replace(presets.detr_r50().model, num_classes=91)
    return detrax.Detector(detrax.DETR(cfg, rngs=nnx.Rngs(0)))


def pin(threads: int) -> None:
    """This process on `threads` cores (XLA sizes its pool by the cores it may run on)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def worker_detrax(shapes, iters, bf16_cpu, threads, work):
    pin(threads)
    import jax

    from detrax.serving.export import export
    from detrax.serving.infer import normalized, run_model

    det = detector()
    onnx, int8 = os.path.join(work, "detr.onnx"), os.path.join(work, "detr_int8.onnx")
    rows = {}
    if not os.path.exists(int8):  # the first worker exports and quantizes; the others read its files
        t0 = time.perf_counter()
        export(det, onnx, "onnx")
        files = [onnx, *(f"{onnx}.data" for _ in [0] if os.path.exists(f"{onnx}.data"))]  # weights beside it
        rows = {"export_s": round(time.perf_counter() - t0, 1),
                "onnx_mib": round(sum(os.path.getsize(f) for f in files) / 2**20)}
        from detrax.data.synthetic import scene
        from detrax.serving.quantize import calibration_batches, quantize_onnx

        rng = np.random.default_rng(1)  # int8: calibrated on synthetic scenes (speed does not depend on weights)
        t0 = time.perf_counter()
        quantize_onnx(onnx, int8, calibration_batches(det, [scene(rng, 480, 640)[0] for _ in range(8)]))
        rows["quantize_s"] = round(time.perf_counter() - t0, 1)
    model = det.model
    heads = lambda o: (o["pred_logits"], o["pred_boxes"])
    xla = jax.jit(lambda p, m: heads(run_model(model, normalized(model, p, m), m)))  # Detector's forward

    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(f, options, providers=["CPUExecutionProvider"])
                for k, f in (("onnxruntime", onnx), ("onnxruntime_int8", int8))}
    core = ov.Core()
    compiled = {f"{k}{p}": core.compile_model(f, "CPU", {"INFERENCE_PRECISION_HINT": p,
                                                           "INFERENCE_NUM_THREADS": threads})
                for k, f in (("", onnx), ("int8_", int8)) for p in (("f32", "bf16") if bf16_cpu else ("f32",))}
    runs = {"detrax_xla": lambda p, m: jax.block_until_ready(xla(p, m)),
            **{f"detrax_{k}": (lambda s: lambda p, m: s.run(None, {"pixels": p, "mask": m}))(s)
               for k, s in sessions.items()},
            **{f"detrax_openvino_{k}": (lambda c: lambda p, m: list(c({"pixels": p, "mask": m}).values()))(c)
               for k, c in compiled.items()}}
    for b, h, w in shapes:
        p, m = inputs(b, h, w)
        want = [np.asarray(a) for a in runs["detrax_xla"](p, m)]
        for name, fn in runs.items():
            got = fn(p, m)
            err = max(float(np.abs(np.asarray(g, np.float32) - x).max()) for g, x in zip(got, want))
            rows[f"{name} {h}x{w} b{b}"] = {"s": round(timed(lambda: fn(p, m), iters), 4), "max_diff_vs_xla": err}
            print(name, h, w, b, rows[f"{name} {h}x{w} b{b}"], file=sys.stderr, flush=True)
    return rows


def worker_torch(shapes, iters, slow_iters, bf16_cpu, threads, slow_too):
    pin(threads)
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.DetrConfig(use_timm_backbone=False, num_labels=91, backbone_config=transformers.ResNetConfig(
        depths=[3, 4, 6, 3], out_features=["stage4"]))
    model = transformers.DetrForObjectDetection(cfg).eval()
    rows = {}
    for kind in ("torch_fp32_nchw", "torch_fp32_channels_last", *(("torch_bf16_autocast",) if slow_too else ())):
        channels_last = kind != "torch_fp32_nchw"
        m = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        bf16 = kind == "torch_bf16_autocast"
        for b, h, w in shapes:
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((b, 3, h, w)).astype(np.float32))
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            mask = torch.ones((b, h, w), dtype=torch.long)

            def run():
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    m(pixel_values=x, pixel_mask=mask)

            n = slow_iters if bf16 and not bf16_cpu else iters
            rows[f"{kind} {h}x{w} b{b}"] = {"s": round(timed(run, n), 4)}
            print(kind, h, w, b, rows[f"{kind} {h}x{w} b{b}"], file=sys.stderr, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="800x1216,640x640")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", default="1,2", help="thread (core) counts, each a run of both frameworks")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--slow-iters", type=int, default=1)
    p.add_argument("--worker", choices=("detrax", "torch"))
    p.add_argument("--work", help=argparse.SUPPRESS)  # the workers' shared folder (the exported files)
    p.add_argument("--largest", action="store_true", help=argparse.SUPPRESS)  # the worker's count is the largest
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    shapes = [(b, h, w) for h, w in sizes for b in map(int, args.batches.split(","))]
    counts = sorted(int(t) for t in args.threads.split(","))
    info = cpu()
    if args.worker == "detrax":
        print(json.dumps(worker_detrax(shapes, args.iters, info["bf16"], counts[0], args.work)))
        return
    if args.worker == "torch":  # bf16 autocast without bf16 instructions: slow, and at the largest count only
        slow_too = info["bf16"] or args.largest
        print(json.dumps(worker_torch(shapes, args.iters, args.slow_iters, info["bf16"], counts[0], slow_too)))
        return
    if counts[-1] > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads {counts[-1]}: this machine lets the benchmark run on "
                         f"{len(os.sched_getaffinity(0))} cores")
    print(f"CPU: {info['model']}, {info['cores']} cores, bfloat16 instructions: {info['bf16']}", flush=True)
    work = tempfile.mkdtemp(prefix="bench_export_")
    figures = {"cpu": info["model"], "bf16_instructions": info["bf16"], "threads": counts}
    for n in reversed(counts):  # the largest first: it exports and quantizes
        rows = {}
        for worker in ("detrax", "torch"):
            cmd = [sys.executable, __file__, "--worker", worker, "--sizes", args.sizes, "--batches", args.batches,
                   "--iters", str(args.iters), "--slow-iters", str(args.slow_iters), "--threads", str(n),
                   "--work", work, *(["--largest"] if n == counts[-1] else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{worker} ({n} threads) failed:\n{out.stderr[-3000:]}")
            rows.update(json.loads(out.stdout.strip().splitlines()[-1]))
        if "export_s" in rows:
            figures.update({k: rows.pop(k) for k in ("export_s", "onnx_mib", "quantize_s")})
            print(f"ONNX export {figures['export_s']} s, {figures['onnx_mib']} MiB")
        figures.update(ratios(rows, shapes, "" if n == counts[-1] else f"_t{n}", n))
    record.finish(figures)


def ratios(rows: dict, shapes: list, suffix: str, threads: int) -> dict:
    """The figures of one thread count's rows, their keys ending `suffix`."""
    figures = {}
    for b, h, w in shapes:
        key = f"{h}x{w} b{b}"
        here = {k.split()[0]: v for k, v in rows.items() if k.endswith(key)}
        for name, v in here.items():
            diff = f"  outputs within {v['max_diff_vs_xla']:.1e} of XLA's" if "max_diff_vs_xla" in v else ""
            print(f"{threads}T {key:14s} {name:28s} {v['s']:8.3f} s{diff}")
        ours = min((v["s"], k) for k, v in here.items() if k.startswith("detrax"))
        ours_float = min((v["s"], k) for k, v in here.items() if k.startswith("detrax") and "int8" not in k)
        ours_fp32 = min((v["s"], k) for k, v in here.items() if k.startswith("detrax") and "int8" not in k
                        and "bf16" not in k)
        torch_any = min((v["s"], k) for k, v in here.items() if k.startswith("torch"))
        torch_fp32 = min((v["s"], k) for k, v in here.items() if k.startswith("torch_fp32"))
        tag = f"{h}x{w}_b{b}{suffix}"
        figures[f"ratio_{tag}"] = round(ours[0] / torch_any[0], 3)
        figures[f"ratio_float_{tag}"] = round(ours_float[0] / torch_any[0], 3)
        figures[f"ratio_fp32_{tag}"] = round(ours_fp32[0] / torch_fp32[0], 3)
        figures.update({f"{k}_{tag}_s": v["s"] for k, v in here.items()})
        print(f"{threads}T {key:14s} detrax best ({ours[1]}) / PyTorch best ({torch_any[1]}): "
              f"{figures[f'ratio_{tag}']}; detrax best float ({ours_float[1]}): {figures[f'ratio_float_{tag}']}; "
              f"detrax best fp32 ({ours_fp32[1]}) / PyTorch best fp32 ({torch_fp32[1]}): "
              f"{figures[f'ratio_fp32_{tag}']}", flush=True)
    return figures


if __name__ == "__main__":
    main()
