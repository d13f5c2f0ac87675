"""int8 against float32 on a trained model, measured on the files that ship: the `demo` run (bench_demo.py's
workdir, trained there first when absent) exported to ONNX in float32 and in int8 (`detrax export --quantize
int8`: calibrated on 64 of its training images), each evaluated through the one inference path (the same
pre- and post-processing, pycocotools' AP) in XLA, ONNX Runtime and OpenVINO, on the same images in the same
run: the demo's val split (in-sample: the `demo` preset was tuned on it) and bench_demo's 250 held-out scenes
(another seed of the generator; no tuning saw them). Beside each, milliseconds per image at batch 1.

    .venv/bin/python benchmarks/bench_int8.py [--workdir /tmp/bench_demo] [--calibration-images 64]
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
    p.add_argument("--workdir", default="/tmp/bench_demo")
    p.add_argument("--calibration-images", type=int, default=64)
    args = p.parse_args()
    run = args.workdir
    if not os.path.isdir(os.path.join(run, "checkpoints")) or not os.path.isdir(os.path.join(run, "held_out")):
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
                  calibration_about=about)
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
    record.finish(figures)


if __name__ == "__main__":
    main()
