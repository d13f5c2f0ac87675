"""Synthetic scenes: coloured shapes on textured backgrounds, deterministic from a seed."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "ellipse", "triangle")
HUES = np.array([[210, 50, 50], [50, 190, 60], [60, 80, 220]])  # each shape has its colour family


def _texture(rng, height: int, width: int, base, spread: float = 18.0) -> np.ndarray:
    """A blocky noise texture around `base` (a grey level or an RGB colour): [height, width, 3] float."""
    noise = rng.normal(0, spread, size=(height // 8 + 1, width // 8 + 1, 1))
    return np.asarray(base, np.float64) + np.kron(noise, np.ones((8, 8, 1)))[:height, :width]


def _shapes(rng, height: int, width: int, max_objects: int):
    """1..max_objects non-overlapping shapes (so that every box shows its whole shape): [(label, box, colour)]."""
    placed: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            w = int(rng.integers(max(8, width // 8), max(9, width // 3)))
            h = int(rng.integers(max(8, height // 8), max(9, height // 3)))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if all(x0 >= b[2] or x0 + w <= b[0] or y0 >= b[3] or y0 + h <= b[1] for _, b, _ in placed):
                break
        else:
            continue
        label = int(rng.integers(len(SHAPES)))
        color = tuple(int(c) for c in np.clip(HUES[label] + rng.integers(-35, 36, size=3), 0, 255))
        placed.append((label, (x0, y0, x0 + w, y0 + h), color))
    return placed


def _draw(draw, label: int, box, fill) -> None:
    x0, y0, x1, y1 = box
    if SHAPES[label] == "rectangle":
        draw.rectangle(box, fill=fill)
    elif SHAPES[label] == "ellipse":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x0 + (x1 - x0) // 2, y0), (x1, y1)], fill=fill)


def outline(label: int, box) -> list[float]:
    """The shape's outline as a COCO polygon [x0, y0, x1, y1, ...] (an ellipse as 32 points), in the pixel-edge
    coordinates of COCO's polygons."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x1, y1 = x1 + 1, y1 + 1  # PIL fills the last row and column of its box
    if SHAPES[label] == "rectangle":
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif SHAPES[label] == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        points = list(zip((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(t)))
    else:
        points = [(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)]
    return [round(float(v), 2) for p in points for v in p]


def scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 5):
    """One image with 1..max_objects shapes, each in its own colour family on a grey texture (so that a small
    model learns classes quickly): (PIL RGB image, boxes [N, 4] absolute xyxy, labels [N])."""
    base = rng.integers(70, 180)
    image = Image.fromarray(np.clip(_texture(rng, height, width, base), 0, 255).astype(np.uint8)[..., :1]
                            .repeat(3, axis=2))
    draw = ImageDraw.Draw(image)
    placed = _shapes(rng, height, width, max_objects)
    for label, box, color in placed:
        _draw(draw, label, box, color)
    boxes = [box for _, box, _ in placed]
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array([p[0] for p in placed], np.int64)


STUFF = ("sky", "ground")  # panoptic scenes: two stuff regions behind the shapes
STUFF_COLOURS = np.array([[120, 160, 215], [125, 105, 70]])


def write_scenes(folder: str, count: int, seed: int = 0) -> list[str]:
    """`count` 640x480 scenes as JPEG files in `folder` (for trying a model without images); their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"scene{i:03d}.jpg") for i in range(count)]
    for path in paths:
        scene(rng, 480, 640)[0].save(path, quality=95)
    return paths


def panoptic_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 4):
    """Shapes (things) over a sky above a ground (stuff) split along a random sloped line: (PIL RGB image,
    segment ids [H, W] uint32 (1, 2: sky and ground when present; shapes from 3), segments [(id, category
    index: 0-2 shapes, 3-4 stuff)])."""
    left, right = (int(v) for v in rng.integers(height // 4, 3 * height // 4 + 1, size=2))
    horizon = left + (right - left) * np.arange(width)[None, :] / max(1, width - 1)  # [1, W]
    below = np.arange(height)[:, None] >= horizon  # [H, W]
    pixels = np.where(below[..., None], _texture(rng, height, width, STUFF_COLOURS[1]),
                      _texture(rng, height, width, STUFF_COLOURS[0]))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    ids = Image.fromarray(np.where(below, 2, 1).astype(np.uint8), mode="L")  # segment ids (at most 255 here)
    segments = [(i + 1, len(SHAPES) + i) for i in range(2) if (np.asarray(ids) == i + 1).any()]
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    for k, (label, box, color) in enumerate(_shapes(rng, height, width, max_objects)):
        _draw(draw, label, box, color)
        _draw(draw_ids, label, box, 3 + k)
        segments.append((3 + k, label))
    ids_arr = np.asarray(ids, np.uint32)
    present = set(np.unique(ids_arr).tolist())
    return image, ids_arr, [(i, c) for i, c in segments if i in present]


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
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "segmentation": [outline(label, (x0, y0, x1, y1))]})
                ann_id += 1
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]}
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
        counts[split] = n
    return counts


def write_panoptic_dataset(out: str, num_images: int = 64, seed: int = 0, val_fraction: float = 0.25,
                           shape: tuple[int, int] = (128, 160), max_objects: int = 4) -> dict:
    """A COCO panoptic folder (`annotations/panoptic_{train,val}.json`, PNGs in `annotations/panoptic_{split}/`,
    images in `{split}/`) of `panoptic_scene`s of `shape` (height, width): things 1..3 (rectangle, ellipse,
    triangle), stuff 4 and 5 (sky, ground). Deterministic from `seed`. Every segment also as an instance
    (`annotations/instances_{split}.json`: boxes and RLE masks from the PNG, things and stuff), so that the folder
    trains the official recipe's first stage (a detector of all 5 classes: `--config demo`), its second (the mask
    head on that frozen detector: `--config demo_panoptic_stage2`) and scores mask AP. Returns {split: number of
    images}."""
    from pycocotools import mask as mask_utils

    from detrax.data.masks import id2rgb

    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(num_images * val_fraction)))
    names = SHAPES + STUFF
    categories = [{"id": i + 1, "name": n, "supercategory": "shape" if i < len(SHAPES) else "background",
                   "isthing": int(i < len(SHAPES))} for i, n in enumerate(names)]
    counts = {}
    for split, n, first in (("train", num_images - n_val, 1), ("val", n_val, num_images - n_val + 1)):
        png_dir = os.path.join(out, "annotations", f"panoptic_{split}")
        os.makedirs(png_dir, exist_ok=True)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations, instances = [], [], []
        for image_id in range(first, first + n):
            image, ids, segments = panoptic_scene(rng, *shape, max_objects=max_objects)
            name = f"{image_id:06d}"
            image.save(os.path.join(out, split, f"{name}.jpg"), quality=95)
            Image.fromarray(id2rgb(ids)).save(os.path.join(png_dir, f"{name}.png"))
            info = []
            for i, c in segments:
                ys, xs = np.nonzero(ids == i)
                x0, y0 = int(xs.min()), int(ys.min())
                info.append({"id": i, "category_id": c + 1, "iscrowd": 0, "area": int(len(xs)),
                             "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
                rle = mask_utils.encode(np.asfortranarray(ids == i, dtype=np.uint8))
                instances.append({**info[-1], "id": 1000 * image_id + i, "image_id": image_id,
                                  "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": shape[1], "height": shape[0]})
            annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
        with open(os.path.join(out, "annotations", f"panoptic_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": instances, "categories": categories}, f)
        counts[split] = n
    return counts


VARIED = {7: "diamond", 15: "cross", 23: "ring"}  # category ids as a user's export may number them
VARIED_HUES = {7: [230, 170, 40], 15: [160, 60, 200], 23: [40, 190, 190]}


def _draw_varied(draw, name: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif name == "cross":
        tx, ty = max(2, (x1 - x0) // 6), max(2, (y1 - y0) // 6)
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=fill)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(2, min(x1 - x0, y1 - y0) // 5))


def varied_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 6,
                 empty: float = 0.1, crowd: float = 0.2):
    """Another kind of scene than `scene`'s, for checking that a preset learns data it was not tuned on: diamonds,
    crosses and rings (`VARIED`: category ids 7, 15, 23) of 12 pixels up to half the image on a coloured gradient;
    with probability `empty` no object at all, with probability `crowd` also a crowd region (a cluster of small
    shapes of one class, annotated as one `iscrowd` box). Returns (PIL image, [(category id, xyxy box, iscrowd)])."""
    ramp = np.linspace(0, 1, width)[None, :, None]
    a, b = rng.integers(40, 200, size=(2, 3))
    pixels = a + (b - a) * ramp + rng.normal(0, 10, size=(height // 4 + 1, width // 4 + 1, 1)).repeat(4, 0).repeat(
        4, 1)[:height, :width]
    image = Image.fromarray(np.clip(np.broadcast_to(pixels, (height, width, 3)), 0, 255).astype(np.uint8))
    draw, ids = ImageDraw.Draw(image), sorted(VARIED)
    objects: list[tuple[int, tuple[int, int, int, int], int]] = []
    if rng.random() < empty:
        return image, objects
    if rng.random() < crowd:  # a cluster in one corner quadrant, its small shapes not annotated one by one
        cid = ids[int(rng.integers(len(ids)))]
        qx, qy = int(rng.integers(2)) * width // 2, int(rng.integers(2)) * height // 2
        boxes = []
        for _ in range(int(rng.integers(4, 9))):
            s = int(rng.integers(6, 11))
            x0, y0 = qx + int(rng.integers(0, width // 2 - s)), qy + int(rng.integers(0, height // 2 - s))
            boxes.append((x0, y0, x0 + s, y0 + s))
            _draw_varied(draw, VARIED[cid], boxes[-1], tuple(VARIED_HUES[cid]))
        b = np.array(boxes)
        objects.append((cid, (int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())), 1))
    placed = [box for _, box, _ in objects]
    for _ in range(int(rng.integers(1, max_objects + 1))):
        w, h = (int(rng.integers(12, max(13, d // 2))) for d in (width, height))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if any(x0 < q[2] and x0 + w > q[0] and y0 < q[3] and y0 + h > q[1] for q in placed):
            continue  # overlaps a shape or the crowd: left out
        cid = ids[int(rng.integers(len(ids)))]
        colour = tuple(int(c) for c in np.clip(np.array(VARIED_HUES[cid]) + rng.integers(-40, 41, size=3), 0, 255))
        _draw_varied(draw, VARIED[cid], (x0, y0, x0 + w, y0 + h), colour)
        placed.append((x0, y0, x0 + w, y0 + h))
        objects.append((cid, placed[-1], 0))
    return image, objects


def write_varied_dataset(out: str, num_images: int = 600, seed: int = 0, val_fraction: float = 0.25,
                         sizes: tuple[int, int] = (112, 208)) -> dict:
    """A COCO-layout folder of `varied_scene`s (images of 112-208 pixels a side, drawn per image), as
    `write_dataset` writes the shapes. Returns {split: number of images}."""
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(num_images * val_fraction)))
    counts, ann_id = {}, 1
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split, n, first in (("train", num_images - n_val, 1), ("val", n_val, num_images - n_val + 1)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(first, first + n):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            image, objects = varied_scene(rng, h, w)
            name = f"{image_id:06d}.jpg"
            image.save(os.path.join(out, split, name), quality=92)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for cid, (x0, y0, x1, y1), crowd in objects:
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cid, "iscrowd": crowd,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
                ann_id += 1
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in VARIED.items()]}
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
        counts[split] = n
    return counts
