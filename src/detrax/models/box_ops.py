"""Box conversions and overlaps, as in the official util/box_ops.py."""

import jax.numpy as jnp


def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = jnp.moveaxis(b, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)  # [..., 4]


def box_area(b):
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # [...]


def box_iou(a, b):
    """Pairwise IoU of xyxy boxes a [N, 4] and b [M, 4]; also returns the union."""
    area_a, area_b = box_area(a), box_area(b)  # [N], [M]
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = jnp.clip(rb - lt, 0)  # [N, M, 2]
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter  # [N, M]
    return inter / union, union


def generalized_box_iou(a, b):
    """Pairwise generalized IoU (https://giou.stanford.edu/) of xyxy boxes a [N, 4] and b [M, 4]: [N, M]."""
    iou, union = box_iou(a, b)  # [N, M]
    lt = jnp.minimum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = jnp.clip(rb - lt, 0)  # [N, M, 2]
    hull = wh[..., 0] * wh[..., 1]  # [N, M]
    return iou - (hull - union) / hull


def elementwise_generalized_box_iou(a, b):
    """Generalized IoU of paired xyxy boxes a [..., 4] and b [..., 4]: [...] (the diagonal of the pairwise)."""
    area_a, area_b = box_area(a), box_area(b)  # [...]
    lt = jnp.maximum(a[..., :2], b[..., :2])  # [..., 2]
    rb = jnp.minimum(a[..., 2:], b[..., 2:])  # [..., 2]
    wh = jnp.clip(rb - lt, 0)  # [..., 2]
    inter = wh[..., 0] * wh[..., 1]  # [...]
    union = area_a + area_b - inter  # [...]
    hull_wh = jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0)  # [..., 2]
    hull = hull_wh[..., 0] * hull_wh[..., 1]  # [...]
    return inter / union - (hull - union) / hull
