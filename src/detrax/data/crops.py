"""The training set's objects cut out at the detector's scale, for the backbone's warm-up as a classifier
(`crop_warmup.py`): each object in square windows of `size` pixels, as they would appear in a training batch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from detrax.config.schema import DataConfig
from detrax.data.coco import load_image
from detrax.data.transforms import resized_size

SIZE = 64  # pixels a side of a window, at the detector's scale
JITTER = 0.15  # a window's centre moves up to this fraction of the object's size off the object's centre


def object_crops(records, data: DataConfig, variants: int = 8, max_crops: int = 16384, seed: int = 0,
                 size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Every object of `records` (boxes absolute xyxy, labels category ids) in `variants` windows of `size`
    pixels: each at a scale the training resize can give its image (a shorter side drawn from `data.scales`, or
    `data.val_size` without augmentation, the longer at most `data.max_size`), centred on the object give or take
    `JITTER`; the image's outside black. Images are read in order until `max_crops` windows are cut. Returns
    (uint8 [N, size, size, 3], category ids [N] int32); none if the records hold no object."""
    rng = np.random.default_rng(seed)
    scales = data.scales if data.augment else (data.val_size,)
    windows: list[np.ndarray] = []
    labels: list[int] = []
    for record in records:
        if len(windows) + variants * len(record["labels"]) > max_crops:
            break
        if not len(record["labels"]):
            continue
        image = load_image(record)
        for (x0, y0, x1, y1), label in zip(record["boxes"], record["labels"]):
            for _ in range(variants):
                h, _ = resized_size(record["width"], record["height"], int(rng.choice(scales)), data.max_size)
                side = size * record["height"] / h  # the window's side in the image's own pixels
                cx = (x0 + x1) / 2 + rng.uniform(-JITTER, JITTER) * (x1 - x0)
                cy = (y0 + y1) / 2 + rng.uniform(-JITTER, JITTER) * (y1 - y0)
                box = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
                window = image.crop(box)  # black where it leaves the image
                windows.append(np.asarray(window.resize((size, size), Image.Resampling.BILINEAR)))
                labels.append(int(label))
    if not windows:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    return np.stack(windows), np.asarray(labels, np.int32)
