"""`detrax data convert SRC DST --to coco`: any folder data source (YOLO, Pascal VOC, COCO, a registered one)
written as a COCO folder: `DST/annotations/instances_{split}.json` and the split's images under `DST/{split}/`
(hard links where the file system allows, else copies), every split. What is written is what training reads: the
source's own rules and its problems (skipped and counted with `skip_bad`, else an error naming the file)."""

from __future__ import annotations

import json
import os
import shutil

from detrax.data import sources
from detrax.data.coco import DataError

FORMATS = ("coco",)


def convert(src: str, dst: str, to: str = "coco", skip_bad: bool = False) -> dict:
    """Write `src` as `to` in `dst` (a new or empty folder). Returns {split: {images, annotations, skipped}}."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: formats: {', '.join(FORMATS)}")
    found = sources.list_splits(src)
    if not found:
        raise DataError(f"{src}: no split found to convert")
    if os.path.isdir(dst) and os.listdir(dst):
        raise ValueError(f"{dst}: not empty; converting writes a new folder")
    report = {}
    for split in found:
        ds = sources.read_split(src, split, skip_bad=skip_bad)
        if ds.annotation_file is None and ds.ground_truth is None:
            raise ValueError(f"{src}: a {type(sources.source_of(src)).__name__} source has no files to convert")
        data = ds.ground_truth or _load(ds.annotation_file)
        kept = {r["image_id"] for r in ds.records}  # images skipped as bad stay out
        data = {**data, "images": [im for im in data["images"] if im["id"] in kept],
                "annotations": [a for a in data["annotations"] if a.get("image_id") in kept]}
        for im in data["images"]:
            _place(os.path.join(ds.image_dir, im["file_name"]), os.path.join(dst, split, im["file_name"]))
        os.makedirs(os.path.join(dst, "annotations"), exist_ok=True)
        with open(os.path.join(dst, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        report[split] = {"images": len(data["images"]), "annotations": len(data["annotations"]),
                         "skipped": len(ds.problems)}
    return report


def _load(path: str | None) -> dict:
    assert path is not None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _place(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
