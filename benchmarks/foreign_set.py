"""A stand-in for a user's own folder, written apart from detrax's generators (`bench_convergence.py --sets
foreign`): stars, arrows, hexagons and chevrons (category ids 2, 9, 31, 77) whose class only their shape tells
(colours are random), on noisy textured backgrounds with clutter lines, images of 160-320 pixels a side, PNG,
crowd regions (15% of images), empty images (12%); 80% train, 20% val.

    .venv/bin/python benchmarks/foreign_set.py OUT [NUM_IMAGES=500] [SEED=7]
"""

import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

CATS = {2: "star", 9: "arrow", 31: "hexagon", 77: "chevron"}


def polygon(kind, box, rot):
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "star":
        pts = [(math.cos(rot + k * math.pi / 5), math.sin(rot + k * math.pi / 5)) for k in range(10)]
        pts = [(u * (1 if k % 2 == 0 else 0.45), v * (1 if k % 2 == 0 else 0.45)) for k, (u, v) in enumerate(pts)]
    elif kind == "hexagon":
        pts = [(math.cos(rot + k * math.pi / 3), math.sin(rot + k * math.pi / 3)) for k in range(6)]
    elif kind == "arrow":
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    else:  # chevron
        pts = [(-1, -1), (0, 0), (1, -1), (1, -0.3), (0, 0.7), (-1, -0.3)]
    pts = np.array(pts, float)
    if kind in ("arrow", "chevron"):
        c, s = math.cos(rot), math.sin(rot)
        pts = pts @ np.array([[c, s], [-s, c]])
    pts = pts / np.abs(pts).max(0)  # fill the box
    return [(cx + u * rx, cy + v * ry) for u, v in pts]


def scene(rng, h, w):
    base = rng.integers(30, 225, size=3)
    noise = rng.normal(0, 25, size=(h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    pixels = np.clip(base + noise + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):  # clutter
        draw.line([tuple(int(v) for v in rng.integers(0, (w, h))), tuple(int(v) for v in rng.integers(0, (w, h)))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    objects, placed = [], []
    if rng.random() < 0.12:
        return image, objects
    ids = sorted(CATS)
    if rng.random() < 0.15:  # a crowd: many small shapes of one class, one iscrowd box
        cid = ids[int(rng.integers(len(ids)))]
        cx, cy = int(rng.integers(20, w - 60)), int(rng.integers(20, h - 60))
        boxes = []
        for _ in range(int(rng.integers(5, 10))):
            s = int(rng.integers(7, 12))
            x, y = cx + int(rng.integers(0, 40)), cy + int(rng.integers(0, 40))
            boxes.append((x, y, x + s, y + s))
            draw.polygon(polygon(CATS[cid], boxes[-1], rng.uniform(0, 6.3)),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        b = np.array(boxes)
        box = (int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))
        objects.append((cid, box, 1))
        placed.append(box)
    for _ in range(int(rng.integers(1, 8))):
        s = int(rng.integers(16, max(17, min(h, w) // 2)))
        bw, bh = s, int(s * rng.uniform(0.7, 1.3))
        if bh >= h - 2 or bw >= w - 2:
            continue
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        if any(x0 < q[2] and x0 + bw > q[0] and y0 < q[3] and y0 + bh > q[1] for q in placed):
            continue
        cid = ids[int(rng.integers(len(ids)))]
        pts = polygon(CATS[cid], box, rng.uniform(0, 6.3))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        draw.polygon(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), outline=(0, 0, 0))
        tight = (int(min(xs)), int(min(ys)), int(math.ceil(max(xs))), int(math.ceil(max(ys))))
        objects.append((cid, tight, 0))
        placed.append(box)
    return image, objects


def write(out: str, n: int = 500, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    n_val = n // 5
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    ann = 1
    for split, count, first in (("train", n - n_val, 1), ("val", n_val, n - n_val + 1)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, anns = [], []
        for i in range(first, first + count):
            h, w = int(rng.integers(160, 321)), int(rng.integers(160, 321))
            image, objects = scene(rng, h, w)
            name = f"img_{i:05d}.png"
            image.save(os.path.join(out, split, name))
            images.append({"id": i, "file_name": name, "width": w, "height": h})
            for cid, (x0, y0, x1, y1), crowd in objects:
                anns.append({"id": ann, "image_id": i, "category_id": cid, "iscrowd": crowd,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
                ann += 1
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns,
                       "categories": [{"id": k, "name": v} for k, v in CATS.items()]}, f)
        print(split, count, "images", len(anns), "annotations")


if __name__ == "__main__":
    write(sys.argv[1], *(int(a) for a in sys.argv[2:]))
