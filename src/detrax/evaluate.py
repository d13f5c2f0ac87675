"""COCO box AP with pycocotools, with the official val transform and post-processing (all queries kept), on
the one inference path (`infer`)."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np

from detrax.data.loader import Augment, Loader, dataset
from detrax.data.sources import ground_truth

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def predict_dataset(infer, records, data_cfg, batch_size: int, multiple: int = 1) -> list[dict]:
    """COCO results (image_id, category_id, bbox as x, y, w, h, score) for every query of every image.
    `infer(pixels uint8, mask, orig_size)` -> (scores, labels, boxes), as `infer.make_infer` gives; its batches
    hold a multiple of `multiple` images (the devices they are sharded over)."""
    augment = Augment(False, data_cfg)
    ds = dataset(records, augment, batch_size, max_targets=data_cfg.max_targets, step=data_cfg.bucket_step,
                 multiple=multiple)
    results = []
    with Loader(ds) as loader:
        for batch in loader:
            scores, labels, boxes = (np.asarray(x) for x in infer(batch["pixels"], batch["mask"], batch["orig_size"]))
            for i in np.flatnonzero(batch["real"]):
                for s, lab, (x0, y0, x1, y1) in zip(scores[i], labels[i], boxes[i]):
                    results.append({"image_id": int(batch["image_id"][i]), "category_id": int(lab),
                                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                    "score": float(s)})
    return results


def coco_ap(annotations, results: list[dict], image_ids=None, quiet: bool = True) -> dict:
    """pycocotools' COCOeval on `results` against `annotations` (a COCO file or dict): AP, AP50, AP75, APs, APm,
    APl."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        if isinstance(annotations, dict):
            gt = COCO()
            gt.dataset = annotations
            gt.createIndex()
        else:
            gt = COCO(annotations)
        if not results:
            return dict.fromkeys(KEYS, 0.0)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(KEYS, ev.stats[:6])}


def evaluate(infer, dataset_, data_cfg, batch_size: int = 8, out_dir: str | None = None, multiple: int = 1) -> dict:
    """AP of `infer` (see `predict_dataset`) on a `data.coco.Dataset`; with `out_dir`, writes metrics.json and
    results.json there."""
    results = predict_dataset(infer, dataset_.records, data_cfg, batch_size, multiple)
    gt = ground_truth(dataset_)
    ids = [im["id"] for im in gt["images"]] if isinstance(gt, dict) else [r["image_id"] for r in dataset_.records]
    metrics = coco_ap(gt, results, ids)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    return metrics
