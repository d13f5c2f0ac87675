"""Synthetic scenes: coloured shapes on textured backgrounds, deterministic from a seed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "ellipse", "triangle")


def scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 5):
    """One image with 1..max_objects shapes: (PIL RGB image, boxes [N, 4] absolute xyxy, labels [N])."""
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(height // 8 + 1, width // 8 + 1, 1))
    texture = np.kron(noise, np.ones((8, 8, 1)))[:height, :width]
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        w = int(rng.integers(max(8, width // 10), max(9, width // 3)))
        h = int(rng.integers(max(8, height // 10), max(9, height // 3)))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        label = int(rng.integers(len(SHAPES)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
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
