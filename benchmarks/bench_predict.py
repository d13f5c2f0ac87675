"""Inference throughput on the real images of tests/data/coco-tiny: detrax `Detector.predict` at batch 1 and
8 (DETR-R50, images resized as the official val transform), against HF transformers' DETR pipeline (image
processor + model + post_process_object_detection) on the same images in the same run. Random weights: speed
does not depend on their values.

    .venv/bin/python benchmarks/bench_predict.py [--size 800] [--max-size 1333]

`--forward-only` measures the batch effect alone: the DETR-R50 forward at 800x1216 per image, alone, in a batch
of 4, and in a batch of 4 run image by image inside one compiled call (`Detector(per_image=True)`).
"""

import argparse
import glob
import json
import os
import time

import record

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "coco-tiny", "train2017")


def run_detrax(images, batch, size, max_size):
    import detrax

    det = detrax.load("random:detr_r50")
    det.predict(images, threshold=0.7, batch_size=batch, size=size, max_size=max_size)  # compile every bucket
    t0 = time.perf_counter()
    det.predict(images, threshold=0.7, batch_size=batch, size=size, max_size=max_size)
    return len(images) / (time.perf_counter() - t0)


def run_hf(images, batch, size, max_size):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DetrConfig(use_timm_backbone=False, num_labels=91, backbone_config=transformers.ResNetConfig(
        depths=[3, 4, 6, 3], out_features=["stage4"]))
    model = transformers.DetrForObjectDetection(cfg).eval()
    proc = transformers.models.detr.image_processing_pil_detr.DetrImageProcessorPil(
        size={"shortest_edge": size, "longest_edge": max_size})

    def once():
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                chunk = images[i:i + batch]
                inputs = proc(images=chunk, return_tensors="pt")
                out = model(**inputs)
                proc.post_process_object_detection(out, threshold=0.7,
                                                   target_sizes=[(im.height, im.width) for im in chunk])

    once()
    t0 = time.perf_counter()
    once()
    return len(images) / (time.perf_counter() - t0)


def forward_batch_effect(h=800, w=1216, batch=4) -> dict:
    import jax
    import numpy as np

    import detrax

    model = detrax.load("random:detr_r50").model
    figures = {}
    for name, per_image, b in (("alone", False, 1), ("batched", False, batch), ("per_image", True, batch)):
        det = detrax.Detector(model, per_image=per_image)
        x, m = np.zeros((b, h, w, 3), np.float32), np.ones((b, h, w), bool)
        jax.block_until_ready(det(x, m))  # compile
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(det(x, m))
            times.append(time.perf_counter() - t0)
        figures[f"forward_s_per_image_{name}"] = round(min(times) / b, 3)
    print(f"DETR-R50 forward {h}x{w}, seconds per image: alone {figures['forward_s_per_image_alone']}, batch of "
          f"{batch} {figures['forward_s_per_image_batched']}, batch of {batch} image by image "
          f"{figures['forward_s_per_image_per_image']}", flush=True)
    return figures


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--data", default=ROOT)
    args = p.parse_args()
    if args.forward_only:
        print(json.dumps(forward_batch_effect()))
        return
    from detrax.serving.images import read_image

    images = [read_image(f) for f in sorted(glob.glob(os.path.join(args.data, "*.jpg")))]
    figures = {"images": len(images)}
    for batch in (1, 8):
        ours = run_detrax(images, batch, args.size, args.max_size)
        theirs = run_hf(images, batch, args.size, args.max_size)
        figures[f"detrax_images_per_s_batch{batch}"] = round(ours, 3)
        figures[f"hf_images_per_s_batch{batch}"] = round(theirs, 3)
        figures[f"time_ratio_detrax_vs_hf_batch{batch}"] = round(theirs / ours, 3)
        print(f"batch {batch}: detrax {ours:.2f} img/s, HF pipeline {theirs:.2f} img/s, "
              f"per-image time ratio detrax/HF {theirs / ours:.2f}", flush=True)
    record.finish(figures)


if __name__ == "__main__":
    main()
