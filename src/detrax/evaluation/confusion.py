"""What a detector's confident detections are, at a score threshold: a confusion matrix between the true classes
and the predicted ones, with missed objects and spurious detections, and the kinds of error (as TIDE names them:
classification, localisation, duplicate, background, missed).

Each image's detections at or above the threshold, best first, take the unclaimed ground-truth object they
overlap most at IoU >= 0.5, whatever its class (a detection on a crowd region instead is left out, as COCO
leaves it); what no detection claims is missed. A detection that claims nothing is a duplicate (it overlaps an
object of its class that another claimed), localisation (its best IoU 0.1-0.5) or background (below 0.1).
"""

from __future__ import annotations

import numpy as np

KINDS = ("true", "classification", "localisation", "duplicate", "background", "missed")


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xywh box [4] with each of `boxes` [N, 4]: [N]."""
    lo = np.maximum(box[:2], boxes[:, :2])
    hi = np.minimum(box[:2] + box[2:], boxes[:, :2] + boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    return inter / np.maximum(np.prod(box[2:]) + np.prod(boxes[:, 2:], -1) - inter, 1e-12)


def outcomes(gt: dict, results: list[dict], score: float, image_ids=None) -> tuple[list, list]:
    """(detections, objects): each detection at or above `score` as (its category, the claimed object's category
    or None, kind) and each unclaimed non-crowd object as its category (missed)."""
    images = set(image_ids) if image_ids is not None else {im["id"] for im in gt["images"]}
    objects: dict = {}
    for a in gt["annotations"]:
        if a["image_id"] in images:
            objects.setdefault(a["image_id"], []).append(a)
    found: dict = {}
    for d in results:
        if d["image_id"] in images and d["score"] >= score:
            found.setdefault(d["image_id"], []).append(d)
    dets: list[tuple] = []
    missed: list[int] = []
    for image in images:
        gts = objects.get(image, [])
        boxes = np.array([a["bbox"] for a in gts], np.float64).reshape(-1, 4)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in gts], bool)
        cats = np.array([a["category_id"] for a in gts])
        claimed = np.zeros(len(gts), bool)
        for d in sorted(found.get(image, []), key=lambda d: -d["score"]):
            overlaps = iou(np.asarray(d["bbox"], np.float64), boxes) if len(gts) else np.zeros(0)
            free = np.where(~claimed & ~crowd, overlaps, -1.0)
            if free.size and free.max() >= 0.5:
                k = int(free.argmax())
                claimed[k] = True
                kind = "true" if cats[k] == d["category_id"] else "classification"
                dets.append((d["category_id"], int(cats[k]), kind))
                continue
            if np.any(crowd & (overlaps >= 0.5)):
                continue  # on a crowd region: neither true nor false
            same = overlaps[(cats == d["category_id"]) & ~crowd] if len(gts) else overlaps
            best = float(overlaps[~crowd].max()) if np.any(~crowd) else 0.0
            kind = ("duplicate" if same.size and same.max() >= 0.5 else
                    "localisation" if best >= 0.1 else "background")
            dets.append((d["category_id"], None, kind))
        missed += [int(c) for c, taken, z in zip(cats, claimed, crowd) if not taken and not z]
    return dets, missed


def confusion(gt: dict, results: list[dict], score: float, image_ids=None) -> dict:
    """{"score", "classes": [names], "matrix": rows true class + "background", columns predicted class +
    "missed"}: counts of the detections at or above `score`."""
    cats = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    index = {c: i for i, c in enumerate(cats)}
    n = len(cats)
    matrix = np.zeros((n + 1, n + 1), np.int64)
    dets, missed = outcomes(gt, results, score, image_ids)
    for predicted, true, _ in dets:
        if predicted in index:
            matrix[index[true] if true is not None else n, index[predicted]] += 1
    for true in missed:
        matrix[index[true], n] += 1
    return {"score": score, "classes": [names[c] for c in cats], "ids": cats,
            "rows": "true class, then background (spurious detections)",
            "columns": "predicted class, then missed (no detection)", "matrix": matrix.tolist()}


def error_kinds(gt: dict, results: list[dict], score: float, image_ids=None) -> dict:
    """{kind: count} of the detections at or above `score`, and the missed objects."""
    dets, missed = outcomes(gt, results, score, image_ids)
    counts = dict.fromkeys(KINDS, 0)
    for _, _, kind in dets:
        counts[kind] += 1
    counts["missed"] = len(missed)
    return {"score": score, **counts}
