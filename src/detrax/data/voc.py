"""Pascal VOC folders (`Annotations/*.xml`, `ImageSets/Main/{split}.txt`, `JPEGImages/`), read as COCO data
(`coco.from_dict`).

Classes: the names in `labels.txt` or `classes.txt` at the root, one per line, if there is one; else VOC's twenty
in their usual order when every object is one of them; else every name the split files' objects use, sorted.
Category ids are their indices. Boxes: VOC's 1-based pixel corners made COCO's continuous ones (xmin - 1,
ymin - 1 to xmax, ymax, as detectron2 reads them). A `difficult` object is kept as a crowd region: not a training
target, and ignored by the evaluation (a detection on it is neither true nor false), as VOC's own. Bad input (an
XML without a size, a box that is not four numbers, a missing image or annotation file) raises `DataError` naming
the file, or with `skip_bad` is skipped and counted.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from detrax.data.coco import DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def claims(root: str) -> bool:
    return os.path.isdir(os.path.join(root, "Annotations")) and os.path.isdir(os.path.join(root, "ImageSets", "Main"))


def splits(root: str) -> list[str]:
    main = os.path.join(root, "ImageSets", "Main")
    return sorted(f[:-4] for f in os.listdir(main) if f.endswith(".txt") and "_" not in f)  # not aeroplane_train


def split_ids(root: str, split: str) -> list[str]:
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        raise DataError(f"{root}: no split {split!r} ({path} is missing); splits found: "
                        f"{', '.join(splits(root)) or 'none'}")
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def class_names(root: str) -> list[str]:
    for name in ("labels.txt", "classes.txt"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
    used = set()
    for split in splits(root):
        for stem in split_ids(root, split):
            try:
                used |= {o.findtext("name", "").strip() for o in _parse(root, stem).iter("object")}
            except DataError:
                continue  # reported when its split is read
    used.discard("")
    return list(VOC_CLASSES) if used <= set(VOC_CLASSES) else sorted(used)


def _parse(root: str, stem: str) -> ET.Element:
    path = os.path.join(root, "Annotations", f"{stem}.xml")
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (its image {stem} is listed in ImageSets/Main)") from None
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: not readable XML ({e})") from None


def to_coco(root: str, split: str, skip_bad: bool = False) -> tuple[dict, list, str]:
    """`split` as a COCO dict (file names relative to JPEGImages/), the problems skipped, and the image folder."""
    names = class_names(root)
    index = {n: i for i, n in enumerate(names)}
    image_dir = os.path.join(root, "JPEGImages")
    data: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}
    problems: list = []

    def bad(where: str, msg: str, id_=None):
        if not skip_bad:
            raise DataError(f"{where}: {msg}")
        problems.append({"file": where, "id": id_, "error": msg})

    for image_id, stem in enumerate(split_ids(root, split), 1):
        path = os.path.join(root, "Annotations", f"{stem}.xml")
        try:
            xml = _parse(root, stem)
        except DataError as e:
            bad(path, str(e).split(": ", 1)[1], image_id)
            continue
        try:
            width, height = (int(float(xml.findtext(f"size/{k}", ""))) for k in ("width", "height"))
        except ValueError:
            width = height = 0
        if width <= 0 or height <= 0:
            bad(path, "no <size> with a positive <width> and <height>", image_id)
            continue
        file_name = xml.findtext("filename", "").strip() or f"{stem}.jpg"
        if not os.path.isfile(os.path.join(image_dir, file_name)) and os.path.isfile(
                os.path.join(image_dir, f"{stem}.jpg")):
            file_name = f"{stem}.jpg"  # a <filename> that names the original, not the copy in JPEGImages
        data["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for k, obj in enumerate(xml.iter("object"), 1):
            name = obj.findtext("name", "").strip()
            if name not in index:
                bad(path, f"object {k}: class {name!r} is not one of {len(names)} classes", image_id)
                continue
            try:
                x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{c}", "")) for c in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:
                bad(path, f"object {k} ({name}): <bndbox> needs numeric xmin, ymin, xmax, ymax", image_id)
                continue
            difficult = obj.findtext("difficult", "0").strip() in ("1", "true")
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": index[name],
                "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1], "area": (x1 - x0 + 1) * (y1 - y0 + 1),
                "iscrowd": int(difficult)})
    return data, problems, image_dir
