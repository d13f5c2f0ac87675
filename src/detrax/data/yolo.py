"""YOLO-format folders, as Ultralytics and Roboflow's YOLO export write them, read as COCO data (`coco.from_dict`).

Layouts (told apart by what the folder holds):
- Ultralytics: `images/{split}/*.jpg` with `labels/{split}/*.txt` beside them, class names in `data.yaml`.
- Roboflow's export: `{split}/images/*.jpg` with `{split}/labels/*.txt` (splits train, valid, test), `data.yaml`.
Class names come from `data.yaml` (`names:` a list or an {index: name} map) or, without one, `classes.txt`
(one per line). A label file holds a line per object: `class cx cy w h`, normalised to the image's size (its EXIF
orientation applied, as Ultralytics does), or `class x1 y1 x2 y2 ...` (a polygon, YOLO-seg: its bounding box).
An image without a label file has no objects. Category ids are the class indices. Bad input (a line of 4
numbers, a class index out of range, a number that is not one, an unreadable image) raises `DataError` naming
the file and line, or with `skip_bad` is skipped and counted.
"""

from __future__ import annotations

import math
import os

from PIL import Image, UnidentifiedImageError

from detrax.data.coco import DataError

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def claims(root: str) -> bool:
    return os.path.isdir(root) and bool(names_file(root)) and bool(splits(root))


def names_file(root: str) -> str | None:
    for name in ("data.yaml", "data.yml", "classes.txt"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def splits(root: str) -> list[str]:
    images = os.path.join(root, "images")
    if os.path.isdir(images) and os.path.isdir(os.path.join(root, "labels")):  # Ultralytics
        return sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    return sorted(d for d in os.listdir(root)  # Roboflow
                  if os.path.isdir(os.path.join(root, d, "images")) and os.path.isdir(os.path.join(root, d, "labels")))


def folders(root: str, split: str) -> tuple[str, str]:
    """(image folder, label folder) of `split`."""
    if os.path.isdir(os.path.join(root, "images", split)):
        return os.path.join(root, "images", split), os.path.join(root, "labels", split)
    if os.path.isdir(os.path.join(root, split, "images")):
        return os.path.join(root, split, "images"), os.path.join(root, split, "labels")
    raise DataError(f"{root}: no split {split!r} (looked for images/{split}/ and {split}/images/); splits found: "
                    f"{', '.join(splits(root)) or 'none'}")


def class_names(root: str) -> list[str]:
    path = names_file(root)
    if path is None:
        raise DataError(f"{root}: a YOLO folder needs data.yaml (names: ...) or classes.txt")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: not readable YAML ({e})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and all(isinstance(k, int) for k in names) and sorted(names) == list(range(len(names))):
        return [str(names[k]) for k in range(len(names))]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise DataError(f"{path}: 'names' must be a list of class names or a map 0..N-1 -> name, not {names!r}")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image as shown: its EXIF orientation applied (a quarter turn swaps them)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return (h, w) if turned else (w, h)


def to_coco(root: str, split: str, skip_bad: bool = False) -> tuple[dict, list, str]:
    """`split` as a COCO dict (file names relative to the image folder), the problems skipped, and the image
    folder."""
    names = class_names(root)
    image_dir, label_dir = folders(root, split)
    data: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}
    problems: list = []

    def bad(where: str, msg: str, id_=None):
        if not skip_bad:
            raise DataError(f"{where}: {msg}")
        problems.append({"file": where.split(":")[0], "id": id_, "error": msg})

    files = sorted(os.path.relpath(os.path.join(d, f), image_dir) for d, _, fs in os.walk(image_dir) for f in fs
                   if f.lower().endswith(IMAGE_TYPES))
    for image_id, rel in enumerate(files, 1):
        try:
            width, height = image_size(os.path.join(image_dir, rel))
        except DataError as e:
            bad(os.path.join(image_dir, rel), str(e).split(": ", 1)[1], image_id)
            continue
        data["images"].append({"id": image_id, "file_name": rel, "width": width, "height": height})
        label = os.path.join(label_dir, os.path.splitext(rel)[0] + ".txt")
        if not os.path.isfile(label):
            continue  # no objects
        with open(label, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for n, line in enumerate(lines, 1):
            box = _parse(line, len(names), lambda msg, n=n: bad(f"{label}:{n}", msg, image_id))
            if box is None:
                continue
            k, cx, cy, w, h = box
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": k, "iscrowd": 0,
                "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height],
                "area": w * width * h * height})
    return data, problems, image_dir


def _parse(line: str, classes: int, bad) -> tuple | None:
    """(class, cx, cy, w, h) normalised of one label line; None for a blank line or a bad one (`bad` told)."""
    fields = line.split()
    if not fields:
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return bad(f"{line.strip()!r} is not numbers")
    if not all(math.isfinite(v) for v in values):
        return bad(f"{line.strip()!r} holds a number that is not finite")
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        return bad(f"{len(values)} numbers; a YOLO line is 'class cx cy w h' (5) or 'class x1 y1 x2 y2 x3 y3 ...' "
                   "(a polygon)")
    k = values[0]
    if k != int(k) or not 0 <= k < classes:
        return bad(f"class {fields[0]} is not one of the {classes} classes (0..{classes - 1})")
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        if w < 0 or h < 0:
            return bad(f"box size {w} x {h} is negative")
        return int(k), cx, cy, w, h
    xs, ys = values[1::2], values[2::2]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return int(k), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
