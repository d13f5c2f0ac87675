"""The mask head (the official DETRsegm): converted official and HF segmentation models give their outputs."""

import argparse
import dataclasses

import numpy as np
import pytest
from conftest import compiled, compiled_loss, require
from hf_reference import build_hf_detr, hf_segmentation, padded_batch

from detrax.config.schema import ModelConfig
from detrax.models.mask_head import resize_nearest
from detrax.weights import convert as cv
from detrax.weights import files as weights

torch = require("torch")
import official_reference as ref  # noqa: E402

SIZES = [(61, 83), (77, 50)]  # odd sizes, both padded: the nearest upsampling meets uneven ratios
TINY = dict(num_classes=5, depths=(1, 1, 2, 3), width=8, d=64, nhead=8, enc=2, dec=2, ffn=64, queries=10)


def _official_segm(seed=0, **kw):
    torch.manual_seed(seed)
    model = ref.randomise_batch_norm(ref.DETRsegm(**kw).eval(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the mask head's biases and GroupNorm affines away from their zeros and ones
        for name, p in model.named_parameters():
            if name.startswith(("mask_head.", "bbox_attention.")) and (name.endswith("bias") or ".gn" in name):
                p.copy_((0.5 if ".gn" in name and name.endswith("weight") else 0.0)
                        + 0.2 * torch.rand(p.shape, generator=g))
    return model


def _run_official(model, pixels, mask):
    with torch.no_grad():
        logits, boxes, masks = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                                     torch.from_numpy(~mask))
    return logits[-1].numpy(), boxes[-1].numpy(), masks.numpy()


def _check(model, pixels, mask, want):
    out = compiled(model, pixels, mask)
    got = out["pred_logits"], out["pred_boxes"], out["pred_masks"]
    assert got[2].shape == want[2].shape
    assert np.abs(want[2]).max() > 0.1 and np.std(want[2]) > 1e-3  # masks with a real signal
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(TINY), dict(TINY, dilation=True),
                                dict(num_classes=250)],  # the official DETR-R50 panoptic model's sizes
                         ids=["tiny", "tiny-dc5", "r50-panoptic"])
def test_official_panoptic_checkpoint_gives_official_outputs(tmp_path, kw):
    official = _official_segm(**kw)
    pixels, mask = padded_batch(SIZES, seed=1)
    want = _run_official(official, pixels, mask)
    path = tmp_path / ("detr-dc5-panoptic.pth" if kw.get("dilation") else "detr-panoptic.pth")
    torch.save({"model": official.state_dict(), "args": argparse.Namespace(masks=True)}, path)
    report = cv.convert_file(path, tmp_path / "out.safetensors", num_heads=kw.get("nhead", 8))
    cfg = report["config"]
    assert report["format"] == "official" and cfg.masks and cfg.dilation == kw.get("dilation", False)
    assert cfg.num_classes == kw["num_classes"] and report["fresh"] == []
    _check(weights.load_weights(tmp_path / "out.safetensors"), pixels, mask, want)


@pytest.mark.parametrize("hub_names", [False, True], ids=["transformers5", "hub-v4-names"])
def test_hf_detr_for_segmentation_gives_hf_outputs(tmp_path, hub_names):
    hf = build_hf_detr(segmentation=True, num_labels=250, layers=2) if not hub_names else build_hf_detr(
        depths=(1, 1, 1, 1), embedding_size=8, num_labels=5, d_model=64, layers=2, ffn=64, heads=8, queries=10,
        segmentation=True)
    pixels, mask = padded_batch(SIZES, seed=2)
    want = hf_segmentation(hf, pixels, mask)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    if hub_names:  # transformers 5 names -> those of the published (v4) files, detector and mask head
        renames = [("model.backbone.model.", "model.backbone.conv_encoder.model."), (".o_proj.", ".out_proj."),
                   (".mlp.fc", ".fc"), ("_proj.", "_linear.")] + [
            (f"mask_head.conv{i}.conv.", f"mask_head.lay{i}.") for i in (1, 2)] + [
            (f"mask_head.conv{i}.norm.", f"mask_head.gn{i}.") for i in (1, 2)] + [
            (f"mask_head.fpn_stages.{i}.refine.conv.", f"mask_head.lay{i + 3}.") for i in range(3)] + [
            (f"mask_head.fpn_stages.{i}.refine.norm.", f"mask_head.gn{i + 3}.") for i in range(3)] + [
            (f"mask_head.fpn_stages.{i}.fpn_adapter.", f"mask_head.adapter{i + 1}.") for i in range(3)] + [
            ("mask_head.output_conv.", "mask_head.out_lay.")]
        for a, b in renames:
            sd = {(k.replace(a, b) if not (a == "_proj." and not k.startswith("bbox_attention.")) else k): v
                  for k, v in sd.items()}
        assert "mask_head.lay5.weight" in sd and "bbox_attention.q_linear.weight" in sd
    model, report = cv.convert(sd)
    assert report["format"] == "hf" and report["config"].masks and report["fresh"] == []
    _check(model, pixels, mask, want)


def test_nearest_upsampling_is_torchs():
    for size_in, size_out in [((3, 2), (5, 6)), ((5, 4), (10, 8)), ((7, 3), (13, 13)), ((4, 4), (4, 4))]:
        x = np.random.default_rng(0).standard_normal((2, *size_in, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out,
                                               mode="nearest").permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.asarray(resize_nearest(x, size_out)), want)


def test_mask_head_widths_that_group_norm_cannot_split_are_refused():
    with pytest.raises(ValueError, match="masks needs mask-head widths"):
        ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, hidden_dim=32, num_heads=4, masks=True)


def test_the_attention_gain_scales_only_the_first_convolutions_attention_channels():
    from flax import nnx

    from detrax.models.detr import DETR, weight_arrays

    cfg = ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, hidden_dim=32, num_heads=8, masks=True,
                      num_classes=3, enc_layers=1, dec_layers=1, ffn_dim=32, num_queries=4)
    plain = weight_arrays(DETR(cfg, rngs=nnx.Rngs(3)))
    scaled = weight_arrays(DETR(dataclasses.replace(cfg, mask_attention_gain=1000.0), rngs=nnx.Rngs(3)))
    k, k2 = plain.pop("mask_head/lay1/kernel"), scaled.pop("mask_head/lay1/kernel")  # [3, 3, D + N, D + N]
    np.testing.assert_array_equal(k2[:, :, :32], k[:, :, :32])
    np.testing.assert_allclose(k2[:, :, 32:], 1000 * k[:, :, 32:], rtol=1e-6)
    assert plain.keys() == scaled.keys() and all(np.array_equal(plain[n], scaled[n]) for n in plain)


def test_mask_losses_equal_the_official_loss_masks():
    import jax.numpy as jnp

    from detrax.criterion.loss import mask_losses

    rs = np.random.default_rng(0)
    pred = rs.normal(0, 2, (2, 10, 8, 9)).astype(np.float32)
    sizes, counts, m = [(30, 36), (25, 33)], [3, 2], 4
    tgt = np.zeros((2, m, 30, 36), bool)
    theirs, indices = [], []
    qft = np.full((2, m), -1, np.int32)
    for i, ((h, w), n) in enumerate(zip(sizes, counts)):
        tgt[i, :n, :h, :w] = rs.random((n, h, w)) < 0.3
        tgt[i, 0, 2:h // 2, 3:w // 2] = True  # a solid object in each image
        theirs.append(torch.from_numpy(tgt[i, :n, :h, :w].astype(np.float32)))
        q = rs.permutation(10)[:n]
        qft[i, :n] = q
        indices.append((torch.from_numpy(q.astype(np.int64)), torch.arange(n)))
    valid = qft >= 0
    want = ref.loss_masks(torch.from_numpy(pred), theirs, indices, 5.0)
    got = mask_losses(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(valid), jnp.asarray(qft), 5.0)
    assert abs(float(got["loss_mask"]) - float(want[0])) < 1e-6 and float(want[0]) > 0.01
    assert abs(float(got["loss_dice"]) - float(want[1])) < 1e-6 and float(want[1]) > 0.1
    # in the set loss: the last layer's matches, both terms weighted into the total
    outputs = {"pred_logits": jnp.asarray(rs.normal(0, 1, (2, 10, 6)), jnp.float32),
               "pred_boxes": jnp.asarray(rs.uniform(0.2, 0.8, (2, 10, 4)), jnp.float32),
               "pred_masks": jnp.asarray(pred)}
    targets = {"labels": np.where(valid, 1, 0), "boxes": np.full((2, m, 4), 0.5, np.float32), "valid": valid}
    plain = compiled_loss(outputs, targets)
    full = compiled_loss(outputs, dict(targets, masks=tgt))
    assert "loss_mask" not in plain and float(full["loss_mask"]) > 0
    assert abs(float(full["loss"]) - float(plain["loss"]) - float(full["loss_mask"]) - float(full["loss_dice"])) < 1e-5
