"""MasterSkepticista/detr's checkpoints in: its detector gives its outputs on every decoder layer, its backbone-only
start and BiT tree fill detrax's backbones, classes keep their COCO ids and names (tests/flax_detr_reference.py
renders its forward independently, in linen)."""

import json

import flax_detr_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled

import detrax
from detrax import cli
from detrax.config.schema import ModelConfig
from detrax.data.coco_names import COCO_2017_IDS, COCO_NAMES
from detrax.models.detr import weight_arrays
from detrax.weights import flax_detr
from detrax.weights.convert import ConversionError, convert, read_state_dict

TINY = dict(num_classes=81, hidden_dim=32, num_queries=7, num_heads=4, enc_layers=2, dec_layers=3, mlp_dim=64,
            blocks=(1, 2, 1, 1), width=8)

SMALL = ModelConfig(hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=5)


def _inputs():
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 160, 192, 3)).astype(np.float32)  # normalised already
    mask = np.zeros((2, 160, 192), bool)
    mask[0] = True
    mask[1, :112, :136] = True  # padding right and below, not on the feature grid's edges
    pixels[~mask] = 0.0
    return pixels, mask


def _checkpoint(tmp_path, seed=0, **kw):
    model = ref.DETR(**{**TINY, **kw})
    pixels, mask = _inputs()
    variables = ref.randomise(ref.initial(model, pixels, mask, seed=seed), seed)
    path = tmp_path / "checkpoint_1000"
    path.write_bytes(ref.checkpoint_bytes(variables))
    return model, variables, path


@pytest.fixture(scope="module")
def post_norm(tmp_path_factory):
    """(linen model, its variables, its checkpoint file) of the post-norm detector, as it trains them."""
    return _checkpoint(tmp_path_factory.mktemp("flax_detr"))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_converted_checkpoint_gives_its_outputs_on_every_decoder_layer(tmp_path, post_norm, pre_norm):
    linen, variables, path = _checkpoint(tmp_path, pre_norm=True) if pre_norm else post_norm
    pixels, mask = _inputs()
    want_logits, want_boxes = jax.jit(linen.apply)(variables, pixels, mask)  # [L, B, Q, 81], background first
    detector = detrax.load(path)  # by content: no name, no flags
    out = detector(pixels, mask)
    layers = [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    assert len(layers) == TINY["dec_layers"]
    for i, layer in enumerate(layers):
        np.testing.assert_allclose(layer["pred_logits"], flax_detr.background_last(np.asarray(want_logits[i])),
                                   atol=1e-4, err_msg=f"decoder layer {i} logits")
        np.testing.assert_allclose(layer["pred_boxes"], want_boxes[i], atol=1e-4, err_msg=f"decoder layer {i} boxes")
    c = detector.config
    assert (c.norm_eps, c.mask_resize, c.pixel_mean, c.pre_norm) == (1e-6, "half_pixel", (0.48, 0.456, 0.406),
                                                                     pre_norm)
    assert (c.num_classes, c.class_ids, c.num_heads, c.dtype) == (80, COCO_2017_IDS, 4, "float32")


def test_its_forward_quirks_matter(post_norm):
    """The options a converted model records are what make it agree: without them the outputs move."""
    linen, variables, path = post_norm
    pixels, mask = _inputs()
    want = flax_detr.background_last(np.asarray(jax.jit(linen.apply)(variables, pixels, mask)[0][-1]))
    err = lambda **option: np.abs(np.asarray(detrax.load(path, **option)(pixels, mask)["pred_logits"]) - want).max()
    close = err()
    assert close < 1e-5
    for option in (dict(norm_eps=1e-5), dict(mask_resize="torch")):
        assert err(**option) > 10 * close, option


def test_converted_file_names_coco_classes_and_keeps_its_val_transform(tmp_path, capsys, post_norm):
    linen, variables, path = post_norm
    out = tmp_path / "detr_640.safetensors"
    assert cli.main(["convert", str(path), str(out), "--preset", "detr_r50_640"]) == 0
    printed = capsys.readouterr().out
    assert "flax_detr checkpoint" in printed and "80 categories" in printed
    detector = detrax.load(out)
    assert detector.names == {i: COCO_NAMES[i] for i in COCO_2017_IDS}
    assert (detector.preprocess.size, detector.preprocess.max_size) == (384, 640)
    # labels come out as COCO category ids: class output i is TFDS label i, category COCO_2017_IDS[i]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    mask = np.ones((1, 128, 128), bool)
    scores, labels, _ = detector.infer(pixels, mask, np.array([[128, 128]]))
    normalised = (pixels / 255.0 - np.array([0.48, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    logits = np.asarray(jax.jit(linen.apply)(variables, normalised.astype(np.float32), mask)[0][-1])  # [B, Q, 81]
    prob = jax.nn.softmax(logits, -1)[..., 1:]  # its 80 classes
    np.testing.assert_array_equal(np.asarray(labels), np.array(COCO_2017_IDS)[np.argmax(prob, -1)])
    np.testing.assert_allclose(np.asarray(scores), np.max(prob, -1), atol=1e-5)
    # saved again by the Detector: names and val transform still travel
    detector.save(tmp_path / "again.safetensors")
    again = detrax.load(tmp_path / "again.safetensors")
    assert again.names == detector.names and again.preprocess == detector.preprocess


def test_backbone_only_start_fills_the_resnet(tmp_path):
    backbone = ref.Backbone(blocks=(1, 2, 1, 1), width=8)
    x = np.random.default_rng(2).normal(size=(1, 96, 96, 3)).astype(np.float32)
    variables = ref.randomise(ref.initial(backbone, x), 3)
    variables["params"]["fc"] = {"kernel": np.zeros((256, 10), np.float32), "bias": np.zeros(10, np.float32)}
    path = tmp_path / "r50x1_i1k_torch"
    path.write_bytes(ref.checkpoint_bytes(variables))
    model, report = convert(read_state_dict(path), base=SMALL)  # the rest of DETR small: built fresh
    assert report["format"] == "flax_resnet" and all(not k.startswith("backbone/") for k in report["fresh"])
    assert (model.config.depths, model.config.width, model.config.norm_eps) == ((1, 2, 1, 1), 8, 1e-5)
    del variables["params"]["fc"]
    want = jax.jit(backbone.apply)(variables, x)
    np.testing.assert_allclose(compiled(model.backbone, jnp.asarray(x)), want, atol=1e-4)
    # the same tree as its resnet.load() reads it: an .npz of "params/..." and "batch_stats/..." arrays
    np.savez(tmp_path / "r50.npz", **read_state_dict(path))
    from_npz, report = convert(read_state_dict(tmp_path / "r50.npz"), base=SMALL)
    assert report["format"] == "flax_resnet"
    np.testing.assert_array_equal(weight_arrays(from_npz)["backbone/layer2/1/bn2/var"],
                                  weight_arrays(model)["backbone/layer2/1/bn2/var"])


def test_bit_tree_fills_the_bit_backbone(tmp_path):
    sd = {"params/root_block/conv_root/kernel": np.random.default_rng(0).normal(size=(7, 7, 3, 16))}
    depths = (1, 2, 1, 1)
    for i, n in enumerate(depths):
        cin = 16 if i == 0 else 16 * 2**i * 2
        for j in range(n):
            unit, planes = f"params/block{i + 1}/unit{j + 1:02d}", 16 * 2**i
            c = cin if j == 0 else planes * 4
            for k, (a, b) in enumerate([(c, planes), (planes, planes), (planes, planes * 4)]):
                sd[f"{unit}/gn{k + 1}/scale"] = np.full(c if k == 0 else planes, k + 1.0)
                sd[f"{unit}/gn{k + 1}/bias"] = np.zeros(c if k == 0 else planes)
                size = (3, 3, a, b) if k == 1 else (1, 1, a, b)
                sd[f"{unit}/conv{k + 1}/kernel"] = np.random.default_rng(k).normal(size=size)
            if j == 0:
                sd[f"{unit}/conv_proj/kernel"] = np.ones((1, 1, c, planes * 4))
    sd["params/norm-pre-head/scale"], sd["params/norm-pre-head/bias"] = np.ones(16 * 8 * 4), np.zeros(16 * 8 * 4)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    model, report = convert(sd, base=SMALL)
    assert report["format"] == "flax_bit" and model.config.backbone == "bit"
    got = weight_arrays(model)
    for dst, (src, fn) in flax_detr.table(model.config, "flax_bit").items():
        np.testing.assert_array_equal(got[dst], fn(sd[src]), err_msg=dst)
    assert len(flax_detr.table(model.config, "flax_bit")) == len(sd)  # every key used once


def test_full_size_detector_layout(tmp_path):
    """DETR-R50 as it publishes it: 6 + 6 layers, 8 heads of 32, 100 queries, 81 classes (shapes only)."""
    linen = ref.DETR()
    shapes = jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64), bool))
    sd = {}
    for kind in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[kind])[0]:
            sd["/".join([kind, *(p.key for p in path)])] = np.zeros(leaf.shape, np.float32)
    query = "params/transformer/encoder/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    assert sd[query].shape == (256, 8, 32)
    model, report = convert(sd)
    c = model.config
    assert (c.backbone, c.enc_layers, c.dec_layers, c.num_heads, c.num_queries, c.num_classes, c.ffn_dim) == (
        "resnet50", 6, 6, 8, 100, 80, 2048)
    assert report["fresh"] == [] and report["categories"][0] == {"id": 1, "name": "person"}


def test_bad_checkpoints_are_named(tmp_path, post_norm):
    from flax import serialization

    junk = tmp_path / "checkpoint_5"
    junk.write_bytes(serialization.msgpack_serialize({"step": 5, "weights": [1, 2]}))
    with pytest.raises(ConversionError, match=r"checkpoint_5: a msgpack file without a `params` tree"):
        read_state_dict(junk)
    broken = tmp_path / "checkpoint_6"
    broken.write_bytes(b"\x82\xa6params\x81\xa1a" + b"\xc4")  # a map cut short
    with pytest.raises(ConversionError, match=r"checkpoint_6: not a readable Flax msgpack checkpoint"):
        read_state_dict(broken)
    sd = read_state_dict(post_norm[2])
    extra = {**sd, "params/Extra_0/kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ConversionError, match=r"left unused \(1\): params/Extra_0/kernel"):
        convert(extra)
    key = "batch_stats/backbone/layer2/1/bn2/var"
    with pytest.raises(ConversionError, match=rf"source keys missing \(1\): {key}"):
        convert({k: v for k, v in sd.items() if k != key})


def test_init_maps_its_class_outputs_to_their_ids(post_norm):
    from flax import nnx

    from detrax.models.detr import DETR
    from detrax.weights.files import init_from
    from detrax.weights.opener import read_init

    path = post_norm[2]
    arrays, class_ids = read_init(str(path))
    assert class_ids == COCO_2017_IDS and arrays["class_embed/kernel"].shape == (32, 81)
    cfg = ModelConfig(backbone="resnet", depths=(1, 2, 1, 1), width=8, hidden_dim=32, num_queries=7, num_heads=4,
                      enc_layers=2, dec_layers=3, ffn_dim=64, num_classes=91)
    model = DETR(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.class_embed.kernel[...])
    fresh = init_from(model, arrays, str(path), class_ids)
    kernel = np.asarray(model.class_embed.kernel[...])
    np.testing.assert_array_equal(kernel[:, list(COCO_2017_IDS)], arrays["class_embed/kernel"][:, :80])
    np.testing.assert_array_equal(kernel[:, 91], arrays["class_embed/kernel"][:, 80])  # no-object
    np.testing.assert_array_equal(kernel[:, [0, 12, 26]], before[:, [0, 12, 26]])  # ids it has no class for
    assert any("11 ids without a source class" in f for f in fresh)
    assert json.dumps(fresh)



def test_its_workdir_gives_its_newest_checkpoint(tmp_path, post_norm):
    import shutil

    workdir = tmp_path / "artifacts" / "run"
    workdir.mkdir(parents=True)
    shutil.copy(post_norm[2], workdir / "checkpoint_1000")
    (workdir / "checkpoint_500").write_bytes(b"\x80")  # older, and not a checkpoint: never read
    sd = read_state_dict(workdir)
    assert sd.keys() == read_state_dict(post_norm[2]).keys()
    assert detrax.load(workdir).config.class_ids == COCO_2017_IDS
    with pytest.raises(ConversionError, match=r"empty: a directory, not a weights file"):
        read_state_dict((tmp_path / "empty").mkdir() or tmp_path / "empty")
