"""The mask codecs that data, serving and evaluation share: panoptic PNG ids (COCO's RGB encoding,
id = R + 256 G + 256^2 B) and COCO's run-length encoding (RLE) of instance masks."""

from __future__ import annotations

import numpy as np


def rgb2id(rgb) -> np.ndarray:
    """[H, W, 3] RGB -> [H, W] segment ids (R + 256 G + 256^2 B)."""
    rgb = np.asarray(rgb, np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids) -> np.ndarray:
    """[H, W] segment ids -> [H, W, 3] uint8 RGB."""
    ids = np.asarray(ids, np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def rle_encode(masks) -> list[dict]:
    """[K, H, W] bool -> K COCO RLEs ({"size": [H, W], "counts": str}), JSON-ready."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks).transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]
