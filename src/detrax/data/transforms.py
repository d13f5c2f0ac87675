"""The official DETR image transforms, in NumPy and PIL (datasets/transforms.py of facebookresearch/detr)."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resized_size(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the longer at most `max_size`, as the official
    `get_size_with_aspect_ratio`."""
    if max_size is not None:
        lo, hi = float(min(width, height)), float(max(width, height))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Image.Image, size: int, max_size: int | None = None) -> Image.Image:
    h, w = resized_size(image.width, image.height, size, max_size)
    return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.BILINEAR)


def normalize(image: Image.Image) -> np.ndarray:
    """An RGB PIL image -> [H, W, 3] float32 normalised with the ImageNet mean and std."""
    x = np.asarray(image, np.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD
