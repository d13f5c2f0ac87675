"""Why a detector misses, read from pycocotools' own evaluation state (a `COCOeval` after `evaluate()` and
`accumulate()`): per-class AP, AP50 and AR with each class's ground-truth count, the precision-recall curve of
each class at IoU 0.5, and the score threshold that maximises F1 (IoU 0.5) per class and over all classes.

Per-class AP is COCOeval's own precision table sliced at the class (what `COCOeval` with `catIds=[k]` gives:
classes are evaluated apart); the F1 threshold walks COCOeval's per-image matches (`evalImgs`: area all, 100
detections), as `accumulate` does, at IoU 0.5.
"""

from __future__ import annotations

import numpy as np


def _mean(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean()) if x.size else -1.0


def per_class(ev) -> list[dict]:
    """[{id, name, gt, AP, AP50, AR}] for each evaluated category (-1 where it has no ground truth)."""
    p = ev.eval["precision"]  # [T, R, K, A, M]
    r = ev.eval["recall"]  # [T, K, A, M]
    gt = _gt_counts(ev)
    names = {c["id"]: c["name"] for c in ev.cocoGt.dataset["categories"]}
    return [{"id": int(k), "name": names.get(k, str(k)), "gt": gt.get(k, 0), "AP": _mean(p[:, :, i, 0, -1]),
             "AP50": _mean(p[0, :, i, 0, -1]), "AR": _mean(r[:, i, 0, -1])} for i, k in enumerate(ev.params.catIds)]


def _gt_counts(ev) -> dict:
    """{category: its ground-truth objects that count (not crowd) in the evaluated images}."""
    images = set(ev.params.imgIds)
    counts: dict = {}
    for a in ev.cocoGt.dataset["annotations"]:
        if a["image_id"] in images and not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    return counts


def pr_curves(ev) -> dict:
    """{category: precision at COCO's 101 recall points, IoU 0.5, area all, 100 detections} (-1 past the class's
    highest recall), and the recall points under "recall"."""
    p = ev.eval["precision"]
    return {"recall": [float(v) for v in ev.params.recThrs],
            **{int(k): [float(v) for v in p[0, :, i, 0, -1]] for i, k in enumerate(ev.params.catIds)}}


def thresholds(ev) -> dict:
    """{"overall": {...}, "per_class": {id: {...}}}, each {"threshold", "f1", "precision", "recall"}: the score
    above which detections give the best F1 at IoU 0.5 (halfway between the last detection kept and the first
    dropped; None where there is no ground truth)."""
    per: dict = {}
    pooled: list = [[], [], 0]
    for k in ev.params.catIds:
        scores, hits, npig = _matches(ev, k)
        per[int(k)] = _best_f1(scores, hits, npig)
        pooled[0].append(scores)
        pooled[1].append(hits)
        pooled[2] += npig
    overall = _best_f1(np.concatenate(pooled[0]) if pooled[0] else np.zeros(0),
                       np.concatenate(pooled[1]) if pooled[1] else np.zeros(0, bool), pooled[2])
    return {"iou": 0.5, "overall": overall, "per_class": per}


def _matches(ev, category) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, true at IoU 0.5) of the category's detections that count, and its ground truth that counts,
    from `evalImgs` as `accumulate` reads them (area all, the largest maxDets)."""
    k = ev.params.catIds.index(category)
    n_area, n_img = len(ev.params.areaRng), len(ev.params.imgIds)
    max_det = ev.params.maxDets[-1]
    scores, hits, npig = [], [], 0
    for e in ev.evalImgs[k * n_area * n_img:k * n_area * n_img + n_img]:  # area index 0: all
        if e is None:
            continue
        keep = ~e["dtIgnore"][0, :max_det].astype(bool)
        scores.append(np.asarray(e["dtScores"][:max_det])[keep])
        hits.append(e["dtMatches"][0, :max_det][keep] > 0)
        npig += int(np.count_nonzero(e["gtIgnore"] == 0))
    return (np.concatenate(scores) if scores else np.zeros(0), np.concatenate(hits) if hits else np.zeros(0, bool),
            npig)


def _best_f1(scores: np.ndarray, hits: np.ndarray, npig: int) -> dict:
    if npig == 0 or scores.size == 0:
        return {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    order = np.argsort(-scores, kind="mergesort")  # as accumulate sorts
    s, tp = scores[order], np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every detection of its score
    precision, recall = tp / (tp + fp), tp / npig
    f1 = np.where(last, 2 * precision * recall / np.maximum(precision + recall, 1e-12), -1.0)
    i = int(np.argmax(f1))
    if f1[i] <= 0:  # nothing true: no score helps
        return {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    cut = (s[i] + s[i + 1]) / 2 if i + 1 < s.size else s[i] / 2  # between the last kept and the first dropped
    return {"threshold": float(cut), "f1": float(f1[i]), "precision": float(precision[i]),
            "recall": float(recall[i])}
