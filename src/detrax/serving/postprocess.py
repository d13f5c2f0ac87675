"""Model outputs -> detections, as the official PostProcess and HF's post_process_object_detection."""

import jax
import jax.numpy as jnp
import numpy as np

from detrax.models.box_ops import box_cxcywh_to_xyxy

THRESHOLD = 0.7  # the score a detection must pass to be reported, by default (the official demo's)


def postprocess(outputs, target_sizes, class_ids=()):
    """outputs: the model's dict; target_sizes [B, 2] as (height, width) of each original image; class_ids: the
    category id of each class output (the model config's; empty: the output index is the id).

    Returns scores [B, Q], labels [B, Q] (category ids) and boxes [B, Q, 4] absolute (x0, y0, x1, y1),
    no-object dropped.
    """
    prob = jax.nn.softmax(outputs["pred_logits"], axis=-1)  # [B, Q, C + 1]
    scores = prob[..., :-1].max(-1)  # [B, Q]
    labels = prob[..., :-1].argmax(-1)  # [B, Q]
    if len(class_ids):
        labels = jnp.asarray(class_ids, jnp.int32)[labels]  # [B, Q]
    sizes = jnp.asarray(target_sizes, jnp.float32)  # [B, 2]
    scale = jnp.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=-1)  # [B, 4]
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"]) * scale[:, None, :]  # [B, Q, 4]
    return scores, labels, boxes


def select(scores, labels, boxes, threshold: float | dict = THRESHOLD):
    """One dict of NumPy arrays per image with the detections scoring above `threshold` (a number, or {category
    id: number}, THRESHOLD for a category it lacks: `detrax eval`'s thresholds.json), best first: scores, labels,
    boxes and the index of the query that made each."""
    scores, labels, boxes = np.asarray(scores), np.asarray(labels), np.asarray(boxes)
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        cut = np.array([threshold.get(int(k), THRESHOLD) for k in lab]) if isinstance(threshold, dict) else threshold
        keep = np.flatnonzero(s > cut)
        keep = keep[np.argsort(-s[keep], kind="stable")]
        results.append({"scores": s[keep], "labels": lab[keep], "boxes": b[keep], "queries": keep})
    return results
