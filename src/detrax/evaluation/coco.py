"""COCO box AP with pycocotools, with the official val transform and post-processing (all queries kept), on
the one inference path (`infer`); on panoptic data, PQ, SQ and RQ as panopticapi counts them."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np

from detrax.data.loader import Augment, Loader, dataset
from detrax.data.masks import rle_encode
from detrax.data.sources import ground_truth
from detrax.serving.infer import BATCH_SIZE

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _outputs(infer, records, data_cfg, batch_size: int, multiple: int):
    """The one loop over a dataset's records: `infer(pixels uint8, mask, orig_size)` on the val transform's
    batches, which hold a multiple of `multiple` images (the devices they are sharded over). Yields (batch,
    outputs as NumPy arrays, i) for every real image i of every batch."""
    ds = dataset(records, Augment(False, data_cfg), batch_size, max_targets=data_cfg.max_targets,
                 step=data_cfg.bucket_step, multiple=multiple)
    with Loader(ds) as loader:
        for batch in loader:
            batch = {k: v for k, v in batch.items() if k != "masks"}  # the targets' masks are not needed here
            out = [np.asarray(x) for x in infer(batch["pixels"], batch["mask"], batch["orig_size"])]
            for i in np.flatnonzero(batch["real"]):
                yield batch, out, int(i)


def predict_dataset(infer, records, data_cfg, batch_size: int, multiple: int = 1, masks: bool = False) -> list[dict]:
    """COCO results (image_id, category_id, bbox as x, y, w, h, score) for every query of every image.
    `infer(pixels uint8, mask, orig_size)` -> (scores, labels, boxes), as `infer.make_infer` gives. With `masks`
    (an infer made with masks=True), each result's `segmentation` too: its mask at the original size as RLE (the
    official PostProcessSegm: every query's mask, thresholded at 0.5)."""
    from detrax.serving.panoptic import instance_masks

    results: list[dict] = []
    for batch, out, i in _outputs(infer, records, data_cfg, batch_size, multiple):
        scores, labels, boxes = out[:3]
        first = len(results)
        for s, lab, (x0, y0, x1, y1) in zip(scores[i], labels[i], boxes[i]):
            results.append({"image_id": int(batch["image_id"][i]), "category_id": int(lab),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(s)})
        if masks:
            found = instance_masks(out[4][i], tuple(batch["size"][i]), tuple(batch["orig_size"][i]))
            for r, rle in zip(results[first:], rle_encode(found)):
                r["segmentation"] = rle
    return results


def coco_ap(annotations, results: list[dict], image_ids=None, quiet: bool = True, iou_type: str = "bbox") -> dict:
    """pycocotools' COCOeval (`iou_type` bbox or segm) on `results` against `annotations` (a COCO file or dict):
    AP, AP50, AP75, APs, APm, APl."""
    return _numbers(cocoeval(annotations, results, image_ids, quiet, iou_type))


def metric_names(task: str) -> tuple[str, ...]:
    """The numbers `evaluate` gives for a dataset of `task` (detection, segm, panoptic)."""
    if task == "panoptic":
        return tuple(f"{m}{s}" for s in ("", "_th", "_st") for m in ("PQ", "SQ", "RQ"))
    return KEYS + (tuple(f"mask_{k}" for k in KEYS) if task == "segm" else ())


def _numbers(ev) -> dict:
    return dict.fromkeys(KEYS, 0.0) if ev is None else {k: float(v) for k, v in zip(KEYS, ev.stats[:6])}


def cocoeval(annotations, results: list[dict], image_ids=None, quiet: bool = True, iou_type: str = "bbox"):
    """The COCOeval behind `coco_ap`, evaluated, accumulated and summarised (None without results)."""
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
            return None
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def panoptic_quality(infer, dataset_, data_cfg, batch_size: int, multiple: int = 1, class_ids=()) -> dict:
    """PQ, SQ, RQ (all, things, stuff) of `infer` (made with `masks=True`) on a panoptic `data.coco.Dataset`:
    each image's segments (`panoptic.panoptic_segments` at its original size) against its ground-truth PNG."""
    from detrax.data.coco_panoptic import load_ids
    from detrax.evaluation.pq import accumulate, image_stats, summarise
    from detrax.serving.panoptic import panoptic_segments

    records = {r["image_id"]: r for r in dataset_.records}
    categories = {c: {"isthing": int(dataset_.isthing.get(c, True))} for c in dataset_.names}
    total: dict = {}
    for batch, out, i in _outputs(infer, dataset_.records, data_cfg, batch_size, multiple):
        r = records[int(batch["image_id"][i])]
        ids, segments = panoptic_segments(out[3][i], out[4][i], tuple(batch["size"][i]),
                                          tuple(batch["orig_size"][i]), dataset_.isthing, class_ids)
        gt_segments = [{"id": int(k), "category_id": int(c), "iscrowd": int(z)} | ({"area": a} if a else {})
                       for k, c, z, a in zip(r["segment_ids"], r["labels"], r["iscrowd"], r["areas"])]
        accumulate(total, image_stats(load_ids(r), gt_segments, ids, segments, categories, r["panoptic_png"]))
    s = summarise(total, categories)
    return {f"{m}{suffix}": float(s[name][m.lower()]) for name, suffix in (("All", ""), ("Things", "_th"),
                                                                          ("Stuff", "_st")) for m in ("PQ", "SQ", "RQ")}


def evaluate(infer, dataset_, data_cfg, batch_size: int = BATCH_SIZE, out_dir: str | None = None, multiple: int = 1,
             class_ids=(), diagnose: bool = False) -> dict:
    """AP of `infer` (see `predict_dataset`) on a `data.coco.Dataset` (PQ on a panoptic one: `panoptic_quality`);
    with `out_dir`, writes metrics.json (and the box results, results.json) there, and with `diagnose` the box
    diagnostics (`diagnostics.diagnose`: per class, precision-recall, thresholds, confusion, errors)."""
    if dataset_.task == "panoptic":
        return _written(panoptic_quality(infer, dataset_, data_cfg, batch_size, multiple, class_ids), out_dir)
    segm = dataset_.task == "segm"
    results = predict_dataset(infer, dataset_.records, data_cfg, batch_size, multiple, masks=segm)
    gt = ground_truth(dataset_)
    ids = [im["id"] for im in gt["images"]] if isinstance(gt, dict) else [r["image_id"] for r in dataset_.records]
    ev = cocoeval(gt, results, ids)
    metrics = _numbers(ev)
    if diagnose and out_dir and ev is not None:
        from detrax.evaluation.diagnostics import diagnose as write_diagnostics

        write_diagnostics(ev, ev.cocoGt.dataset, results, out_dir)
    if segm:  # and the masks' AP, as the official coco_evaluator's segm
        metrics.update({f"mask_{k}": v for k, v in coco_ap(gt, results, ids, iou_type="segm").items()})
    return _written(metrics, out_dir, results)


def _written(metrics: dict, out_dir: str | None, results: list | None = None) -> dict:
    """`metrics` (and the box results), written to metrics.json (results.json) in `out_dir` when given."""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        if results is not None:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
    return metrics


def accuracy_kept(detector, other, data: str, name: str, tolerance: float) -> dict:
    """AP50 and AP of `detector` (float32) and of `other` (the same model quantized or in another runtime, named
    `name`) on the first val split of the data folder `data`, and whether `other` keeps the AP50 within
    `tolerance` points."""
    from detrax.config import schema
    from detrax.data.sources import list_splits, read_split

    val = [s for s in list_splits(data) if s.startswith("val")]
    if not val:
        return {"skipped": f"{data} has no val split"}
    ds, data_cfg = read_split(data, val[0]), detector.data or schema.DataConfig()
    scores = {key: evaluate(d.infer, ds, data_cfg, class_ids=detector.config.class_ids)
              for key, d in (("float32", detector), (name, other))}
    out = {"split": val[0], **{f"{key}_{k}": round(100 * m[k], 2) for key, m in scores.items() for k in ("AP50", "AP")}}
    return out | {"within_tolerance": out[f"{name}_AP50"] >= out["float32_AP50"] - tolerance}
