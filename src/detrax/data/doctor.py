"""`detrax data check`: read a dataset as training would and report every bad input."""

from __future__ import annotations

from typing import Any

from detrax.data import sources
from detrax.data.coco import DataError, load_image
from detrax.data.coco_panoptic import load_masks


def check(root: str, split: str | None = None, max_targets: int = 100) -> dict:
    """`root`: any data source (a COCO-format folder, `tfds:...`, a registered one). One report per split:
    images, boxes (after the crowd and degenerate rules), categories, and every problem with its file and id
    (unparseable entries, missing or unreadable images and panoptic PNGs, sizes that disagree with the
    annotations, images with more boxes than `max_targets`); COCO panoptic splits too, as "{split} (panoptic)".
    `ok` is False if anything is bad."""
    names = [(task, s) for task in sources.TASKS for s in sources.list_splits(root, task) if s == split or not split]
    if not names:
        raise DataError(f"{root}: no split {split or ''} found (for a folder: annotations/instances_*.json, "
                        "*/_annotations.coco.json, annotations/panoptic_*.json, YOLO's images/ and labels/ with "
                        "data.yaml, or VOC's Annotations/ and ImageSets/Main/)")
    report: dict[str, Any] = {"root": root, "splits": {}}
    for task, name in names:
        try:
            ds = sources.read_split(root, name, skip_bad=True, task=task)
        except DataError as e:  # a split whose layout itself is broken (a panoptic JSON without its PNG folder)
            report["splits"][f"{name} ({task})"] = {"images": 0, "problems": [{"file": root, "id": None,
                                                                               "error": str(e)}]}
            continue
        sources.ground_truth(ds)  # completes the counts of sources that gather them while reading
        problems = list(ds.problems)
        records = []
        for i in range(len(ds.records)):
            try:
                r = ds.records[i]  # a lazy source reads (and checks) the record here
            except DataError as e:
                problems.append({"file": f"{root}/{name}", "id": None, "error": str(e)})
                continue
            records.append(r)
            try:
                load_image(r)
                if "panoptic_png" in r:
                    load_masks(r)
            except DataError as e:
                problems.append({"file": r["file"], "id": r["image_id"], "error": str(e)})
            if len(r["labels"]) > max_targets:
                problems.append({"file": r["file"], "id": r["image_id"],
                                 "error": f"{len(r['labels'])} boxes, more than max_targets={max_targets}"})
        key = name if task == "detection" else f"{name} ({task})"
        report["splits"][key] = {"images": len(records), "boxes": int(sum(len(r["labels"]) for r in records)),
                                 "categories": len(ds.names), "crowd": ds.counts.get("crowd", 0),
                                 "degenerate": ds.counts.get("degenerate", 0), "problems": problems}
    report["ok"] = not any(s["problems"] for s in report["splits"].values())
    return report
