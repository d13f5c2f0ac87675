"""The BiT ResNet v2 backbone against an independent NumPy rendering of BigTransfer, fed straight from an .npz in
BiT's published layout; the converter's key table; padding invariance; a BiT DETR trains."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PLAIN, compiled
from flax import nnx

from detrax import cli
from detrax.config import presets
from detrax.config.overrides import override
from detrax.config.schema import ModelConfig
from detrax.data.synthetic import write_dataset
from detrax.models.detr import DETR
from detrax.training.loop import Run, fit
from detrax.weights import convert as cv

# ------------------------------------------------------------------ BiT in NumPy, reading BiT's own names

def np_conv(x, w, stride=1, pad=0, dil=1):  # x [B, H, W, I], w [kh, kw, I, O]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xp.shape[1] - dil * (kh - 1) - 1) // stride + 1
    wo = (xp.shape[2] - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dil, i * dil + stride * (ho - 1) + 1, stride)
            cols = slice(j * dil, j * dil + stride * (wo - 1) + 1, stride)
            out += xp[:, rows, cols] @ w[i, j]
    return out


def np_std(w):  # weight standardisation over [kh, kw, in]
    return (w - w.mean((0, 1, 2))) / np.sqrt(w.var((0, 1, 2)) + 1e-10)


def np_gn(x, gamma, beta, groups=32):
    b, h, w, c = x.shape
    xr = x.reshape(b, h, w, groups, c // groups)
    mean = xr.mean((1, 2, 4), keepdims=True)
    var = xr.var((1, 2, 4), keepdims=True)
    return ((xr - mean) / np.sqrt(var + 1e-5)).reshape(b, h, w, c) * gamma + beta


def np_bit(x, p, depths, dilation=False):
    """BigTransfer's ResNetV2 body + pre-head GN-ReLU, from the .npz dict `p`."""
    relu = lambda v: np.maximum(v, 0)
    gn = lambda v, name: np_gn(v, p[f"{name}/group_norm/gamma"], p[f"{name}/group_norm/beta"])
    conv = lambda v, name, **kw: np_conv(v, np_std(p[f"{name}/standardized_conv2d/kernel"]), **kw)
    x = conv(x, "resnet/root_block", stride=2, pad=3)
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, then a 3x3/2 max pool without padding
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    x = np.max([x[:, i: i + 2 * ho - 1: 2, j: j + 2 * wo - 1: 2] for i in range(3) for j in range(3)], axis=0)
    dil = 1
    for b, depth in enumerate(depths):
        stride = 1 if b == 0 else 2
        first = dil
        if dilation and b == len(depths) - 1:
            dil, stride = dil * stride, 1
        for u in range(depth):
            name = f"resnet/block{b + 1}/unit{u + 1:02d}"
            s, d = (stride, first) if u == 0 else (1, dil)
            y = relu(gn(x, f"{name}/a"))
            short = conv(y, f"{name}/a/proj", stride=s) if f"{name}/a/proj/standardized_conv2d/kernel" in p else x
            y = conv(y, f"{name}/a")
            y = conv(relu(gn(y, f"{name}/b")), f"{name}/b", stride=s, pad=d, dil=d)
            y = conv(relu(gn(y, f"{name}/c")), f"{name}/c")
            x = y + short
    return relu(gn(x, "resnet"))


def bit_npz(depths, width, seed=0, classes=10):
    """Random weights in BiT's published .npz layout (HWIO kernels, 1-D GroupNorm gamma / beta, a head)."""
    rng = np.random.default_rng(seed)
    p = {}
    kernel = lambda *shape: rng.normal(0.1, 1.0, shape).astype(np.float32)  # a mean to standardise away
    norm = lambda name, c: p.update({f"{name}/group_norm/gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
                                     f"{name}/group_norm/beta": rng.normal(0, 0.2, c).astype(np.float32)})
    p["resnet/root_block/standardized_conv2d/kernel"] = kernel(7, 7, 3, width)
    cin = width
    for b, depth in enumerate(depths):
        planes = width * 2**b
        for u in range(depth):
            name = f"resnet/block{b + 1}/unit{u + 1:02d}"
            norm(f"{name}/a", cin)
            p[f"{name}/a/standardized_conv2d/kernel"] = kernel(1, 1, cin, planes)
            if u == 0:
                p[f"{name}/a/proj/standardized_conv2d/kernel"] = kernel(1, 1, cin, planes * 4)
            norm(f"{name}/b", planes)
            p[f"{name}/b/standardized_conv2d/kernel"] = kernel(3, 3, planes, planes)
            norm(f"{name}/c", planes)
            p[f"{name}/c/standardized_conv2d/kernel"] = kernel(1, 1, planes, planes * 4)
            cin = planes * 4
    norm("resnet", cin)
    p["resnet/head/conv2d/kernel"] = kernel(1, 1, cin, classes)
    p["resnet/head/conv2d/bias"] = np.zeros(classes, np.float32)
    return p


DEPTHS, WIDTH = (2, 1, 1, 1), 64  # 32 groups of 2 channels in the narrowest norm


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("bit") / "BiT-S-R50x1-like.npz"
    np.savez(path, **bit_npz(DEPTHS, WIDTH))
    return path


@pytest.mark.parametrize("dilation", [False, True])
def test_converted_npz_equals_numpy_bit(npz, dilation):
    p = dict(np.load(npz))
    model, report = cv.convert(cv.read_state_dict(npz), dilation=dilation)
    cfg = report["config"]
    assert (cfg.backbone, cfg.depths, cfg.width, report["format"]) == ("bit", DEPTHS, WIDTH, "bit")
    assert not [k for k in report["fresh"] if k.startswith("backbone/")]  # every backbone weight filled
    x = np.random.default_rng(1).normal(size=(2, 45, 38, 3))
    want = np_bit(x, {k: v.astype(np.float64) for k, v in p.items()}, DEPTHS, dilation)
    got = np.asarray(compiled(model.backbone, jnp.asarray(x, jnp.float32)))
    assert got.shape == want.shape == (2, 2 if not dilation else 3, 2 if not dilation else 3, WIDTH * 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bit_block_equals_numpy(npz):
    """One unit with its projection and stride (block2/unit01) on its own."""
    p = {k: v.astype(np.float64) for k, v in np.load(npz).items()}
    model, _ = cv.convert(cv.read_state_dict(npz))
    x = np.random.default_rng(2).normal(size=(1, 9, 12, WIDTH * 4))
    y, mask = model.backbone.block2[0](jnp.asarray(x, jnp.float32), jnp.ones((1, 9, 12), bool))
    name = "resnet/block2/unit01"
    relu = lambda v: np.maximum(v, 0)
    gn = lambda v, n: np_gn(v, p[f"{n}/group_norm/gamma"], p[f"{n}/group_norm/beta"])
    conv = lambda v, n, **kw: np_conv(v, np_std(p[f"{n}/standardized_conv2d/kernel"]), **kw)
    a = relu(gn(x, f"{name}/a"))
    b = conv(relu(gn(conv(a, f"{name}/a"), f"{name}/b")), f"{name}/b", stride=2, pad=1)
    want = conv(relu(gn(b, f"{name}/c")), f"{name}/c") + conv(a, f"{name}/a/proj", stride=2)
    assert y.shape == want.shape == (1, 5, 6, WIDTH * 8) and mask.shape == (1, 5, 6)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_npz_key_errors_are_named(npz, tmp_path):
    p = dict(np.load(npz))
    extra = dict(p, **{"resnet/block1/unit01/a/extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(cv.ConversionError, match=r"source keys left unused \(1\): resnet/block1/unit01/a/extra"):
        cv.convert(extra)
    del p["resnet/block3/unit01/b/group_norm/beta"]
    with pytest.raises(cv.ConversionError, match=r"source keys missing \(1\): resnet/block3/unit01/b/group_norm/beta"):
        cv.convert(p)
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(cv.ConversionError, match="broken.npz: not a readable .npz"):
        cv.read_state_dict(bad)


def test_cli_convert_npz(npz, tmp_path, capsys):
    out = tmp_path / "bit.safetensors"
    assert cli.main(["convert", str(npz), str(out)]) == 0
    text = capsys.readouterr().out
    assert "bit checkpoint" in text and "freshly initialised" in text
    import detrax

    np.testing.assert_array_equal(np.asarray(detrax.load(str(out)).model.backbone.block1[0].conv2.kernel[...]),
                                  np.load(npz)["resnet/block1/unit01/b/standardized_conv2d/kernel"])


def test_bit_detr_detections_do_not_depend_on_padding():
    model = DETR(presets.get("detr_bit_r50", smoke=True).model, rngs=nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
    mask = np.ones((2, 64, 96), bool)
    mask[1, 37:], mask[1, :, 71:] = False, False
    padded = compiled(model, jnp.asarray(x), jnp.asarray(mask))
    alone = compiled(model, jnp.asarray(x[1:, :37, :71]), jnp.asarray(mask[1:, :37, :71]))
    for key in ("pred_logits", "pred_boxes"):
        np.testing.assert_allclose(np.asarray(padded[key][1]), np.asarray(alone[key][0]), atol=1e-4)


def test_presets_and_config_errors():
    cfg = presets.get("detr_bit_r50")
    assert (cfg.model.backbone, cfg.model.depths, cfg.model.width, cfg.model.frozen_stages) == \
        ("bit50", (3, 4, 6, 3), 64, 1)
    assert presets.get("detr_bit_r101").model.depths == (3, 4, 23, 3)
    assert presets.get("detr_bit_r50_dc5").model.dilation
    x2 = override(cfg, ["model.width=128"]).model
    assert x2.backbone_channels == 4096
    with pytest.raises(ValueError, match="backbone 'bit50' has depths .* use backbone='bit' for custom depths"):
        ModelConfig(backbone="bit50", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown backbone 'bit-50'"):
        ModelConfig(backbone="bit-50")


def test_root_and_block1_frozen_like_the_resnet():
    model = DETR(presets.get("detr_bit_r50", smoke=True).model, rngs=nnx.Rngs(0))
    params = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any(k.startswith(("backbone/root", "backbone/block1/")) for k in params)
    assert any(k.startswith("backbone/block2/0/gn1") for k in params)


def test_bit_detr_trains_on_synthetic_data(tmp_path):
    write_dataset(str(tmp_path / "data"), num_images=24, seed=3, shape=presets.DEMO_SHAPE)  # one compilation
    cfg = override(presets.get("demo"), [*PLAIN, "model.backbone=bit", "model.width=32", "train.steps=30",
                                         "train.lr=1e-3", "train.log_every=1", "train.eval_every=0",
                                         "data.val_split=none"])
    fit(cfg, Run(str(tmp_path / "data"), str(tmp_path / "run"), quiet=False))
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len(losses) == 30 and np.isfinite(losses).all()
    # the last five steps' mean against the first five's: 0.79 measured (XLA's two CPU emitters), 0.99 untrained
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
