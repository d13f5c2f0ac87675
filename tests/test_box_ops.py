"""Box conversions, IoU and GIoU: properties, and agreement with torch's reference formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from detrax.models import box_ops


def xyxy_to_cxcywh(b):  # the inverse of box_ops.box_cxcywh_to_xyxy, which detrax itself never needs
    x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _boxes(rs, n):
    xy = rs.uniform(0, 0.8, (n, 2))
    wh = rs.uniform(0.01, 0.5, (n, 2))
    return jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)  # xyxy


def test_conversions_round_trip(rng):
    b = _boxes(rng, 50)
    np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, atol=1e-6)
    c = xyxy_to_cxcywh(jnp.array([[0.0, 0.0, 2.0, 4.0]]))
    np.testing.assert_allclose(c, [[1.0, 2.0, 2.0, 4.0]])


def test_iou_and_giou_properties(rng):
    a, b = _boxes(rng, 30), _boxes(rng, 20)
    iou, _ = box_ops.box_iou(a, b)
    giou = box_ops.generalized_box_iou(a, b)
    assert iou.shape == (30, 20) and giou.shape == (30, 20)
    assert float(iou.min()) >= 0 and float(iou.max()) <= 1
    assert float(giou.min()) >= -1 and float(giou.max()) <= 1
    assert bool((giou <= iou + 1e-6).all())  # GIoU never exceeds IoU
    np.testing.assert_allclose(box_ops.generalized_box_iou(b, a), giou.T, atol=1e-6)  # symmetric
    np.testing.assert_allclose(jnp.diag(box_ops.generalized_box_iou(a, a)), 1.0, atol=1e-6)  # identity
    np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(a[:20], b),
                               jnp.diag(giou[:20, :20]), atol=1e-6)


def test_disjoint_far_boxes_tend_to_minus_one():
    a = jnp.array([[0.0, 0.0, 0.01, 0.01]])
    b = jnp.array([[0.99, 0.99, 1.0, 1.0]])
    assert float(box_ops.generalized_box_iou(a, b)[0, 0]) == pytest.approx(-1.0, abs=1e-3)
    assert float(box_ops.box_iou(a, b)[0][0, 0]) == 0.0


def test_degenerate_boxes_stay_finite_against_real_ones():
    line = jnp.array([[0.2, 0.2, 0.2, 0.6]])  # zero width
    real = jnp.array([[0.1, 0.1, 0.5, 0.5]])
    g = box_ops.generalized_box_iou(line, real)
    # IoU 0; hull (0.1, 0.1)-(0.5, 0.6) of area 0.2, union 0.16: GIoU = -(0.2 - 0.16) / 0.2
    assert bool(jnp.isfinite(g).all()) and float(g[0, 0]) == pytest.approx(-0.2, abs=1e-6)


def test_matches_torch_reference(rng):
    from conftest import require

    torch = require("torch")
    ref = require("transformers.loss.loss_for_object_detection").generalized_box_iou
    a, b = _boxes(rng, 12), _boxes(rng, 9)
    want = ref(torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))).numpy()
    np.testing.assert_allclose(np.asarray(box_ops.generalized_box_iou(a, b)), want, atol=1e-6)
