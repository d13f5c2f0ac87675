"""Model pieces: mask resizing, position embedding, attention kernels, frozen parts, dtypes, output dict."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled, require
from flax import nnx

from detrax.config import presets
from detrax.config.overrides import override
from detrax.models.attention import attention
from detrax.models.backbones.resnet import Frozen
from detrax.models.detr import DETR
from detrax.models.position_encoding import resize_mask, sine_position_embedding

torch = require("torch")


@pytest.mark.parametrize("size,out", [((37, 53), (2, 2)), ((64, 96), (2, 3)), ((100, 30), (7, 3)),
                                      ((800, 1216), (25, 38)), ((33, 33), (33, 33)), ((5, 7), (10, 14)),
                                      ((803, 1199), (26, 38))])
def test_mask_resize_equals_torch_interpolate(size, out):
    rs = np.random.default_rng(sum(size))
    mask = rs.random((2,) + size) > 0.5
    want = torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=out).to(torch.bool)[0]
    np.testing.assert_array_equal(np.asarray(resize_mask(jnp.asarray(mask), out)), want.numpy())


@pytest.mark.parametrize("size,out", [((37, 53), (2, 2)), ((100, 30), (7, 3)), ((800, 1216), (25, 38)),
                                      ((803, 1199), (26, 38)), ((33, 33), (33, 33)), ((5, 7), (10, 14))])
def test_half_pixel_mask_resize_equals_jax_image_resize(size, out):
    """`mask_resize=half_pixel`: the padding mask as MasterSkepticista/detr brings it to the feature map."""
    import jax

    rs = np.random.default_rng(sum(size))
    mask = rs.random((2,) + size) > 0.5
    want = jax.image.resize(jnp.asarray(mask, jnp.float32), (2,) + out, method="nearest").astype(bool)
    got = resize_mask(jnp.asarray(mask), out, "half_pixel")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if out[0] < size[0]:  # downsampling: the two rules differ (an exact 2x upsampling picks the same pixels)
        assert not np.array_equal(np.asarray(got), np.asarray(resize_mask(jnp.asarray(mask), out)))


def test_model_options_reach_the_layers_and_travel_in_weights_files(tmp_path):
    """norm_eps sets every transformer LayerNorm; pixel_mean / pixel_std / mask_resize are kept by a weights file
    and parse from overrides."""
    import dataclasses

    import detrax
    from detrax.config.overrides import override

    cfg = override(presets.tiny(), ["model.norm_eps=1e-6", "model.pixel_mean=0.48,0.456,0.406",
                                            "model.mask_resize=half_pixel"]).model
    assert cfg.pixel_mean == (0.48, 0.456, 0.406)
    model = DETR(cfg, rngs=nnx.Rngs(0))
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
    assert len(norms) == 3 * 2 + 2 * 2 + 1 and {n.epsilon for n in norms} == {1e-6}
    detrax.Detector(model).save(tmp_path / "w.safetensors")
    assert detrax.load(tmp_path / "w.safetensors").config == cfg
    with pytest.raises(ValueError, match="mask_resize must be torch or half_pixel"):
        dataclasses.replace(cfg, mask_resize="bilinear")


def test_sine_position_embedding_equals_hf():
    transformers = require("transformers")
    emb = transformers.models.detr.modeling_detr.DetrSinePositionEmbedding(64, normalize=True)
    mask = np.zeros((2, 9, 13), bool)
    mask[0, :7, :11] = True
    mask[1, :9, :5] = True
    want = emb.build_sine_position_embedding((2, 128, 9, 13), "cpu", torch.float32, 64, True, 2 * np.pi, 10000,
                                              torch.from_numpy(mask))
    got = sine_position_embedding(jnp.asarray(mask), 64)
    assert got.shape == (2, 9, 13, 128)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _qkv(rs, b=2, t=5, s=7, n=4, d=8):
    q, k, v = (jnp.asarray(rs.standard_normal(shape), jnp.float32) for shape in
               ((b, t, n, d), (b, s, n, d), (b, s, n, d)))
    key_mask = jnp.asarray(np.arange(s)[None, :] < np.array([[s], [s - 3]]))  # second item: 3 padded keys
    return q, k, v, key_mask


def test_attention_kernels_agree_and_respect_the_mask(rng):
    q, k, v, key_mask = _qkv(rng)
    xla = attention(q, k, v, key_mask, kernel="xla")
    dot = attention(q, k, v, key_mask, kernel="dot_product")
    auto = attention(q, k, v, key_mask, kernel="auto")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(dot), atol=1e-5)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(auto), atol=1e-5)
    v2 = v.at[1, -3:].set(100.0)  # padded keys' values must not leak into the output
    np.testing.assert_allclose(np.asarray(attention(q, k, v2, key_mask)), np.asarray(xla), atol=1e-5)
    mha = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(np.array(x)).transpose(1, 2) for x in (q, k, v)),
        attn_mask=torch.from_numpy(np.array(key_mask))[:, None, None, :]).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(xla), mha.numpy(), atol=1e-5)


def test_attention_dropout(rng):
    q, k, v, key_mask = _qkv(rng)
    plain = attention(q, k, v, key_mask)
    dropped = attention(q, k, v, key_mask, dropout_rate=0.5, dropout_rng=jax.random.key(0))
    assert not np.allclose(np.asarray(plain), np.asarray(dropped))
    _, weights = attention(q, k, v, key_mask, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-6)
    assert float(jnp.abs(weights[1, :, :, -3:]).max()) == 0.0
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(q, k, v, key_mask, kernel="dot_product", dropout_rate=0.1, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown attention kernel"):
        attention(q, k, v, key_mask, kernel="flash3")


@pytest.fixture(scope="module")
def tiny():
    model = DETR(presets.tiny().model, rngs=nnx.Rngs(0))
    model.eval()
    return model


def _batch(b=2, h=64, w=80, seed=0):
    rs = np.random.default_rng(seed)
    pixels = rs.standard_normal((b, h, w, 3)).astype(np.float32)
    mask = np.ones((b, h, w), bool)
    mask[1, :, w // 2:] = False
    return pixels, mask


def test_output_dict(tiny):
    pixels, mask = _batch()
    out = compiled(tiny, pixels, mask)
    c = tiny.config
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert out["pred_logits"].shape == (2, c.num_queries, c.num_classes + 1)
    assert out["pred_boxes"].shape == (2, c.num_queries, 4)
    assert len(out["aux_outputs"]) == c.dec_layers - 1
    assert all(set(a) == {"pred_logits", "pred_boxes"} for a in out["aux_outputs"])
    assert float(out["pred_boxes"].min()) >= 0.0 and float(out["pred_boxes"].max()) <= 1.0
    assert out["pred_logits"].dtype == jnp.float32


def test_stem_and_layer1_are_frozen_and_get_no_gradient(tiny):
    params = nnx.state(tiny, nnx.Param)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert not any(p.startswith(("backbone/conv1", "backbone/layer1", "backbone/bn")) for p in paths)
    assert any(p.startswith("backbone/layer2") for p in paths) and "query_embed" in paths
    assert not any("/bn" in p for p in paths)  # batch norm is frozen everywhere
    frozen = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(tiny, Frozen))}
    assert "backbone/conv1/kernel" in frozen and "backbone/layer1/0/conv2/kernel" in frozen
    pixels, mask = _batch()

    def loss(model):
        return model(pixels, mask)["pred_boxes"].sum()

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(tiny)  # one compiled program
    flat = dict(nnx.to_flat_state(grads))
    assert all("/".join(map(str, p)) in paths for p in flat)
    assert float(jnp.abs(flat[("backbone", "layer2", 0, "conv1", "kernel")].get_value()).max()) > 0


def test_train_mode_dropout_and_eval_determinism():
    model = DETR(presets.tiny().model, rngs=nnx.Rngs(0))
    pixels, mask = _batch()
    model.train()
    a, b = model(pixels, mask)["pred_logits"], model(pixels, mask)["pred_logits"]
    assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh dropout masks on each call
    model.eval()
    a, b = model(pixels, mask)["pred_logits"], model(pixels, mask)["pred_logits"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layer_dropout_masks_keep_the_right_fraction_independently():
    """A layer draws all its sites' masks at once: each keeps 1 - rate of its entries, sites and calls differ."""
    from detrax.models.transformer import _dropout_masks

    drop = nnx.Dropout(0.25, rngs=nnx.Rngs(3))
    shapes = {"dropout": (2, 50, 300), "self_attn": (2, 4, 50, 50), "dropout1": (2, 50, 64)}
    first, second = _dropout_masks(drop, shapes), _dropout_masks(drop, shapes)
    assert list(first) == list(shapes)  # by site name
    for site, s in shapes.items():
        assert first[site].shape == s and first[site].dtype == jnp.bool_
        assert abs(float(first[site].mean()) - 0.75) < 0.01
    assert float((first["dropout"] == second["dropout"]).mean()) < 0.7  # fresh masks on each call (0.625 expected)
    a, b = first["dropout1"].reshape(-1), first["dropout"].reshape(-1)[: first["dropout1"].size]
    assert abs(float((a & b).mean()) - 0.75**2) < 0.01  # sites independent
    drop.eval()
    assert _dropout_masks(drop, shapes) == dict.fromkeys(shapes)


def test_bfloat16_compute_is_close_to_float32(tiny):
    import dataclasses

    from detrax.models.detr import assemble, weight_arrays

    bf16 = assemble(dataclasses.replace(tiny.config, dtype="bfloat16"), weight_arrays(tiny))
    pixels, mask = _batch()
    forward = nnx.jit(lambda model, pixels, mask: model(pixels, mask))  # compiled whole, not op by op
    a, b = forward(tiny, pixels, mask), forward(bf16, pixels, mask)
    assert b["pred_logits"].dtype == jnp.float32
    assert nnx.state(bf16, nnx.Param)["query_embed"].get_value().dtype == jnp.float32  # float32 master weights
    other = forward(assemble(tiny.config, weight_arrays(DETR(tiny.config, rngs=nnx.Rngs(1)))), pixels, mask)

    def logits(out):  # class logits and the boxes before their sigmoid: unbounded, so a spread to compare with
        boxes = np.clip(np.asarray(out["pred_boxes"], np.float64), 1e-6, 1 - 1e-6)
        return np.asarray(out["pred_logits"], np.float64), np.log(boxes / (1 - boxes))

    for want, got, far in zip(logits(a), logits(b), logits(other)):
        spread = want.max() - want.min()  # over queries and images
        assert np.abs(got - want).max() < 0.05 * spread  # bf16's rounding: a few percent of the spread at most
        assert np.abs(far - want).max() > 0.05 * spread  # which other weights' outputs are not
        assert not np.array_equal(got, want)  # it really ran in bf16


def test_model_kernels_agree(tiny):
    import dataclasses

    from detrax.models.detr import assemble, weight_arrays

    dot = assemble(dataclasses.replace(tiny.config, attention="dot_product"), weight_arrays(tiny))
    pixels, mask = _batch()
    np.testing.assert_allclose(np.asarray(compiled(dot, pixels, mask)["pred_logits"]),
                               np.asarray(compiled(tiny, pixels, mask)["pred_logits"]), atol=1e-5)


def test_batch_norm_calibration_normalises_a_from_scratch_backbone():
    model = DETR(presets.tiny().model, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)) * 3 + 1, jnp.float32)
    before = model.backbone.stages(x)[-1]
    model.backbone.stages(x, calibrate=True)
    y = model.backbone.bn1(model.backbone.conv1(x))
    np.testing.assert_allclose(np.asarray(y.mean((0, 1, 2))), 0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y.std((0, 1, 2))), 1, atol=1e-3)
    z = model.backbone.layer2[0].bn3(model.backbone.layer2[0].conv3(jax.nn.relu(model.backbone.layer2[0].bn2(
        model.backbone.layer2[0].conv2(jax.nn.relu(model.backbone.layer2[0].bn1(model.backbone.layer2[0].conv1(
            model.backbone.stages(x)[0]))))))))
    np.testing.assert_allclose(np.asarray(z.std((0, 1, 2))), 1, atol=1e-3)
    after = model.backbone.stages(x)[-1]
    assert not np.allclose(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize("k,stride,dilation", [(1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2), (7, 2, 1)])
def test_fast_conv_and_folded_batch_norm_equal_the_plain_formulation(k, stride, dilation):
    """The backbone's speed-ups (1x1 convolutions as matrix products, frozen batch norm folded into the kernel)
    leave outputs and gradients as lax.conv followed by the normalisation, within 1e-4."""
    from detrax.models.backbones.resnet import Conv, FrozenBatchNorm, _conv_bn

    rs = np.random.default_rng(k * 10 + stride + dilation)
    conv = Conv(16, 24, k, stride=stride, dilation=dilation, padding=dilation * (k // 2), rngs=nnx.Rngs(0))
    bn = FrozenBatchNorm(24)
    for name in ("scale", "bias", "mean"):
        getattr(bn, name)[...] = jnp.asarray(rs.normal(size=24), jnp.float32)
    bn.var[...] = jnp.asarray(rs.uniform(0.5, 2.0, 24), jnp.float32)
    x = jnp.asarray(rs.normal(size=(2, 19, 23, 16)), jnp.float32)

    def plain(kernel, x):
        p = conv.padding
        y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(p, p), (p, p)],
                                         rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        scale = bn.scale[...] / jnp.sqrt(bn.var[...] + 1e-5)
        return (y - bn.mean[...]) * scale + bn.bias[...]

    def fast(kernel, x):  # the module's arithmetic on a traced kernel
        view = types.SimpleNamespace(kernel=kernel, stride=conv.stride, dilation=conv.dilation, padding=conv.padding)
        return _conv_bn(view, bn, x, calibrate=False)

    kernel = conv.kernel[...]
    want, got = plain(kernel, x), fast(kernel, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    dy = jnp.asarray(rs.normal(size=want.shape), jnp.float32)
    gw = jax.vjp(plain, kernel, x)[1](dy)
    gg = jax.vjp(fast, kernel, x)[1](dy)
    for a, b in zip(gg, gw):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_stem_max_pool_is_the_padded_reduce_window_and_its_symbolic_form_too():
    """Static sizes: values and gradient bitwise those of the padded reduce_window (training unchanged by export
    work), ties included; symbolic sizes (an export of any size): the nine-slice form, the same values."""
    from detrax.models.backbones.resnet import max_pool

    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 19, 24, 4)))
    x = jnp.round(x * 4) / 4  # many ties
    ref = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                          [(0, 0), (1, 1), (1, 1), (0, 0)])
    w = jax.random.normal(jax.random.key(1), ref(x).shape)
    assert np.array_equal(max_pool(x, -jnp.inf), ref(x))
    grad = lambda f: jax.grad(lambda x: (f(x) * w).sum())(x)
    assert np.array_equal(grad(lambda x: max_pool(x, -jnp.inf)), grad(ref))
    b, h, wd = jax.export.symbolic_shape("b, h, w")
    spec = jax.ShapeDtypeStruct((b, h, wd, 4), jnp.float32)
    symbolic = jax.export.export(jax.jit(lambda x: max_pool(x, -jnp.inf)))(spec)
    for y in (x, x[:1, :16, :15]):  # odd and even sizes
        assert np.array_equal(symbolic.call(y), ref(y))


def test_query_groups_train_only_each_group_decodes_alone():
    """Group DETR: in eval mode a model with query groups is the official DETR (its first group); in training
    every group decodes the same image on its own: group g's outputs are those of a one-group model whose
    queries are group g's (self-attention never crosses groups)."""
    from detrax.models.detr import weight_arrays

    c = override(presets.tiny(), ["model.dropout=0.0", "model.query_groups=3"]).model
    grouped = DETR(c, rngs=nnx.Rngs(1))
    one = DETR(override(presets.tiny(), ["model.dropout=0.0"]).model, rngs=nnx.Rngs(2))
    arrays = weight_arrays(grouped)
    assert arrays["group_queries"].shape == (2, c.num_queries, c.hidden_dim)
    assert "group_queries" not in weight_arrays(one)
    pixels, mask = _batch()

    def as_one(queries):
        nnx.update(one, nnx.state(detrax_assemble({**{k: v for k, v in arrays.items() if k != "group_queries"},
                                                   "query_embed": queries}, one.config)))
        return compiled(one, pixels, mask)

    grouped.eval()
    out = compiled(grouped, pixels, mask)
    assert "group_outputs" not in out
    ref = as_one(arrays["query_embed"])
    np.testing.assert_allclose(np.asarray(out["pred_logits"]), np.asarray(ref["pred_logits"]), atol=1e-5)
    grouped.train()
    out = compiled(grouped, pixels, mask)
    assert len(out["group_outputs"]) == 2
    np.testing.assert_allclose(np.asarray(out["pred_boxes"]), np.asarray(ref["pred_boxes"]), atol=1e-5)
    for g, group in enumerate(out["group_outputs"]):
        ref = as_one(arrays["group_queries"][g])
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_allclose(np.asarray(group[key]), np.asarray(ref[key]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(group["aux_outputs"][0][key]),
                                       np.asarray(ref["aux_outputs"][0][key]), atol=1e-5)
    assert not np.allclose(np.asarray(out["group_outputs"][0]["pred_logits"]), np.asarray(out["pred_logits"]))


def detrax_assemble(arrays, config):
    from detrax.models.detr import assemble

    return assemble(config, arrays)


def test_cli_runs_cpu_convolutions_through_eigen_with_the_same_numbers(monkeypatch):
    """`detrax` adds the Eigen-convolution flag to XLA_FLAGS (a user's own YNNPACK setting wins); a DETR-sized
    convolution's output and kernel gradient under it equal the default's within float32 noise."""
    import json
    import os
    import subprocess
    import sys

    from detrax.training.devices import EIGEN_CONVOLUTIONS, prefer_eigen_convolutions

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=1 {EIGEN_CONVOLUTIONS}"
    assert not prefer_eigen_convolutions()  # already set: unchanged
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert not prefer_eigen_convolutions() and os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    code = ("import jax, jax.numpy as jnp, numpy as np, json\n"
            "rs = np.random.default_rng(0)\n"
            "x, w = (jnp.asarray(rs.normal(size=s), jnp.float32) for s in ((2, 48, 48, 64), (3, 3, 64, 64)))\n"
            "conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
            "dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
            "y, vjp = jax.vjp(conv, x, w)\n"
            "dx, dw = vjp(jnp.cos(y))\n"
            "print(json.dumps([np.asarray(a).ravel()[::97].tolist() for a in (y, dx, dw)]))\n")
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": flags},
                                      capture_output=True, text=True, check=True).stdout)
            for flags in ("", EIGEN_CONVOLUTIONS)]
    for a, b in zip(*runs):  # sums of up to 4608 float32 products in another order
        a, b = np.array(a), np.array(b)
        assert np.abs(b - a).max() <= 1e-4 * np.abs(a).max()
