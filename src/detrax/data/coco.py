"""COCO-format folders: the COCO layout (`annotations/instances_{split}.json`, images in `{split}/`) or the
Roboflow export (`{split}/_annotations.coco.json` beside the images), detected automatically.

Targets follow the official DETR rules: crowd annotations are left out, boxes are clipped to the image and
degenerate ones dropped (both counted). Category ids are kept as in the file (COCO's 91-way head), with a name
table. Bad input (a JSON that is not COCO, a box of negative size or wholly outside its image, an annotation
naming an unknown image or category, a missing or unreadable image) raises `DataError` naming the file and the
id, or with `skip_bad=True` is skipped, counted and listed in `Dataset.problems`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DataError(ValueError):
    pass


@dataclasses.dataclass
class Dataset:
    root: str
    split: str
    annotation_file: str | None  # None for TFDS
    image_dir: str
    records: Sequence  # (a sequence) per image: image_id, file, width, height, boxes [n, 4] absolute xyxy, labels [n]
    names: dict  # category id -> name
    problems: list  # what skip_bad skipped: {"file", "id", "error"}
    counts: dict  # crowd, degenerate (dropped by the official rules), annotations kept
    isthing: dict = dataclasses.field(default_factory=dict)  # panoptic: category id -> thing (True) or stuff
    task: str = "detection"  # detection | segm (records' `segmentations` as masks) | panoptic (`panoptic_png`)
    ground_truth: dict | None = None  # the COCO dict of a split made from another format (YOLO, VOC)

    @property
    def num_classes(self) -> int:
        """Size of the class head (no-object excluded): the largest category id + 1, as the official."""
        return max(self.names) + 1 if self.names else 1


def splits(root: str) -> list[str]:
    found = []
    ann = os.path.join(root, "annotations")
    if os.path.isdir(ann):
        found += sorted(f[len("instances_"):-5] for f in os.listdir(ann)
                        if f.startswith("instances_") and f.endswith(".json"))
    if os.path.isdir(root):
        found += sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "_annotations.coco.json")))
    return found


def split_files(root: str, split: str) -> tuple[str, str]:
    """(annotation file, image folder) of `split` under `root`."""
    coco = os.path.join(root, "annotations", f"instances_{split}.json")
    if os.path.isfile(coco):
        return coco, os.path.join(root, split)
    roboflow = os.path.join(root, split, "_annotations.coco.json")
    if os.path.isfile(roboflow):
        return roboflow, os.path.join(root, split)
    have = splits(root)
    raise DataError(f"{root}: no split {split!r} (looked for {coco} and {roboflow}); "
                    f"splits found: {', '.join(have) if have else 'none'}")


def _need(cond, where, msg):
    if not cond:
        raise DataError(f"{where}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    _need(isinstance(data, dict), path, "not a COCO file (the top level is not an object)")
    for key in ("images", "annotations", "categories"):
        _need(isinstance(data.get(key), list), path, f"not a COCO file ('{key}' missing or not a list)")
    return data


def read_coco(root: str, split: str, skip_bad: bool = False, check_files: bool = True) -> Dataset:
    ann_file, image_dir = split_files(root, split)
    return from_dict(_load_json(ann_file), root, split, image_dir, ann_file, skip_bad, check_files)


def from_dict(data: dict, root: str, split: str, image_dir: str, ann_file: str | None, skip_bad: bool = False,
              check_files: bool = True, problems: list | None = None) -> Dataset:
    """The records of a COCO dict (`images`, `annotations`, `categories`; file names relative to `image_dir`) by
    the rules above; `ann_file` names the file it came from (None: made from another format, which `problems`
    already found fault with: the dict becomes the split's `ground_truth`)."""
    where = ann_file or os.path.join(root, split)
    problems, counts = list(problems or []), {"crowd": 0, "degenerate": 0, "annotations": 0}

    def bad(msg, id_, file=where):
        if not skip_bad:
            raise DataError(f"{file}: {msg}")
        problems.append({"file": file, "id": id_, "error": msg})

    names = {}
    for c in data["categories"]:
        if not (isinstance(c, dict) and _is_int(c.get("id")) and c["id"] >= 0 and isinstance(c.get("name"), str)):
            raise DataError(f"{where}: category {c!r} needs an integer id >= 0 and a string name")
        names[c["id"]] = c["name"]
    images, skipped_images = {}, set()
    for im in data["images"]:
        ok = isinstance(im, dict) and _is_int(im.get("id")) and isinstance(im.get("file_name"), str)
        ok = ok and _is_int(im.get("width")) and _is_int(im.get("height")) and im["width"] > 0 and im["height"] > 0
        if not ok:
            bad(f"image entry {str(im)[:120]} needs integer id, string file_name and positive width and height",
                im.get("id") if isinstance(im, dict) else None)
            if isinstance(im, dict) and _is_int(im.get("id")):
                skipped_images.add(im["id"])
            continue
        if im["id"] in images:
            raise DataError(f"{where}: image id {im['id']} appears twice")
        path = os.path.join(image_dir, im["file_name"])
        if check_files and not os.path.isfile(path):
            bad(f"image {im['id']}: file {path} is missing", im["id"], path)
            skipped_images.add(im["id"])
            continue
        images[im["id"]] = {"image_id": im["id"], "file": path, "width": im["width"], "height": im["height"],
                            "boxes": [], "labels": [], "segmentations": [], "ann_ids": []}
    for a in data["annotations"]:
        aid = a.get("id") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not _is_int(a.get("image_id")) or not _is_int(a.get("category_id")):
            bad(f"annotation {aid}: needs integer image_id and category_id", aid)
            continue
        if a["image_id"] not in images:
            if a["image_id"] not in skipped_images:  # not merely an image skipped above
                bad(f"annotation {aid}: unknown image id {a['image_id']}", aid)
            continue
        if a["category_id"] not in names:
            bad(f"annotation {aid} (image {a['image_id']}): unknown category id {a['category_id']}", aid)
            continue
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            bad(f"annotation {aid} (image {a['image_id']}): bbox {box!r} is not 4 finite numbers", aid)
            continue
        if a.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        x, y, w, h = box
        im = images[a["image_id"]]
        if w < 0 or h < 0:
            bad(f"annotation {aid} (image {a['image_id']}): bbox {box} has negative size", aid)
            continue
        if x >= im["width"] or y >= im["height"] or x + w <= 0 or y + h <= 0:
            if w > 0 and h > 0:
                bad(f"annotation {aid} (image {a['image_id']}): bbox {box} lies outside the "
                    f"{im['width']}x{im['height']} image", aid)
                continue
        x0, y0 = min(max(x, 0), im["width"]), min(max(y, 0), im["height"])
        x1, y1 = min(max(x + w, 0), im["width"]), min(max(y + h, 0), im["height"])
        if x1 <= x0 or y1 <= y0:
            counts["degenerate"] += 1
            continue
        im["boxes"].append((x0, y0, x1, y1))
        im["labels"].append(a["category_id"])
        im["segmentations"].append(a.get("segmentation"))  # polygons or RLE: decoded for data.task=segm only
        im["ann_ids"].append(aid)
        counts["annotations"] += 1
    records = []
    for im in images.values():
        im["boxes"] = np.array(im["boxes"], np.float32).reshape(-1, 4)
        im["labels"] = np.array(im["labels"], np.int32)
        records.append(im)
    return Dataset(os.fspath(root), split, ann_file, image_dir, records, names, problems, counts,
                   ground_truth=None if ann_file else data)


def load_image(record: dict) -> Image.Image:
    """The record's image as RGB. EXIF orientation is applied when the annotations were made on the oriented
    image (its size matches the JSON's), else the stored pixels are used; any other size is an error."""
    path, want = record["file"], (record["width"], record["height"])
    source = io.BytesIO(record["image_bytes"]) if "image_bytes" in record else path  # TFDS: encoded bytes
    try:
        with Image.open(source) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image {record['image_id']} is missing") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: image {record['image_id']} is not a readable image ({e})") from None
    for candidate in (oriented, im):
        if candidate.size == want:
            if candidate.mode == "P":
                candidate = candidate.convert("RGBA")
            return candidate.convert("RGB")
    raise DataError(f"{path}: image {record['image_id']} is {im.size[0]}x{im.size[1]} but the annotations say "
                    f"{want[0]}x{want[1]}")


def record_masks(record: dict) -> np.ndarray:
    """The record's instance masks [n, H, W] bool from its annotations' `segmentation` (polygons, RLE or
    uncompressed RLE, as pycocotools decodes them), in box order; DataError naming the file and annotation for
    one that is missing or malformed."""
    from pycocotools import mask as mask_utils

    h, w = record["height"], record["width"]
    masks = np.zeros((len(record["labels"]), h, w), bool)
    for k, (seg, aid) in enumerate(zip(record["segmentations"], record["ann_ids"])):
        where = f"{record['file']}: annotation {aid} (image {record['image_id']})"
        if isinstance(seg, list):
            if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                  and all(_is_number(v) for v in p) for p in seg):
                raise DataError(f"{where}: segmentation polygons must be lists of at least 3 (x, y) points")
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg, dict) and "counts" in seg and seg.get("size") == [h, w]:
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        else:
            raise DataError(f"{where}: segmentation is {str(seg)[:80]}, not polygons or an RLE of the image's "
                            f"size {h}x{w}")
        masks[k] = mask_utils.decode(rle).astype(bool)
    return masks
