"""The official DETR image transforms, in NumPy and PIL (datasets/transforms.py of facebookresearch/detr)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from detrax.config.schema import DataConfig


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
    return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.Resampling.BILINEAR)


# ---------------------------------------------------------------- the official augmentations, on (image, target)
# target: {"boxes": [n, 4] absolute xyxy float32, "labels": [n] int, optionally "masks": [n, H, W] bool};
# rng: np.random.Generator


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    """torch's nearest source indices (F.interpolate(mode="nearest")): floor(dst * in / out) in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

def hflip(image: Image.Image, target: dict):
    w = image.width
    boxes = target["boxes"][:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([w, 0, w, 0],
                                                                                                 np.float32)
    target = {**target, "boxes": boxes}
    if "masks" in target:
        target["masks"] = target["masks"][:, :, ::-1]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target


def resize_with_target(image: Image.Image, target: dict, size: int, max_size: int | None = None):
    out = resize(image, size, max_size)
    ratio = np.array([out.width / image.width, out.height / image.height] * 2, np.float32)
    target = {**target, "boxes": target["boxes"] * ratio}
    if "masks" in target and out.size != image.size:  # the official: nearest, as F.interpolate
        target["masks"] = target["masks"][:, _nearest(image.height, out.height)][:, :, _nearest(image.width, out.width)]
    return out, target


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int):
    """Crop; boxes are shifted and clipped, and those left empty are dropped (with their labels)."""
    boxes = target["boxes"] - np.array([left, top, left, top], np.float32)
    boxes = np.minimum(boxes.reshape(-1, 2, 2), np.array([width, height], np.float32)).clip(0).reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}
    if "masks" in target:
        target["masks"] = target["masks"][keep, top:top + height, left:left + width]
    return image.crop((left, top, left + width, top + height)), target


def train_plan(height: int, width: int, rng, cfg: DataConfig):
    """Every random draw of the official training transform, in the official order, made from the image's size
    alone: RandomHorizontalFlip, then RandomSelect(RandomResize(scales, max_size), Compose(RandomResize(
    crop_scales), RandomSizeCrop(*crop_size), RandomResize(scales, max_size))). Returns (steps, (height, width)
    of the result) with the sizes of `cfg`; steps are ("flip",), ("resize", size, max_size), ("crop", top, left,
    height, width). The batcher plans shapes with it before any pixel is read."""
    steps: list[tuple] = []
    h, w = height, width
    if rng.random() < 0.5:
        steps.append(("flip",))

    def resize(sizes, most):
        nonlocal h, w
        size = int(sizes[rng.integers(len(sizes))])
        steps.append(("resize", size, most))
        h, w = resized_size(w, h, size, most)

    if rng.random() < 0.5:
        resize(cfg.scales, cfg.max_size)
    else:
        resize(cfg.crop_scales, None)
        lo, hi = cfg.crop_size  # RandomSizeCrop: a random size in [lo, hi] (capped by the image), a random place
        cw = int(rng.integers(lo, min(w, hi) + 1)) if w >= lo else w
        ch = int(rng.integers(lo, min(h, hi) + 1)) if h >= lo else h
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        steps.append(("crop", top, left, ch, cw))
        h, w = ch, cw
        resize(cfg.scales, cfg.max_size)
    return steps, (h, w)


def normalize_batch(pixels, mask, mean, std):
    """uint8 pixels [B, H, W, 3] and mask [B, H, W] -> float32 pixels normalised with `mean` and `std` (of [0, 1]
    RGB: a model config's pixel_mean / pixel_std), zero on padding, as the official ToTensor + Normalize then zero
    padding. Runs wherever its inputs live (jit it to run on device): batches cross process boundaries and
    host-device transfers as uint8, four times smaller than float32."""
    import jax.numpy as jnp

    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    x = (jnp.asarray(pixels, jnp.float32) / 255.0 - mean) / std
    return x * jnp.asarray(mask, jnp.float32)[..., None]  # a product, not a select: ONNX Runtime broadcasts it faster


def to_model_input(image, target):
    """uint8 pixels [H, W, 3] (normalised later, by `normalize_batch`) and boxes as normalised (cx, cy, w, h)."""
    boxes = target["boxes"]
    cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                       boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], -1)
    wh = np.array([image.width, image.height] * 2, np.float32)
    return np.asarray(image, np.uint8), {**target, "boxes": (cxcywh / wh).astype(np.float32).reshape(-1, 4)}


def train_transform(image, target, rng, cfg: DataConfig):
    """The official training transform with the sizes of `cfg` (see `train_plan`), then Normalize."""
    steps, _ = train_plan(image.height, image.width, rng, cfg)
    for op, *args in steps:
        if op == "flip":
            image, target = hflip(image, target)
        elif op == "resize":
            image, target = resize_with_target(image, target, *args)
        else:
            image, target = crop(image, target, *args)
    return to_model_input(image, target)


def val_transform(image, target, size: int, max_size: int | None):
    """RandomResize([size], max_size), then Normalize."""
    return to_model_input(*resize_with_target(image, target, size, max_size))
