"""The set loss of the official SetCriterion: every decoder layer matched on its own, then cross-entropy over all
queries (no-object weighted `eos_coef`), and L1 and GIoU over matched pairs divided by the number of target boxes.

`num_boxes` is the count of valid targets in the (global) batch, at least 1: with arrays sharded over devices
and hosts this is the count over all of them, as the official all-reduce. Inside `shard_map`, pass `axis_name`.
Names follow the official ones: `loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`, `class_error` for
the last layer, with `_i` for decoder layer i of the auxiliary outputs (no `class_error_i`, as the official).
With Group DETR's extra query groups (the model's `group_outputs`, in training), every layer of every group is
matched on its own in the same batched call; `loss` adds the groups' weighted losses, also reported alone as
`loss_groups`. With DN-DETR's denoising groups (`dn_outputs`), query i of every layer of every group is scored
against target i, no matching: `loss_dn`. With the mask head's `pred_masks` and target `masks`, the official
`loss_mask` (sigmoid focal) and `loss_dice` of the last layer's matched masks join the sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from detrax.config.schema import LossConfig
from detrax.criterion.matching import cost_matrix, match
from detrax.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detrax.models.encoder_head import assign
from detrax.models.mask_head import resize_bilinear


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


def mask_losses(pred_masks, tgt_masks, valid, query_for_target, num_boxes, alpha: float = 0.25,
                gamma: float = 2.0):
    """The official loss_masks: pred_masks [B, N, h, w] logits; tgt_masks [B, M, H, W] (the padded images' size);
    query_for_target [B, M]. Each matched mask is upsampled (bilinear) to H x W; sigmoid focal loss averaged over
    the pixels and dice loss, summed over the matched targets and divided by num_boxes."""
    idx = jnp.clip(query_for_target, 0)[:, :, None, None]  # [B, M, 1, 1]
    src = jnp.take_along_axis(pred_masks.astype(jnp.float32), idx, axis=1)  # [B, M, h, w]
    x = resize_bilinear(src, tgt_masks.shape[-2:])  # [B, M, H, W]
    t = tgt_masks.astype(jnp.float32)  # [B, M, H, W]
    prob = jax.nn.sigmoid(x)
    ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))  # binary cross-entropy with logits
    p_t = prob * t + (1 - prob) * (1 - t)
    focal = (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma  # [B, M, H, W]
    dice = 1 - (2 * (prob * t).sum((2, 3)) + 1) / (prob.sum((2, 3)) + t.sum((2, 3)) + 1)  # [B, M]
    vf = valid.astype(jnp.float32)  # [B, M]
    return {"loss_mask": (focal.mean((2, 3)) * vf).sum() / num_boxes, "loss_dice": (dice * vf).sum() / num_boxes}


def encoder_losses(enc, labels, tgt_boxes, valid, eos_coef, axis_name=None):
    """The encoder head's dense losses (`encoder_head.py`): cross-entropy over the image's tokens (no-object
    weighted `eos_coef`); L1 and GIoU of the positive tokens' boxes, averaged over the positive tokens (of all
    devices with `axis_name`); L1 of every token's own centre (`loss_centre`), averaged over the tokens."""
    num_classes = enc["pred_logits"].shape[-1] - 1
    target, positive = assign(enc["centres"], enc["grid"], labels, tgt_boxes, valid)  # [B, T] each
    classes = jnp.where(positive, jnp.take_along_axis(labels, target, axis=1), num_classes)  # [B, T]
    logp = jax.nn.log_softmax(enc["pred_logits"], axis=-1)  # [B, T, C+1]
    nll = -jnp.take_along_axis(logp, classes[..., None], axis=-1)[..., 0]  # [B, T]
    w = jnp.where(positive, 1.0, eos_coef) * enc["token_valid"]  # [B, T]
    pos = (positive & enc["token_valid"]).astype(jnp.float32)  # [B, T]
    num_pos = pos.sum() if axis_name is None else jax.lax.psum(pos.sum(), axis_name)
    num_pos = jnp.maximum(num_pos, 1.0)
    tgt = jnp.take_along_axis(tgt_boxes, target[..., None], axis=1)  # [B, T, 4]
    src = enc["pred_boxes"]  # [B, T, 4]
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))  # [B, T]
    tokens = enc["token_valid"].astype(jnp.float32)  # [B, T]
    where = jnp.abs(enc["pred_centres"] - enc["centres"]).sum(-1)  # [B, T]
    return {"loss_ce": (w * nll).sum() / jnp.maximum(w.sum(), 1e-6),
            "loss_bbox": (jnp.abs(src - tgt).sum(-1) * pos).sum() / num_pos,
            "loss_centre": (where * tokens).sum() / jnp.maximum(tokens.sum(), 1.0),
            "loss_giou": ((1 - jnp.where(pos > 0, giou, 1.0)) * pos).sum() / num_pos}


def set_loss(outputs, targets, cfg: LossConfig | None = None, *, axis_name=None, mesh=None) -> dict:
    """outputs: the model's dict; targets: `labels` [B, M] int, `boxes` [B, M, 4] normalised (cx, cy, w, h),
    `valid` [B, M] bool, and with a mask head `masks` [B, M, H, W] bool at the padded images' size; `cfg`: the
    matcher, its cost weights, the loss weights, the no-object weight and whether the auxiliary layers count
    (None: the official `LossConfig()`). Returns every term (see the module doc) and `loss`, the weighted total."""
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
    if "pred_masks" in outputs and "masks" in targets:  # the official: the last layer only
        out.update(mask_losses(outputs["pred_masks"], jnp.asarray(targets["masks"]), valid, query_for_target[last],
                               num_boxes))
        out["loss"] = out["loss"] + cfg.mask_weight * out["loss_mask"] + cfg.dice_weight * out["loss_dice"]
    if len(groups) > 1:
        out["loss_groups"] = sum(w * terms[k][per_group:].sum() for k, w in weights.items())
        out["loss"] = out["loss"] + out["loss_groups"]
    if outputs.get("dn_outputs"):  # denoising: query i of each group gives target i back, every layer scored
        dn = [o for g in outputs["dn_outputs"] for o in (list(g.get("aux_outputs", [])) if cfg.aux_loss else []) + [g]]
        dn_logits = jnp.stack([o["pred_logits"] for o in dn])  # [K*L, B, Q, C+1]
        identity = jnp.broadcast_to(jnp.arange(labels.shape[1]), (len(dn),) + labels.shape)  # [K*L, B, M]
        dn_terms = layer_losses(dn_logits, jnp.stack([o["pred_boxes"] for o in dn]), labels, tgt_boxes, valid,
                                identity, num_boxes, cfg.eos_coef)
        out["loss_dn"] = sum(w * dn_terms[k].sum() for k, w in weights.items())
        out["loss"] = out["loss"] + out["loss_dn"]
    if "enc_outputs" in outputs:  # the encoder head's dense one-to-many supervision
        enc = encoder_losses(outputs["enc_outputs"], labels, tgt_boxes, valid, cfg.eos_coef, axis_name)
        out["loss_enc"] = sum(w * enc[k] for k, w in weights.items()) + cfg.bbox_weight * enc["loss_centre"]
        out["loss"] = out["loss"] + cfg.enc_weight * out["loss_enc"]
    return out

