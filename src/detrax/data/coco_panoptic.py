"""COCO panoptic folders: `annotations/panoptic_{split}.json`, its PNGs in `annotations/panoptic_{split}/` (or
`panoptic_{split}/` at the top, as the official code expects), the images in `{split}/`.

A PNG holds one segment id per pixel as RGB (id = R + 256 G + 256^2 B, 0: void); the JSON's `segments_info`
names each id's category and crowd flag. Targets are the official CocoPanoptic's: one mask per listed segment,
crowd ones included, its category as the label and the box around its pixels (`masks_to_boxes`). Bad input
(a JSON that is not COCO panoptic, a segment of an unknown category, a missing PNG or image, a PNG whose size is
not its image's) raises `DataError` naming the file and the id, or with `skip_bad=True` is skipped, counted and
listed in `Dataset.problems`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from detrax.data.coco import DataError, Dataset, _is_int
from detrax.data.masks import rgb2id


def splits(root: str) -> list[str]:
    ann = os.path.join(root, "annotations")
    if not os.path.isdir(ann):
        return []
    return sorted(f[len("panoptic_"):-5] for f in os.listdir(ann) if f.startswith("panoptic_") and f.endswith(".json"))


def split_files(root: str, split: str) -> tuple[str, str, str]:
    """(panoptic JSON, PNG folder, image folder) of `split` under `root`."""
    ann = os.path.join(root, "annotations", f"panoptic_{split}.json")
    if not os.path.isfile(ann):
        raise DataError(f"{root}: no panoptic split {split!r} (looked for {ann}); panoptic splits found: "
                        f"{', '.join(splits(root)) or 'none'}")
    pngs = [os.path.join(root, "annotations", f"panoptic_{split}"), os.path.join(root, f"panoptic_{split}")]
    png_dir = next((d for d in pngs if os.path.isdir(d)), None)
    if png_dir is None:
        raise DataError(f"{ann}: its PNG folder is missing (looked for {pngs[0]} and {pngs[1]})")
    return ann, png_dir, os.path.join(root, split)


def read_panoptic(root: str, split: str, skip_bad: bool = False) -> Dataset:
    ann_file, png_dir, image_dir = split_files(root, split)
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{ann_file}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                     "categories")):
        raise DataError(f"{ann_file}: not a COCO panoptic file (needs lists 'images', 'annotations', 'categories')")
    problems: list = []
    counts = {"crowd": 0, "segments": 0, "annotations": 0}

    def bad(msg, id_, file=ann_file):
        if not skip_bad:
            raise DataError(f"{file}: {msg}")
        problems.append({"file": file, "id": id_, "error": msg})

    names, isthing = {}, {}
    for c in data["categories"]:
        if not (isinstance(c, dict) and _is_int(c.get("id")) and c["id"] >= 0 and isinstance(c.get("name"), str)):
            raise DataError(f"{ann_file}: category {c!r} needs an integer id >= 0 and a string name")
        names[c["id"]], isthing[c["id"]] = c["name"], c.get("isthing", 1) == 1
    images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))}
    records = []
    for a in data["annotations"]:
        iid = a.get("image_id") if isinstance(a, dict) else None
        if not (isinstance(a, dict) and _is_int(iid) and isinstance(a.get("file_name"), str)
                and isinstance(a.get("segments_info"), list)):
            bad(f"annotation {str(a)[:120]} needs an integer image_id, a file_name and a segments_info list", iid)
            continue
        im = images.get(iid)
        if im is None or not (isinstance(im.get("file_name"), str) and _is_int(im.get("width"))
                              and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            bad(f"image {iid}: no images entry with a file_name and positive width and height", iid)
            continue
        file, png = os.path.join(image_dir, im["file_name"]), os.path.join(png_dir, a["file_name"])
        missing = next(((p, what) for p, what in ((file, "image"), (png, "panoptic PNG")) if not os.path.isfile(p)),
                       None)
        if missing:
            bad(f"image {iid}: its {missing[1]} is missing", iid, missing[0])
            continue
        segs = a["segments_info"]
        ok = all(isinstance(s, dict) and _is_int(s.get("id")) and s["id"] > 0 and s.get("category_id") in names
                 for s in segs)
        if not ok or len({s["id"] for s in segs}) < len(segs):
            bad(f"image {iid}: segments_info needs distinct integer ids > 0 of known categories, not {segs!r:.200}",
                iid)
            continue
        counts["segments"] += len(segs)
        counts["crowd"] += sum(bool(s.get("iscrowd", 0)) for s in segs)
        counts["annotations"] += 1
        boxes = np.array([s.get("bbox", [0, 0, 0, 0]) for s in segs], np.float32).reshape(-1, 4)
        records.append({"image_id": iid, "file": file, "width": im["width"], "height": im["height"],
                        "boxes": np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                        "labels": np.array([s["category_id"] for s in segs], np.int32),
                        "panoptic_png": png, "segment_ids": np.array([s["id"] for s in segs], np.int64),
                        "iscrowd": np.array([int(s.get("iscrowd", 0)) for s in segs], np.int32),
                        "areas": [s.get("area") for s in segs]})  # the JSON's, which panopticapi's PQ uses
    return Dataset(os.fspath(root), split, ann_file, image_dir, records, names, problems, counts, isthing=isthing,
                   task="panoptic")


def load_masks(record: dict) -> np.ndarray:
    """The record's segments as masks [n, H, W] bool, in `segment_ids` order, from its PNG."""
    return load_ids(record)[None] == np.asarray(record["segment_ids"], np.uint32)[:, None, None]


def load_ids(record: dict) -> np.ndarray:
    """The record's PNG as segment ids [H, W] uint32 (0: void)."""
    path = record["panoptic_png"]
    try:
        with Image.open(path) as im:
            ids = rgb2id(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        raise DataError(f"{path}: the panoptic PNG of image {record['image_id']} is missing") from None
    except OSError as e:
        raise DataError(f"{path}: the panoptic PNG of image {record['image_id']} is not readable ({e})") from None
    if ids.shape != (record["height"], record["width"]):
        raise DataError(f"{path}: {ids.shape[1]}x{ids.shape[0]}, but image {record['image_id']} is "
                        f"{record['width']}x{record['height']}")
    return ids


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """[n, H, W] bool -> [n, 4] absolute (x0, y0, x1, y1) of the first and last pixel of each mask, as the
    official masks_to_boxes (an empty mask gives zeros)."""
    if not len(masks):
        return np.zeros((0, 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)  # [n, H], [n, W]
    first = lambda m: np.where(m.any(1), m.argmax(1), 0)
    last = lambda m: np.where(m.any(1), m.shape[1] - 1 - m[:, ::-1].argmax(1), 0)
    return np.stack([first(cols), first(rows), last(cols), last(rows)], 1).astype(np.float32)
