"""The set loss of the official SetCriterion: every decoder layer matched on its own, then cross-entropy over all
queries (no-object weighted `eos_coef`), and L1 and GIoU over matched pairs divided by the number of target boxes.

`num_boxes` is the count of valid targets in the (global) batch, at least 1: with arrays sharded over devices
and hosts this is the count over all of them, as the official all-reduce. Inside `shard_map`, pass `axis_name`.
Names follow the official ones: `loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`, `class_error` for
the last layer, with `_i` for decoder layer i of the auxiliary outputs (no `class_error_i`, as the official).
With Group DETR's extra query groups (the model's `group_outputs`, in training), every layer of every group is
matched on its own in the same batched call; `loss` adds the groups' weighted losses, also reported alone as
`loss_groups`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from detrax.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detrax.configs import LossConfig
from detrax.matching import cost_matrix, match


def layer_losses(logits, boxes, tgt_labels, tgt_boxes, valid, query_for_target, num_boxes, eos_coef):
    """Losses of stacked layers: logits [L, B, N, C+1], boxes [L, B, N, 4], targets [B, M] / [B, M, 4],
    query_for_target [L, B, M] -> dict of [L] arrays."""
    num_classes = logits.shape[-1] - 1
    n = logits.shape[-2]
    hit = (query_for_target[..., None, :] == jnp.arange(n)[:, None]) & valid[:, None, :]  # [L, B, N, M]
    matched = hit.any(-1)  # [L, B, N]
    target_classes = jnp.where(matched, (hit * tgt_labels[:, None, :]).sum(-1), num_classes)  # [L, B, N]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [L, B, N, C+1]
    nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]  # [L, B, N]
    w = jnp.where(target_classes == num_classes, eos_coef, 1.0)  # [L, B, N]
    loss_ce = (w * nll).sum((1, 2)) / w.sum((1, 2))  # [L]

    idx = jnp.clip(query_for_target, 0)[..., None]  # [L, B, M, 1]
    src = jnp.take_along_axis(boxes.astype(jnp.float32), idx, axis=2)  # [L, B, M, 4]
    vf = valid.astype(jnp.float32)  # [B, M]
    loss_bbox = (jnp.abs(src - tgt_boxes).sum(-1) * vf).sum((1, 2)) / num_boxes  # [L]
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt_boxes))  # [L, B, M]
    loss_giou = ((1 - jnp.where(valid, giou, 1.0)) * vf).sum((1, 2)) / num_boxes  # [L]

    card_pred = (logits.argmax(-1) != num_classes).sum(-1)  # [L, B]
    cardinality_error = jnp.abs(card_pred - valid.sum(-1)).mean(-1).astype(jnp.float32)  # [L]
    src_logits = jnp.take_along_axis(logits, idx, axis=2)  # [L, B, M, C+1]
    correct = ((src_logits.argmax(-1) == tgt_labels) & valid).sum((1, 2))  # [L]
    class_error = 100.0 - 100.0 * correct / jnp.maximum(valid.sum(), 1)  # [L]; 100 with no target, as official
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
            "cardinality_error": cardinality_error, "class_error": class_error}


def set_loss(outputs, targets, cfg: LossConfig | None = None, *, axis_name=None, mesh=None) -> dict:
    """outputs: the model's dict; targets: `labels` [B, M] int, `boxes` [B, M, 4] normalised (cx, cy, w, h),
    `valid` [B, M] bool; `cfg`: the matcher, its cost weights, the loss weights, the no-object weight and whether
    the auxiliary layers count (None: the official `LossConfig()`). Returns every term (see the module doc) and
    `loss`, the weighted total."""
    cfg = cfg or LossConfig()
    weights = {"loss_ce": cfg.ce_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
    groups = [outputs, *outputs.get("group_outputs", [])]
    per_group = len(outputs.get("aux_outputs", [])) * cfg.aux_loss + 1  # decoder layers scored in each group
    layers = [o for g in groups for o in (list(g.get("aux_outputs", [])) if cfg.aux_loss else []) + [g]]
    logits = jnp.stack([o["pred_logits"] for o in layers])  # [L, B, N, C+1]
    boxes = jnp.stack([o["pred_boxes"] for o in layers])  # [L, B, N, 4]
    labels, tgt_boxes = jnp.asarray(targets["labels"], jnp.int32), jnp.asarray(targets["boxes"], jnp.float32)
    valid = jnp.asarray(targets["valid"], bool)
    cost = cost_matrix(logits, boxes, labels, tgt_boxes, cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)  # [G*L, B, N, M]
    query_for_target = match(cost, valid, cfg.matcher, mesh)  # [G*L, B, M]
    num_boxes = valid.sum().astype(jnp.float32)
    if axis_name is not None:
        num_boxes = jax.lax.psum(num_boxes, axis_name)
    num_boxes = jnp.maximum(num_boxes, 1.0)
    terms = layer_losses(logits, boxes, labels, tgt_boxes, valid, query_for_target, num_boxes, cfg.eos_coef)
    last = per_group - 1
    out = {}
    for name, values in terms.items():
        out[name] = values[last]
        if name != "class_error":
            out.update({f"{name}_{i}": values[i] for i in range(last)})
    out["loss"] = sum(w * out[k] + sum(w * out[f"{k}_{i}"] for i in range(last)) for k, w in weights.items())
    if len(groups) > 1:
        out["loss_groups"] = sum(w * terms[k][per_group:].sum() for k, w in weights.items())
        out["loss"] = out["loss"] + out["loss_groups"]
    return out

