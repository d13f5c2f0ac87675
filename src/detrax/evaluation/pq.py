"""Panoptic quality (Kirillov et al. 2019) counted as COCO's panopticapi counts it (`pq_compute`).

Per image: a predicted and a ground-truth segment of the same category match when their IoU is above 0.5, the
union leaving out the prediction's pixels on VOID (id 0); crowd ground truth never matches. Unmatched non-crowd
ground truth is a false negative; an unmatched prediction is a false positive unless more than half of it lies
on VOID or on a crowd region of its own category. Per category PQ = sum IoU / (TP + FP / 2 + FN / 2),
SQ = sum IoU / TP, RQ = TP / (TP + FP / 2 + FN / 2), averaged over the categories that have any segment (All,
things, stuff). Segment ids are RGB in the PNGs: id = R + 256 G + 256^2 B.
"""

from __future__ import annotations

import json
import os

import numpy as np

from detrax.data.masks import rgb2id

OFFSET = 256**3
VOID = 0


def image_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories, where: str = "") -> dict:
    """One image's counts: {category_id: [sum IoU, TP, FP, FN]}. `gt_ids`, `pred_ids` [H, W] segment ids;
    `*_segments` COCO panoptic `segments_info` lists (ground truth: id, category_id, iscrowd, area — the area
    counted from `gt_ids` when absent); `categories` {id: {"isthing": 0 | 1, ...}}. Raises ValueError, naming
    `where`, for a predicted segment in the PNG and not in the list, or the other way round, or of an unknown
    category."""
    gt_ids, pred_ids = np.asarray(gt_ids, np.uint64), np.asarray(pred_ids, np.uint64)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{where}: prediction of size {pred_ids.shape} for ground truth of size {gt_ids.shape}")
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): dict(s) for s in pred_segments}
    ids, counts = np.unique(pred_ids, return_counts=True)
    for i, n in zip(ids.tolist(), counts.tolist()):
        if i == VOID:
            continue
        if i not in pred:
            raise ValueError(f"{where}: segment {i} is in the prediction's PNG but not in its segments_info")
        if pred[i]["category_id"] not in categories:
            raise ValueError(f"{where}: predicted segment {i} has unknown category_id {pred[i]['category_id']}")
        pred[i]["area"] = n
    absent = sorted(i for i, s in pred.items() if "area" not in s or i not in set(ids.tolist()))
    if absent:
        raise ValueError(f"{where}: segments {absent} are in the prediction's segments_info but not in its PNG")
    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt_ids, return_counts=True))))
    pairs, inter = np.unique(gt_ids * OFFSET + pred_ids, return_counts=True)
    overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs, inter)}  # (gt, pred) -> pixels
    stats: dict = {}
    add = lambda cat, k, v: stats.setdefault(cat, np.zeros(4)).__setitem__(k, stats[cat][k] + v)
    gt_matched, pred_matched = set(), set()
    for (g, p), n in overlap.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred[p]["area"] + gt[g].get("area", gt_area.get(g, 0)) - n - overlap.get((VOID, p), 0)
        iou = n / union
        if iou > 0.5:
            add(gt[g]["category_id"], 0, iou)
            add(gt[g]["category_id"], 1, 1)
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}  # category -> its crowd region's id (the last one listed, as panopticapi)
    for g, s in gt.items():
        if g in gt_matched:
            continue
        if s.get("iscrowd", 0) == 1:
            crowd[s["category_id"]] = g
            continue
        add(s["category_id"], 3, 1)
    for p, s in pred.items():
        if p in pred_matched:
            continue
        ignored = overlap.get((VOID, p), 0)
        if s["category_id"] in crowd:
            ignored += overlap.get((crowd[s["category_id"]], p), 0)
        if ignored / s["area"] > 0.5:  # mostly on VOID or on a crowd region of its category
            continue
        add(s["category_id"], 2, 1)
    return stats


def summarise(stats: dict, categories: dict) -> dict:
    """{"All" | "Things" | "Stuff": {pq, sq, rq, n}, "per_class": {category_id: {pq, sq, rq}}} from summed
    counts; a category without any segment counts in no average (per class: zeros)."""
    out: dict = {}
    per_class = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        for cat, info in categories.items():
            if isthing is not None and (info.get("isthing") == 1) != isthing:
                continue
            iou, tp, fp, fn = stats.get(cat, np.zeros(4)).tolist()
            if tp + fp + fn == 0:
                per_class[cat] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            c = {"pq": iou / (tp + 0.5 * fp + 0.5 * fn), "sq": iou / tp if tp else 0.0,
                 "rq": tp / (tp + 0.5 * fp + 0.5 * fn)}
            per_class[cat] = c
            pq, sq, rq = pq + c["pq"], sq + c["sq"], rq + c["rq"]
        out[name] = {"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0, "n": n}
    out["per_class"] = per_class
    return out


def accumulate(total: dict, stats: dict) -> dict:
    for cat, v in stats.items():
        total[cat] = total.get(cat, np.zeros(4)) + v
    return total


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return rgb2id(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such panoptic PNG") from None
    except OSError as e:
        raise ValueError(f"{path}: not a readable PNG ({e})") from None


def pq_compute(gt_json: str, pred_json: str, gt_folder: str | None = None, pred_folder: str | None = None) -> dict:
    """panopticapi's `pq_compute` on files: COCO panoptic JSONs and their PNG folders (by default beside each
    JSON, named as it without `.json`). Every ground-truth image needs a prediction."""
    gt_folder = gt_folder or os.fspath(gt_json).removesuffix(".json")
    pred_folder = pred_folder or os.fspath(pred_json).removesuffix(".json")
    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        pred = json.load(f)
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    total: dict = {}
    for a in gt["annotations"]:
        if a["image_id"] not in preds:
            raise ValueError(f"{pred_json}: no prediction for image {a['image_id']}")
        p = preds[a["image_id"]]
        where = f"{pred_json}, image {a['image_id']}"
        accumulate(total, image_stats(_read_png(os.path.join(gt_folder, a["file_name"])), a["segments_info"],
                                      _read_png(os.path.join(pred_folder, p["file_name"])), p["segments_info"],
                                      categories, where))
    return summarise(total, categories)
