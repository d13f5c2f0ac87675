"""Inference throughput on the real images of ../shared/data/coco-tiny: detrax `Detector.predict` at batch 1 and
8 (DETR-R50, images resized as the official val transform), against HF transformers' DETR pipeline (image
processor + model + post_process_object_detection) on the same images in the same run. Random weights: speed
does not depend on their values.

    .venv/bin/python benchmarks/bench_predict.py [--size 800] [--max-size 1333]
"""

import argparse
import glob
import json
import os
import time

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco-tiny", "train2017")


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--data", default=ROOT)
    args = p.parse_args()
    from detrax.predict import read_image

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
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
