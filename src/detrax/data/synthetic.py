"""Synthetic scenes: coloured shapes on textured backgrounds, deterministic from a seed."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "ellipse", "triangle")
HUES = np.array([[210, 50, 50], [50, 190, 60], [60, 80, 220]])  # each shape has its colour family


def scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 5):
    """One image with 1..max_objects shapes, each in its own colour family on a grey texture (so that a small
    model learns classes quickly): (PIL RGB image, boxes [N, 4] absolute xyxy, labels [N])."""
    base = rng.integers(70, 180)
    noise = rng.normal(0, 18, size=(height // 8 + 1, width // 8 + 1, 1))
    texture = np.kron(noise, np.ones((8, 8, 1)))[:height, :width]
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8).repeat(3, axis=2))
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):  # shapes do not overlap, so that every box shows its whole shape
            w = int(rng.integers(max(8, width // 8), max(9, width // 3)))
            h = int(rng.integers(max(8, height // 8), max(9, height // 3)))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if all(x0 >= b[2] or x0 + w <= b[0] or y0 >= b[3] or y0 + h <= b[1] for b in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(SHAPES)))
        color = tuple(int(c) for c in np.clip(HUES[label] + rng.integers(-35, 36, size=3), 0, 255))
        box = (x0, y0, x0 + w, y0 + h)
        if SHAPES[label] == "rectangle":
            draw.rectangle(box, fill=color)
        elif SHAPES[label] == "ellipse":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=color)
        boxes.append(box)
        labels.append(label)
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def write_dataset(out: str, num_images: int = 64, seed: int = 0, val_fraction: float = 0.25,
                  sizes: tuple[int, int] = (128, 192), max_objects: int = 4,
                  shape: tuple[int, int] | None = None) -> dict:
    """A COCO-layout folder (`annotations/instances_{train,val}.json`, images in `train/` and `val/`) of
    synthetic scenes, categories 1..3 (rectangle, ellipse, triangle). Deterministic from `seed`. Each image's
    height and width are drawn from `sizes` (inclusive), or are `shape` (height, width) for all. Returns
    {split: number of images}."""
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(num_images * val_fraction)))
    counts = {}
    ann_id = 1
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split, n, first in (("train", num_images - n_val, 1), ("val", n_val, num_images - n_val + 1)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(first, first + n):
            h, w = shape or (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            image, boxes, labels = scene(rng, h, w, max_objects)
            name = f"{image_id:06d}.png"
            image.save(os.path.join(out, split, name))
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist()):
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
                ann_id += 1
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]}
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
        counts[split] = n
    return counts
