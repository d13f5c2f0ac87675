"""`detrax data check`: read a dataset as training would and report every bad input."""

from __future__ import annotations

from typing import Any

from detrax.data.coco import DataError, load_image, read_coco, splits


def check(root: str, split: str | None = None, max_targets: int = 100) -> dict:
    """One report per split: images, boxes (after the crowd and degenerate rules), categories, and every
    problem with its file and id (unparseable entries, missing or unreadable images, sizes that disagree with
    the annotations, images with more boxes than `max_targets`). `ok` is False if anything is bad."""
    names = [split] if split else splits(root)
    if not names:
        raise DataError(f"{root}: no COCO-format split (annotations/instances_*.json or */_annotations.coco.json)")
    report: dict[str, Any] = {"root": root, "splits": {}}
    for name in names:
        ds = read_coco(root, name, skip_bad=True)
        problems = list(ds.problems)
        for r in ds.records:
            try:
                load_image(r)
            except DataError as e:
                problems.append({"file": r["file"], "id": r["image_id"], "error": str(e)})
            if len(r["labels"]) > max_targets:
                problems.append({"file": r["file"], "id": r["image_id"],
                                 "error": f"{len(r['labels'])} boxes, more than max_targets={max_targets}"})
        report["splits"][name] = {"images": len(ds.records), "boxes": int(sum(len(r["labels"]) for r in ds.records)),
                                  "categories": len(ds.names), "crowd": ds.counts["crowd"],
                                  "degenerate": ds.counts["degenerate"], "problems": problems}
    report["ok"] = not any(s["problems"] for s in report["splits"].values())
    return report
