"""Mask outputs -> instance masks and panoptic segments, as the official PostProcessSegm and PostProcessPanoptic
(NumPy, on the host, one image at a time).

Both first keep the part of the mask map that covers the image (rows and columns ceil(h / 4), ceil(w / 4) of a
padded batch) before upsampling it to the image: the official code upsamples the whole padded map, which equals
this for an unpadded image and misplaces masks for a padded one.
"""

from __future__ import annotations

import math

import numpy as np

from detrax.data.masks import id2rgb, rgb2id
from detrax.models.mask_head import resize_bilinear
from detrax.models.position_encoding import resize_axis

THRESHOLD = 0.85  # the score a query must pass to compete for pixels (the official PostProcessPanoptic's)


def _image_masks(masks, size):
    """masks [K, h4, w4] of the padded batch -> [K, h, w] logits over the image of `size` (h, w)."""
    h, w = size
    crop = np.asarray(masks, np.float32)[:, :math.ceil(h / 4), :math.ceil(w / 4)]
    return np.asarray(resize_bilinear(crop, (h, w)))


def _resize_ids(ids, size):
    """An id map to `size` (h, w) by PIL's nearest resampling (as the official, through the RGB PNG)."""
    from PIL import Image

    if tuple(ids.shape) == tuple(size):
        return ids
    img = Image.fromarray(id2rgb(ids)).resize((size[1], size[0]), resample=Image.NEAREST)
    return rgb2id(np.asarray(img))


def instance_masks(masks, size, target_size=None, threshold: float = 0.5):
    """masks [K, h4, w4] (the kept queries' mask logits), the image's `size` (h, w) as fed to the model ->
    [K, H, W] bool at `target_size` (default: `size`): sigmoid above `threshold`, then nearest resizing."""
    m = _image_masks(masks, size) > math.log(threshold / (1 - threshold))  # sigmoid(x) > t
    if target_size is None or tuple(target_size) == tuple(size):
        return m
    m = resize_axis(m, 1, size[0], target_size[0])  # torch's nearest, as the official
    return np.asarray(resize_axis(m, 2, size[1], target_size[1]))


def panoptic_segments(logits, masks, size, target_size=None, is_thing=None, class_ids=(),
                      threshold: float = THRESHOLD, min_area: int = 5):
    """One image's panoptic segmentation, as the official PostProcessPanoptic.

    logits [Q, C + 1]; masks [Q, h4, w4] (the model's `pred_masks` of this image); `size` (h, w) the image as fed
    to the model; `target_size` (H, W) of the output (default `size`); `is_thing` {category_id: bool} (missing:
    thing); `class_ids` the category id of each class output (empty: the index). Queries that are not no-object
    and score above `threshold` compete for each pixel (the highest mask logit wins); queries of one stuff
    category merge into one segment; segments under `min_area` pixels at the output size are dropped and the
    others compete again, until none is.

    Returns (ids [H, W] uint32: segment ids from 1, 0 where no segment, segments: [{"id", "category_id",
    "isthing", "area", "score"}]).
    """
    logits = np.asarray(logits, np.float64)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    scores, labels = prob.max(-1), prob.argmax(-1)  # [Q] each
    keep = np.flatnonzero((labels != logits.shape[-1] - 1) & (scores > threshold))
    cats = [int(class_ids[c]) if len(class_ids) else int(c) for c in labels[keep]]
    is_thing = is_thing or {}
    thing = [bool(is_thing.get(c, True)) for c in cats]
    image = _image_masks(np.asarray(masks)[keep], size) if len(keep) else np.zeros((0,) + tuple(size), np.float32)
    target_size = tuple(target_size or size)
    alive = list(range(len(keep)))
    while True:
        if alive:
            owner = np.asarray(alive)[image[alive].argmax(0)]  # [h, w] the winning query (index into keep)
            first: dict[int, int] = {}
            for k in alive:  # each stuff category's first query takes its others' pixels
                if not thing[k]:
                    first.setdefault(cats[k], k)
            lookup = np.arange(len(keep))
            for k in alive:
                if not thing[k]:
                    lookup[k] = first[cats[k]]
            ids = _resize_ids((lookup[owner] + 1).astype(np.uint32), target_size)  # 0: none
        else:
            ids = np.zeros(target_size, np.uint32)
        area = np.bincount(ids.ravel(), minlength=len(keep) + 1)[1:]  # [K]
        small = [k for k in alive if area[k] < min_area]
        if not small:
            break
        alive = [k for k in alive if area[k] >= min_area]
    order = {k: i + 1 for i, k in enumerate(alive)}  # segment ids 1..n in query order
    remap = np.zeros(len(keep) + 1, np.uint32)
    for k, i in order.items():
        remap[k + 1] = i
    segments = [{"id": order[k], "category_id": cats[k], "isthing": thing[k], "area": int(area[k]),
                 "score": float(scores[keep[k]])} for k in alive]
    return remap[ids], segments
