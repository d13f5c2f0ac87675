"""Image files in, drawings and COCO results out: read, list, draw, write. The detections come from the one
inference path (`infer`)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(path: str) -> Image.Image:
    """An RGB image with its EXIF orientation applied; ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def list_images(paths) -> list[str]:
    """Files as given, and the image files of folders (sorted)."""
    out = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def _color(label: int) -> tuple[int, int, int]:
    rs = np.random.default_rng(label * 7919 + 13)
    r, g, b = (int(c) for c in rs.integers(60, 256, 3))
    return r, g, b


def draw(image: Image.Image, det: dict, names: dict) -> Image.Image:
    """The image with each detection's box, name and score."""
    out = image.copy()
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, min(out.size) // 40))
    width = max(2, min(out.size) // 250)
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        color = _color(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=color, width=width)
        text = f"{names.get(int(label), label)} {score:.2f}"
        tx0, ty0, tx1, ty1 = pen.textbbox((x0, y0), text, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        pen.rectangle((x0, ty, x0 + tx1 - tx0 + 4, ty + ty1 - ty0 + 2), fill=color)
        pen.text((x0 + 2, ty - (ty0 - y0)), text, fill=(0, 0, 0), font=font)
    return out


def coco_results(files, dets, names) -> list[dict]:
    """COCO results format (bbox as x, y, w, h), with the file and category names alongside."""
    out = []
    for image_id, (f, det) in enumerate(zip(files, dets)):
        stem = os.path.splitext(os.path.basename(f))[0]
        iid = int(stem) if stem.isdigit() else image_id
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": iid, "file_name": os.path.basename(f), "category_id": int(label),
                        "category_name": names.get(int(label), str(int(label))),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 5)})
    return out


def write_results(out_dir: str, files, images, dets, names) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(coco_results(files, dets, names), f)
    for file, im, det in zip(files, images, dets):
        stem = os.path.splitext(os.path.basename(file))[0]
        draw(im, det, names).save(os.path.join(out_dir, f"{stem}.jpg"), quality=92)
    return path
