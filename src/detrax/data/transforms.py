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


# ---------------------------------------------------------------- the official augmentations, on (image, target)
# target: {"boxes": [n, 4] absolute xyxy float32, "labels": [n] int}; rng: np.random.Generator

def hflip(image: Image.Image, target: dict):
    w = image.width
    boxes = target["boxes"][:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([w, 0, w, 0],
                                                                                                 np.float32)
    return image.transpose(Image.FLIP_LEFT_RIGHT), {**target, "boxes": boxes}


def resize_with_target(image: Image.Image, target: dict, size: int, max_size: int | None = None):
    out = resize(image, size, max_size)
    ratio = np.array([out.width / image.width, out.height / image.height] * 2, np.float32)
    return out, {**target, "boxes": target["boxes"] * ratio}


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int):
    """Crop; boxes are shifted and clipped, and those left empty are dropped (with their labels)."""
    boxes = target["boxes"] - np.array([left, top, left, top], np.float32)
    boxes = np.minimum(boxes.reshape(-1, 2, 2), np.array([width, height], np.float32)).clip(0).reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return (image.crop((left, top, left + width, top + height)),
            {**target, "boxes": boxes[keep], "labels": target["labels"][keep]})


def random_horizontal_flip(image, target, rng, p=0.5):
    return hflip(image, target) if rng.random() < p else (image, target)


def random_resize(image, target, rng, sizes, max_size=None):
    return resize_with_target(image, target, int(sizes[rng.integers(len(sizes))]), max_size)


def random_size_crop(image, target, rng, min_size: int, max_size: int):
    """The official RandomSizeCrop: a crop of random size in [min_size, max_size] (capped by the image) at a
    random place."""
    w = int(rng.integers(min_size, min(image.width, max_size) + 1)) if image.width >= min_size else image.width
    h = int(rng.integers(min_size, min(image.height, max_size) + 1)) if image.height >= min_size else image.height
    top = int(rng.integers(0, image.height - h + 1))
    left = int(rng.integers(0, image.width - w + 1))
    return crop(image, target, top, left, h, w)


def normalize_batch(pixels, mask):
    """uint8 pixels [B, H, W, 3] and mask [B, H, W] -> float32 normalised pixels, zero on padding, as the official
    ToTensor + Normalize then zero padding. Runs wherever its inputs live (jit it to run on device): batches
    cross process boundaries and host-device transfers as uint8, four times smaller than float32."""
    import jax.numpy as jnp

    x = (jnp.asarray(pixels, jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return jnp.where(jnp.asarray(mask)[..., None], x, 0.0)


def to_model_input(image, target):
    """uint8 pixels [H, W, 3] (normalised later, by `normalize_batch`) and boxes as normalised (cx, cy, w, h)."""
    boxes = target["boxes"]
    cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                       boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], -1)
    wh = np.array([image.width, image.height] * 2, np.float32)
    return np.asarray(image, np.uint8), {**target, "boxes": (cxcywh / wh).astype(np.float32).reshape(-1, 4)}


def train_transform(image, target, rng, scales, max_size=1333, crop_scales=(400, 500, 600), crop_size=(384, 600)):
    """RandomHorizontalFlip, then RandomSelect(RandomResize(scales, max_size), Compose(RandomResize(crop_scales),
    RandomSizeCrop(*crop_size), RandomResize(scales, max_size))), then Normalize."""
    image, target = random_horizontal_flip(image, target, rng)
    if rng.random() < 0.5:
        image, target = random_resize(image, target, rng, scales, max_size)
    else:
        image, target = random_resize(image, target, rng, crop_scales)
        image, target = random_size_crop(image, target, rng, *crop_size)
        image, target = random_resize(image, target, rng, scales, max_size)
    return to_model_input(image, target)


def val_transform(image, target, size=800, max_size=1333):
    """RandomResize([size], max_size), then Normalize."""
    return to_model_input(*resize_with_target(image, target, size, max_size))
