"""Batches with static shapes: images padded into shape buckets with their masks, targets padded to a fixed
count with a validity mask.

A batch is padded to the smallest bucket that holds its largest image: height and width rounded up to a
multiple of `step`. The buckets form a small fixed set, so XLA compiles a few shapes and not one per batch, and
no batch pays for the worst case (1333 x 1333).
"""

from __future__ import annotations

import numpy as np

from detrax.data.coco import DataError

DUMMY_BOX = np.array([0.5, 0.5, 1.0, 1.0], np.float32)  # fills padded target slots: finite in every box op


def bucket_shape(h: int, w: int, step: int) -> tuple[int, int]:
    return -(-h // step) * step, -(-w // step) * step


def group_by_shape(shapes, step: int, batch_size: int) -> list[list[int]]:
    """Indices of images of (height, width) `shapes` grouped by their bucket (buckets in order of first
    appearance, indices in order within each), cut into batches of at most `batch_size`: every image is padded
    to its own bucket, whatever else is in its batch (evaluation and inference)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(shapes):
        groups.setdefault(bucket_shape(int(h), int(w), step), []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def fill_size(n: int, batch_size: int, multiple: int = 1) -> int:
    """How many examples a short batch of `n` is filled to: `multiple` (the devices it is sharded over) times a
    power of two, at most `batch_size`. Few sizes to compile per bucket (log2 of the batch), and a bucket that
    holds one image does not pay for a batch of blanks (on a CPU each blank costs a whole forward)."""
    k = -(-n // multiple)
    return min(batch_size, multiple * (1 << (k - 1).bit_length()))


class Collate:
    """[(pixels [h, w, 3] uint8, target)] -> one batch dict of NumPy arrays:
      pixels [B, H, W, 3] uint8 (see transforms.normalize_batch), mask [B, H, W] bool (True on real pixels),
      labels [B, M] int32, boxes [B, M, 4] float32 normalised (cx, cy, w, h), valid [B, M] bool,
      image_id [B] int64, orig_size [B, 2] and size [B, 2] (height, width), real [B] bool;
      with masks in the targets, masks [B, M, H, W] bool (False on padding and in empty slots).
    With `batch_size`, a short batch is filled with blank examples (real False, no valid target) to
    `fill_size(n, batch_size, multiple)`."""

    def __init__(self, max_targets: int, step: int, batch_size: int | None = None, multiple: int = 1):
        self.max_targets, self.step, self.batch_size, self.multiple = max_targets, step, batch_size, multiple

    def __call__(self, examples, shape: tuple[int, int] | None = None):
        """`shape`: the least (height, width) to pad to (the bucket of the largest image, by default)."""
        n = fill_size(len(examples), self.batch_size, self.multiple) if self.batch_size else len(examples)
        h, w = max(x.shape[0] for x, _ in examples), max(x.shape[1] for x, _ in examples)
        if shape is not None:
            h, w = max(h, shape[0]), max(w, shape[1])
        h, w = bucket_shape(h, w, self.step)
        m = self.max_targets
        out = {"pixels": np.zeros((n, h, w, 3), np.uint8), "mask": np.zeros((n, h, w), bool),
               "labels": np.zeros((n, m), np.int32), "boxes": np.tile(DUMMY_BOX, (n, m, 1)),
               "valid": np.zeros((n, m), bool), "image_id": np.full(n, -1, np.int64),
               "orig_size": np.ones((n, 2), np.int32), "size": np.ones((n, 2), np.int32), "real": np.zeros(n, bool)}
        if any("masks" in t for _, t in examples):
            out["masks"] = np.zeros((n, m, h, w), bool)
        out["mask"][:, 0, 0] = True  # blank examples see one pixel, so that attention stays finite
        for i, (x, t) in enumerate(examples):
            k = len(t["labels"])
            if k > m:
                raise DataError(f"image {t['image_id']} has {k} boxes, more than max_targets={m}; raise "
                                "max_targets (at most the number of queries)")
            out["pixels"][i, :x.shape[0], :x.shape[1]] = x
            out["mask"][i, 0, 0] = False
            out["mask"][i, :x.shape[0], :x.shape[1]] = True
            out["labels"][i, :k], out["boxes"][i, :k], out["valid"][i, :k] = t["labels"], t["boxes"], True
            out["image_id"][i], out["orig_size"][i], out["size"][i] = t["image_id"], t["orig_size"], x.shape[:2]
            out["real"][i] = True
            if "masks" in out:
                out["masks"][i, :k, :x.shape[0], :x.shape[1]] = t["masks"]
        return out


def padding_waste(batch) -> float:
    """The share of padded pixels among the real images' canvas."""
    real = batch["real"]
    return 1.0 - float(batch["mask"][real].sum()) / max(1, real.sum() * batch["mask"][0].size)
