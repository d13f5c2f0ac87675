"""An independent rendering of COCO panopticapi's `pq_compute` (evaluation.py: pq_compute_single_core and
PQStat.pq_average) on in-memory id maps, as the reference for detrax.evaluation.pq. Not installable from PyPI."""

from collections import defaultdict

import numpy as np

OFFSET, VOID = 256 * 256 * 256, 0


def single_image(pan_gt, gt_info, pan_pred, pred_info, categories, stat):
    gt_segms = {el["id"]: dict(el) for el in gt_info}
    pred_segms = {el["id"]: dict(el) for el in pred_info}
    left = set(pred_segms)
    for label, cnt in zip(*np.unique(pan_pred, return_counts=True)):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(f"segment {label} in PNG, not in JSON")
        pred_segms[label]["area"] = cnt
        left.remove(label)
        if pred_segms[label]["category_id"] not in categories:
            raise KeyError("unknown category")
    if left:
        raise KeyError(f"segments {left} in JSON, not in PNG")
    joint = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
    gt_pred = {(int(lab // OFFSET), int(lab % OFFSET)): n for lab, n in zip(*np.unique(joint, return_counts=True))}
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in gt_pred.items():
        if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"] == 1:
            continue
        if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
            continue
        union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            stat[gt_segms[g]["category_id"]]["tp"] += 1
            stat[gt_segms[g]["category_id"]]["iou"] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}
    for g, info in gt_segms.items():
        if g in gt_matched:
            continue
        if info["iscrowd"] == 1:
            crowd[info["category_id"]] = g
            continue
        stat[info["category_id"]]["fn"] += 1
    for p, info in pred_segms.items():
        if p in pred_matched:
            continue
        inter = gt_pred.get((VOID, p), 0)
        if info["category_id"] in crowd:
            inter += gt_pred.get((crowd[info["category_id"]], p), 0)
        if inter / info["area"] > 0.5:
            continue
        stat[info["category_id"]]["fp"] += 1


def new_stat():
    return defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})


def average(stat, categories, isthing):
    pq = sq = rq = 0.0
    n = 0
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = stat[label]
        if s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        pq += s["iou"] / denom
        sq += s["iou"] / s["tp"] if s["tp"] else 0
        rq += s["tp"] / denom
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
