"""The encoder head's dense supervision (training only): which tokens a box claims, inference unchanged, the loss
at zero for exact outputs, and a training run that uses it (test_denoising's, with the demo's aids)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from conftest import compiled, compiled_loss
from flax import nnx

from detrax.config.schema import LossConfig, ModelConfig
from detrax.criterion.loss import encoder_losses
from detrax.models.detr import DETR, weight_arrays
from detrax.models.encoder_head import assign

CFG = ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, hidden_dim=32, num_heads=4, num_classes=5,
                  enc_layers=1, dec_layers=2, ffn_dim=32, num_queries=6, encoder_head=True, dropout=0.0)


def test_a_token_takes_the_smallest_box_over_its_centre_or_the_box_whose_centre_is_in_its_cell():
    # one image of 4 x 2 tokens on the image, one more column of padding: centres x = 1/8 ... 7/8, y = 1/4, 3/4
    grid = jnp.array([[4.0, 2.0]])
    x, y = (jnp.arange(5) + 0.5) / 4, (jnp.arange(2) + 0.5) / 2
    centres = jnp.stack(jnp.meshgrid(x, y), -1).reshape(1, 10, 2)  # [1, T, 2], row-major as the memory
    boxes = jnp.array([[[0.5, 0.5, 1.0, 1.0],  # the whole image
                        [0.25, 0.5, 0.5, 1.0],  # the left half: smaller, so its tokens are its own
                        [0.93, 0.2, 0.02, 0.02],  # tiny, over no token's centre: the token of its cell
                        [0.5, 0.5, 0.2, 0.2]]])  # not valid
    labels, valid = jnp.array([[1, 2, 3, 4]]), jnp.array([[True, True, True, False]])
    target, positive = assign(centres, grid, labels, boxes, valid)
    target, positive = np.asarray(target).reshape(2, 5), np.asarray(positive).reshape(2, 5)
    np.testing.assert_array_equal(positive[:, :4], True)
    np.testing.assert_array_equal(target[:, :2], 1)  # the left half's
    np.testing.assert_array_equal(target[:, 2], 0)
    assert target[0, 3] == 2 and target[1, 3] == 0  # the tiny box's cell, then the whole image's
    assert not positive[:, 4].any()  # padding: beyond every box


def test_the_encoder_head_runs_in_training_only_and_leaves_inference_as_the_plain_detr():
    x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    mask = np.ones((2, 64, 96), bool)
    mask[1, :, 64:] = False
    model = DETR(CFG, rngs=nnx.Rngs(0))
    model.train()
    enc = compiled(model, x, mask)["enc_outputs"]
    assert enc["pred_logits"].shape == (2, 6, 6) and enc["pred_boxes"].shape == (2, 6, 4)  # 2 x 3 tokens
    np.testing.assert_array_equal(enc["token_valid"], [[1] * 6, [1, 1, 0, 1, 1, 0]])
    np.testing.assert_allclose(enc["grid"], [[3, 2], [2, 2]])
    plain = DETR(dataclasses.replace(CFG, encoder_head=False), rngs=nnx.Rngs(0))
    a, b = weight_arrays(model), weight_arrays(plain)
    assert sorted(set(a) - set(b)) == ["encoder_head/box_hidden/bias", "encoder_head/box_hidden/kernel",
                                       "encoder_head/box_out/bias", "encoder_head/box_out/kernel",
                                       "encoder_head/class_embed/bias", "encoder_head/class_embed/kernel",
                                       "encoder_head/where/bias", "encoder_head/where/kernel"]
    assert all(np.array_equal(a[k], b[k]) for k in b)  # drawn last: the other weights as without it
    model.eval()
    plain.eval()
    got = compiled(model, x, mask)
    assert "enc_outputs" not in got
    np.testing.assert_array_equal(got["pred_boxes"], compiled(plain, x, mask)["pred_boxes"])


def _enc(pred_boxes, classes, num_classes=5):
    centres = jnp.array([[[0.25, 0.5], [0.75, 0.5]]])  # one image, 2 x 1 tokens
    return {"pred_logits": 30.0 * jnp.eye(num_classes + 1)[jnp.array([classes])], "pred_boxes": pred_boxes,
            "pred_centres": centres, "centres": centres, "token_valid": jnp.ones((1, 2), bool),
            "grid": jnp.array([[2.0, 1.0]])}


def test_the_encoder_loss_is_zero_for_exact_outputs_and_counts_every_positive_token():
    labels, valid = jnp.array([[2, 0]]), jnp.array([[True, False]])
    boxes = jnp.array([[[0.25, 0.5, 0.4, 0.8], [0.0, 0.0, 0.0, 0.0]]])  # over the left token only
    exact = _enc(jnp.array([[[0.25, 0.5, 0.4, 0.8], [0.6, 0.6, 0.1, 0.1]]]), [2, 5])
    terms = encoder_losses(exact, labels, boxes, valid, eos_coef=0.1)
    assert all(float(v) < 1e-6 for v in terms.values())
    wrong_class = encoder_losses(_enc(exact["pred_boxes"], [2, 1]), labels, boxes, valid, eos_coef=0.1)
    assert float(wrong_class["loss_ce"]) > 1.0 and float(wrong_class["loss_bbox"]) < 1e-6
    moved = encoder_losses(_enc(exact["pred_boxes"].at[0, 0, 0].add(0.1), [2, 5]), labels, boxes, valid, 0.1)
    np.testing.assert_allclose(float(moved["loss_bbox"]), 0.1, rtol=1e-5)  # one positive token
    lost = encoder_losses({**exact, "pred_centres": exact["centres"].at[0, 1, 1].add(0.2)}, labels, boxes, valid, 0.1)
    np.testing.assert_allclose(float(lost["loss_centre"]), 0.1, rtol=1e-5)  # every token's own centre, averaged
    outputs = {"pred_logits": jnp.zeros((1, 3, 6)), "pred_boxes": jnp.full((1, 3, 4), 0.5)}
    targets = {"labels": labels, "boxes": boxes, "valid": valid}
    cfg = LossConfig(aux_loss=False, matcher="hungarian_jax")
    with_head = compiled_loss({**outputs, "enc_outputs": _enc(exact["pred_boxes"], [2, 1])}, targets, cfg)
    plain = compiled_loss(outputs, targets, cfg)
    np.testing.assert_allclose(float(with_head["loss_enc"]), float(wrong_class["loss_ce"]), rtol=1e-6)
    np.testing.assert_allclose(float(with_head["loss"]) - float(with_head["loss_enc"]), float(plain["loss"]),
                               rtol=1e-6)
    heavy = compiled_loss({**outputs, "enc_outputs": _enc(exact["pred_boxes"], [2, 1])}, targets,
                     dataclasses.replace(cfg, enc_weight=10.0))
    np.testing.assert_allclose(float(heavy["loss_enc"]), float(with_head["loss_enc"]), rtol=1e-6)  # logged unweighted
    np.testing.assert_allclose(float(heavy["loss"]) - 10 * float(heavy["loss_enc"]), float(plain["loss"]), rtol=1e-5)
