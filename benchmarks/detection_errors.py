"""What keeps a detector's AP50 down: its detections (a COCO results JSON, as `detrax eval --out` writes) against
the ground truth, split into the errors that cost precision.

    .venv/bin/python benchmarks/detection_errors.py RESULTS.json INSTANCES.json [SCORE=0.3]

Prints AP50 as pycocotools gives it; class-agnostic AP50 (every category one: what localisation alone gives);
both again after a class-agnostic NMS at IoU 0.5 (what duplicates cost: DETR has no NMS, its set loss must
teach the queries not to repeat each other); and, among the detections scoring at least SCORE, the kinds of
error as `detrax eval` counts them (`detrax.evaluation.confusion.error_kinds`, its errors.json: true,
classification, localisation, duplicate, background, and the objects missed). The last line is one JSON object
of these figures.
"""

import contextlib
import copy
import io
import json
import sys

import numpy as np
import record
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detrax.evaluation.confusion import error_kinds, iou


def ap50(gt: dict, dets: list) -> float:
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1])


def agnostic(gt: dict, dets: list) -> tuple[dict, list]:
    gt = dict(gt, categories=[{"id": 1, "name": "object"}],
              annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    return gt, [dict(d, category_id=1) for d in dets]


def by_image(items: list) -> dict:
    out: dict = {}
    for d in items:
        out.setdefault(d["image_id"], []).append(d)
    return out


def nms(dets: list, threshold: float = 0.5) -> list:
    kept = []
    for ds in by_image(dets).values():
        mine: list = []
        for d in sorted(ds, key=lambda d: -d["score"]):
            if not mine or iou(np.array(d["bbox"]), np.array([k["bbox"] for k in mine])).max() <= threshold:
                mine.append(d)
        kept += mine
    return kept


def main(results: str, instances: str, score: float = 0.3) -> dict:
    try:
        dets, gt = json.load(open(results)), json.load(open(instances))
    except (OSError, ValueError) as e:
        sys.exit(f"detection_errors: cannot read {e.filename if isinstance(e, OSError) else results}: {e}")
    deduped = nms(dets)
    figures = {"AP50": ap50(gt, dets), "AP50_agnostic": ap50(*agnostic(gt, dets)),
               "AP50_nms": ap50(gt, deduped), "AP50_agnostic_nms": ap50(*agnostic(gt, deduped)),
               **error_kinds(gt, dets, score)}
    print(f"AP50 {figures['AP50']:.3f}, class-agnostic {figures['AP50_agnostic']:.3f}; after NMS at IoU 0.5: "
          f"{figures['AP50_nms']:.3f}, class-agnostic {figures['AP50_agnostic_nms']:.3f}")
    print(f"detections scoring >= {score}: {figures['true']} true, {figures['classification']} of another class, "
          f"{figures['localisation']} misplaced (IoU 0.1-0.5), {figures['duplicate']} duplicates, "
          f"{figures['background']} on background; {figures['missed']} objects missed")
    record.finish({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
    return figures


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(float(a) for a in sys.argv[3:]))
