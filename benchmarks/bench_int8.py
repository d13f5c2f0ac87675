"""int8 against float32 on a trained model, measured on the files that ship: a trained run exported to ONNX in
float32 and in int8 (`detrax export --quantize int8`: calibrated on 64 of its training images), each evaluated
through the one inference path (the same pre- and post-processing, pycocotools' AP) in XLA, ONNX Runtime and
OpenVINO, on the same images in the same run. Beside each, milliseconds per image at batch 1. Two sets:
- `demo` (the default): the `demo` run (bench_demo.py's workdir, trained there first when absent), on its val split
  (in-sample: the `demo` preset was tuned on it) and on bench_demo's 250 held-out scenes (another seed of the
  generator; no tuning saw them).
- `foreign`: `foreign_set.py`'s set (written apart from detrax's generators; 500 images, seed 7) and the `small`
  preset trained on it for `--steps` (default 4000, with its backbone warm-up; tens of minutes on 2 cores), on its
  val split (in-sample: `small` was tuned on it) and on 100 val images of another seed (8). Results file
  `bench_int8_foreign.<machine>.json`.

    .venv/bin/python benchmarks/bench_int8.py [--set demo|foreign] [--workdir DIR] [--calibration-images 64]
                                              [--calibration-method minmax|percentile] [--steps 4000]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import record


def latency_ms(infer, batch, iters: int = 20) -> float:
    args = (batch["pixels"], batch["mask"], batch["orig_size"])
    np.asarray(infer(*args)[0])  # compile / warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        np.asarray(infer(*args)[0])
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--set", choices=("demo", "foreign"), default="demo")
    p.add_argument("--workdir", help="the trained run (default: /tmp/bench_demo, /tmp/bench_int8_foreign)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--calibration-method", default="minmax", help="minmax or percentile (serving.quantize)")
    p.add_argument("--steps", type=int, default=4000, help="the foreign set's training steps")
    args = p.parse_args()
    run = args.workdir or {"demo": "/tmp/bench_demo", "foreign": "/tmp/bench_int8_foreign"}[args.set]
    if args.set == "foreign":
        train_foreign(run, args.steps)
    elif not os.path.isdir(os.path.join(run, "checkpoints")) or not os.path.isdir(os.path.join(run, "held_out")):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "bench_demo.py"), "--workdir", run], check=True)

    import detrax
    from detrax.data.sources import read_split
    from detrax.evaluation.coco import evaluate
    from detrax.serving.export import export
    from detrax.serving.infer import batches
    from detrax.serving.quantize import calibration_images, metadata

    det = detrax.load(run)
    work = tempfile.mkdtemp(prefix="bench_int8_")
    t0 = time.perf_counter()
    f32 = export(det, os.path.join(work, "demo.onnx"), "onnx")
    images, about = calibration_images(os.path.join(run, "data"), args.calibration_images)
    int8 = export(det, os.path.join(work, "demo_int8.onnx"), "onnx", quantize="int8", calibration=images,
                  calibration_about=about, calibration_method=args.calibration_method)
    figures = {"export_and_quantize_s": round(time.perf_counter() - t0, 1),
               "calibration": metadata(int8)["quantization"]["calibration"]}
    runtimes = {"xla_f32": det,
                "onnxruntime_f32": det.with_runtime("onnxruntime", onnx=f32),
                "onnxruntime_int8": det.with_runtime("onnxruntime", onnx=int8),
                "openvino_f32": det.with_runtime("openvino", onnx=f32),
                "openvino_int8": det.with_runtime("openvino", onnx=int8)}
    sets = {"val": read_split(os.path.join(run, "data"), "val"),
            "held_out": read_split(os.path.join(run, "held_out"), "val")}
    from detrax.data.coco import load_image

    one = next(batches([load_image(sets["val"].records[0])], det.preprocess, 1))
    for name, d in runtimes.items():
        row = {"ms_per_image_b1": latency_ms(d.infer, one)}
        for set_name, ds in sets.items():
            m = evaluate(d.infer, ds, det.data, class_ids=det.config.class_ids)
            row |= {f"{set_name}_AP50": round(100 * m["AP50"], 2), f"{set_name}_AP": round(100 * m["AP"], 2)}
        figures[name] = row
        print(f"{name:18s} {row}", flush=True)
    for rt in ("onnxruntime", "openvino"):
        for s in sets:
            for k in ("AP50", "AP"):
                figures[f"{rt}_int8_minus_f32_{s}_{k}"] = round(
                    figures[f"{rt}_int8"][f"{s}_{k}"] - figures[f"{rt}_f32"][f"{s}_{k}"], 2)
    if args.set == "foreign":
        figures["steps"] = args.steps
    record.finish(figures, name="bench_int8" if args.set == "demo" else "bench_int8_foreign")


def train_foreign(run: str, steps: int) -> None:
    """The foreign set in `run`/data, 100 held-out val images in `run`/held_out, and `small` trained on the first
    for `steps` (kept when its run is there: a second call evaluates only)."""
    from foreign_set import write  # beside this script

    if not os.path.isdir(os.path.join(run, "data", "annotations")):
        write(os.path.join(run, "data"), 500, seed=7)
    if not os.path.isdir(os.path.join(run, "held_out", "annotations")):
        write(os.path.join(run, "held_out"), 500, seed=8)  # its val split: 100 images
    if not os.path.isdir(os.path.join(run, "checkpoints")):
        detrax = os.path.join(os.path.dirname(sys.executable), "detrax")
        t0 = time.perf_counter()
        subprocess.run([detrax, "train", "--config", "small", "--data", os.path.join(run, "data"), "--workdir", run,
                        f"train.steps={steps}"], check=True)
        print(f"trained {steps} steps in {(time.perf_counter() - t0) / 60:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
