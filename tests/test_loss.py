"""The set loss against HF transformers' DETR loss (ImageLoss + HungarianMatcher), every term, aux included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled_loss, require

import detrax
from detrax.config.schema import LossConfig
from detrax.criterion.loss import layer_losses

torch = require("torch")
hf_loss = require("transformers.loss.loss_for_object_detection")

L, B, N, C, M = 6, 3, 20, 7, 6


def _problem(rs, counts=(3, 0, 6)):
    logits = rs.normal(size=(L, B, N, C + 1)).astype(np.float32) * 2
    boxes = np.concatenate([rs.uniform(0.2, 0.8, (L, B, N, 2)), rs.uniform(0.05, 0.4, (L, B, N, 2))], -1)
    labels = rs.integers(0, C, (B, M))
    tboxes = np.concatenate([rs.uniform(0.2, 0.8, (B, M, 2)), rs.uniform(0.05, 0.4, (B, M, 2))], -1)
    valid = np.arange(M)[None, :] < np.array(counts)[:, None]
    return logits, boxes.astype(np.float32), labels, tboxes.astype(np.float32), valid


def _outputs(logits, boxes):
    return {"pred_logits": jnp.asarray(logits[-1]), "pred_boxes": jnp.asarray(boxes[-1]),
            "aux_outputs": [{"pred_logits": jnp.asarray(a), "pred_boxes": jnp.asarray(b)}
                            for a, b in zip(logits[:-1], boxes[:-1])]}


def _hf(logits, boxes, labels, tboxes, valid):
    matcher = hf_loss.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    crit = hf_loss.ImageLoss(matcher, num_classes=C, eos_coef=0.1, losses=["labels", "boxes", "cardinality"])
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    outputs = {"logits": t(logits[-1]), "pred_boxes": t(boxes[-1]),
               "auxiliary_outputs": [{"logits": t(a), "pred_boxes": t(b)} for a, b in zip(logits[:-1], boxes[:-1])]}
    targets = [{"class_labels": t(labels[i][valid[i]]), "boxes": t(tboxes[i][valid[i]])} for i in range(B)]
    return {k: float(v) for k, v in crit(outputs, targets).items()}


@pytest.mark.parametrize("matcher", ["hungarian", "hungarian_jax"])
def test_every_term_equals_hf(matcher):
    rs = np.random.default_rng(0)
    logits, boxes, labels, tboxes, valid = _problem(rs)
    want = _hf(logits, boxes, labels, tboxes, valid)
    targets = {"labels": labels, "boxes": tboxes, "valid": valid}
    got = jax.jit(lambda o, t: detrax.set_loss(o, t, LossConfig(matcher=matcher)))(_outputs(logits, boxes), targets)
    assert len(want) == 4 * L  # loss_ce, loss_bbox, loss_giou, cardinality_error for each layer
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, abs=1e-5), k
    total = sum(w * want[k + s] for k, w in (("loss_ce", 1), ("loss_bbox", 5), ("loss_giou", 2))
                for s in [""] + [f"_{i}" for i in range(L - 1)])
    assert float(got["loss"]) == pytest.approx(total, rel=1e-5)
    # official only (HF does not log it): class_error of the last layer, 100 - top-1 accuracy of matched queries
    assert "class_error" in got and "class_error_0" not in got
    assert 0.0 <= float(got["class_error"]) <= 100.0


def test_class_error_and_no_targets_as_official():
    logits = np.full((1, 1, 4, 3), -5.0, np.float32)
    logits[0, 0, 0, 1] = 5.0  # query 0 says class 1
    boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (1, 1, 4, 1))
    valid = np.array([[True, True]])
    q = np.array([[[0, 1]]])
    terms = layer_losses(jnp.asarray(logits), jnp.asarray(boxes), jnp.array([[1, 2]]), jnp.asarray(boxes[0, :, :2]),
                         jnp.asarray(valid), jnp.asarray(q), 2.0, 0.1)
    assert float(terms["class_error"][0]) == pytest.approx(50.0)  # query 1 predicts class 0, not 2
    assert float(terms["loss_bbox"][0]) == 0.0 and float(terms["loss_giou"][0]) == pytest.approx(0.0, abs=1e-6)
    none = layer_losses(jnp.asarray(logits), jnp.asarray(boxes), jnp.array([[1, 2]]), jnp.asarray(boxes[0, :, :2]),
                        jnp.zeros((1, 2), bool), jnp.full((1, 1, 2), -1), 1.0, 0.1)
    assert float(none["class_error"][0]) == 100.0  # official accuracy() of nothing is 0
    assert float(none["loss_bbox"][0]) == 0.0 and float(none["cardinality_error"][0]) == 4.0


def test_zero_targets_everywhere_normalises_by_one_and_matches_nothing():
    rs = np.random.default_rng(1)
    logits, boxes, labels, tboxes, _ = _problem(rs)
    valid = np.zeros((B, M), bool)
    out = compiled_loss(_outputs(logits, boxes), {"labels": labels, "boxes": tboxes, "valid": valid})
    assert float(out["loss_bbox"]) == 0.0 and float(out["loss_giou"]) == 0.0
    lp = jax.nn.log_softmax(logits[-1], -1)[..., -1]
    assert float(out["loss_ce"]) == pytest.approx(float(-lp.mean()), rel=1e-5)  # all queries are no-object


def test_gradients_flow_to_predictions_not_through_matching():
    rs = np.random.default_rng(2)
    logits, boxes, labels, tboxes, valid = _problem(rs)
    targets = {"labels": labels, "boxes": tboxes, "valid": valid}
    for matcher in ("hungarian", "hungarian_jax", "sinkhorn"):
        loss = lambda o: detrax.set_loss(o, targets, LossConfig(matcher=matcher))["loss"]  # noqa: B023
        g = jax.jit(jax.grad(loss))(_outputs(logits, boxes))  # one compiled program, not op by op
        assert float(jnp.abs(g["pred_boxes"]).sum()) > 0 and float(jnp.abs(g["pred_logits"]).sum()) > 0
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_sinkhorn_loss_close_to_exact():
    rs = np.random.default_rng(3)
    logits, boxes, labels, tboxes, valid = _problem(rs)
    targets = {"labels": labels, "boxes": tboxes, "valid": valid}
    exact = compiled_loss(_outputs(logits, boxes), targets)
    approx = compiled_loss(_outputs(logits, boxes), targets, LossConfig(matcher="sinkhorn"))
    assert float(approx["loss"]) == pytest.approx(float(exact["loss"]), rel=0.02)


def test_loss_from_config_and_no_aux():
    from detrax.config import presets
    from detrax.config.overrides import override

    rs = np.random.default_rng(4)
    logits, boxes, labels, tboxes, valid = _problem(rs)
    targets = {"labels": labels, "boxes": tboxes, "valid": valid}
    cfg = override(presets.get("tiny"), ["loss.aux_loss=false", "loss.matcher=hungarian_jax"]).loss
    out = compiled_loss(_outputs(logits, boxes), targets, cfg)
    assert "loss_ce_0" not in out
    assert float(out["loss"]) == pytest.approx(float(out["loss_ce"] + 5 * out["loss_bbox"] + 2 * out["loss_giou"]))
    with pytest.raises(ValueError, match="matcher must be"):
        override(presets.get("tiny"), ["loss.matcher=auction"])


@pytest.mark.parametrize("aux", [True, False])
def test_query_groups_loss_is_the_sum_of_each_group_alone(aux):
    """Group DETR: each extra group is matched one-to-one on its own; `loss` adds their losses to the first
    group's, whose terms keep their names."""
    rs = np.random.default_rng(5)
    groups = [_problem(rs) for _ in range(3)]
    labels, tboxes, valid = groups[0][2:]
    targets = {"labels": labels, "boxes": tboxes, "valid": valid}
    cfg = LossConfig(aux_loss=aux, matcher="hungarian_jax")
    outputs = {**_outputs(*groups[0][:2]), "group_outputs": [_outputs(*g[:2]) for g in groups[1:]]}
    set_loss = jax.jit(detrax.set_loss, static_argnums=2)  # compiled whole, not op by op
    out = set_loss(outputs, targets, cfg)
    alone = [set_loss(_outputs(*g[:2]), targets, cfg) for g in groups]
    for k, v in alone[0].items():  # the first group's terms, as without groups; `loss` is the sum
        if k != "loss":
            assert float(out[k]) == pytest.approx(float(v), rel=1e-6), k
    assert float(out["loss_groups"]) == pytest.approx(sum(float(a["loss"]) for a in alone[1:]), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(sum(float(a["loss"]) for a in alone), rel=1e-5)
    assert float(out["loss_groups"]) > 0
