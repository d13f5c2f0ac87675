"""DN-DETR's denoising queries: the noise's bounds, no leak into the matched queries, inference unchanged, the loss
without matching, and a training run that uses them."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled, compiled_loss
from flax import nnx

from detrax.config import presets
from detrax.config.schema import LossConfig, ModelConfig
from detrax.models.denoising import noise_targets
from detrax.models.detr import DETR, weight_arrays

CFG = ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, hidden_dim=32, num_heads=4, num_classes=5,
                  enc_layers=1, dec_layers=2, ffn_dim=32, num_queries=6, query_groups=2, dn_groups=2, dropout=0.0)


def _targets(seed=1):
    rng = np.random.default_rng(seed)
    labels = jnp.array([[1, 3, 4, 0], [2, 0, 0, 0]])
    valid = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    return labels, jnp.asarray(rng.uniform(0.2, 0.6, (2, 4, 4)), jnp.float32), valid


def test_noise_stays_within_dn_detrs_bounds():
    labels, boxes, valid = _targets()
    big = (jnp.tile(labels, (64, 1)), jnp.tile(boxes, (64, 1, 1)), jnp.tile(valid, (64, 1)))
    nl, nb = noise_targets(jax.random.key(0), *big, groups=3, num_classes=5, box_noise=0.4, label_noise=0.2)
    assert nl.shape == (3, 128, 4) and nb.shape == (3, 128, 4, 4)
    v = np.asarray(big[2])
    assert (np.asarray(nl)[:, ~v] == 5).all() and (np.asarray(nb)[:, ~v] == 0.5).all()  # empty slots: no-object
    flipped = (np.asarray(nl) != np.asarray(big[0]))[:, v]
    assert 0.1 < flipped.mean() < 0.2  # redrawn with probability 0.2, a fifth of which land on the same class
    b, n = np.asarray(big[1])[v], np.asarray(nb)[:, v]  # [n, 4], [K, n, 4] (nothing clipped at these sizes)
    assert (np.abs(n[..., :2] - b[:, :2]) <= 0.2 * b[:, 2:] + 1e-6).all()
    ratio = n[..., 2:] / b[:, 2:]
    assert (ratio >= 0.6 - 1e-6).all() and (ratio <= 1.4 + 1e-6).all() and ratio.std() > 0.1
    same = noise_targets(jax.random.key(0), *big, groups=3, num_classes=5, box_noise=0.0, label_noise=0.0)
    np.testing.assert_array_equal(np.asarray(same[0])[:, v], np.broadcast_to(np.asarray(big[0])[v], (3, v.sum())))
    np.testing.assert_allclose(np.asarray(same[1])[:, v], np.broadcast_to(b, (3,) + b.shape), atol=1e-7)


def test_denoising_queries_do_not_leak_and_inference_is_the_plain_detr():
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    model = DETR(CFG, rngs=nnx.Rngs(0))
    model.train()
    labels, boxes, valid = _targets()
    one = compiled(model, x, None, noise_targets(jax.random.key(0), labels, boxes, valid, 2, 5))
    two = compiled(model, x, None, noise_targets(jax.random.key(1), labels, boxes, valid, 2, 5))
    none = compiled(model, x, None)
    assert len(one["dn_outputs"]) == 2 and one["dn_outputs"][0]["pred_boxes"].shape == (2, 6, 4)
    assert "dn_outputs" not in none and len(one["dn_outputs"][1]["aux_outputs"]) == 1
    for out in (two, none):  # the matched queries and the query groups never see the denoising queries
        np.testing.assert_allclose(one["pred_logits"], out["pred_logits"], atol=1e-5)
        np.testing.assert_allclose(one["group_outputs"][0]["pred_boxes"], out["group_outputs"][0]["pred_boxes"],
                                   atol=1e-6)
    assert np.abs(one["dn_outputs"][0]["pred_boxes"] - two["dn_outputs"][0]["pred_boxes"]).max() > 1e-3
    plain = DETR(dataclasses.replace(CFG, dn_groups=0), rngs=nnx.Rngs(0))
    a, b = weight_arrays(model), weight_arrays(plain)
    assert sorted(set(a) - set(b)) == ["denoising/box_in/bias", "denoising/box_in/kernel", "denoising/box_out/bias",
                                       "denoising/box_out/kernel", "denoising/label_embed"]
    assert all(np.array_equal(a[k], b[k]) for k in b)  # drawn last: the other weights as without them
    model.eval()
    plain.eval()
    got = compiled(model, x, None, noise_targets(jax.random.key(0), labels, boxes, valid, 2, 5))
    assert "dn_outputs" not in got
    np.testing.assert_array_equal(got["pred_boxes"], compiled(plain, x, None)["pred_boxes"])


def test_the_denoising_loss_scores_query_i_against_target_i_without_matching():
    labels, boxes, valid = _targets()
    q, c = 6, 5
    logits = jnp.zeros((2, q, c + 1))
    outputs = {"pred_logits": logits, "pred_boxes": jnp.full((2, q, 4), 0.5)}
    pad = jnp.concatenate([boxes, jnp.full((2, q - 4, 4), 0.5)], 1)
    onehot = 20.0 * jax.nn.one_hot(jnp.concatenate([jnp.where(valid, labels, c), jnp.full((2, q - 4), c)], 1), c + 1)
    exact = {"pred_logits": onehot, "pred_boxes": pad}
    cfg = LossConfig(aux_loss=False)
    targets = {"labels": labels, "boxes": boxes, "valid": valid}
    good = compiled_loss({**outputs, "dn_outputs": [exact]}, targets, cfg)
    assert float(good["loss_dn"]) < 1e-6
    swapped = {"pred_logits": onehot, "pred_boxes": pad[:, jnp.array([1, 0, 2, 3, 4, 5])]}  # a matcher would undo it
    bad = compiled_loss({**outputs, "dn_outputs": [swapped]}, targets, cfg)
    assert float(bad["loss_dn"]) > 0.1
    plain = compiled_loss(outputs, targets, cfg)
    np.testing.assert_allclose(float(bad["loss"]) - float(bad["loss_dn"]), float(plain["loss"]), rtol=1e-6)


@pytest.fixture(scope="module")
def aided_run(tmp_path_factory):
    """The demo (its training-only aids all on) trained 3 steps by the CLI: test_train.test_loss_falls's program."""
    from detrax import cli
    from detrax.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("aided")
    write_dataset(str(root / "data"), 12, seed=3, shape=(64, 80))
    run = str(root / "run")
    assert cli.main(["train", "--config", "demo", "--smoke", "--data", str(root / "data"), "--workdir", run,
                     "train.steps=3", "train.log_every=1", "train.eval_every=0", "data.workers=0",
                     "data.val_split=none"]) == 0
    return run


def test_a_run_with_the_training_only_aids_trains_them_and_serves_the_plain_detr(aided_run, tmp_path):
    """The demo's query groups, denoising groups and encoder head (all on in the preset) log their losses and learn;
    the run's checkpoints keep them (for --resume), while what the run serves and saves is the plain DETR (the
    official layout and config) with the aided model's eval outputs; a file saved with them (before detrax saved
    plain DETRs) loads as the plain DETR too, said once."""
    import warnings

    import detrax
    from detrax.models.detr import AID_WEIGHTS
    from detrax.weights.checkpoint import load_run
    from detrax.weights.files import save_weights

    run = aided_run
    rows = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if r["kind"] == "train"]
    assert len(rows) == 3 and all(r[k] > 0 and np.isfinite(r[k]) for r in rows for k in ("loss_dn", "loss_enc"))
    aided = load_run(run)
    assert (aided.config.query_groups, aided.config.dn_groups, aided.config.encoder_head) == (4, 2, True)
    before = weight_arrays(DETR(dataclasses.replace(aided.config), rngs=nnx.Rngs(42)))
    after = weight_arrays(aided)
    for name in ("group_queries", "denoising/label_embed", "encoder_head/class_embed/kernel",
                 "encoder_head/where/kernel"):
        assert not np.array_equal(before[name], after[name]), name  # it learned

    detector = detrax.load(run)
    detector.save(tmp_path / "plain.safetensors")
    save_weights(aided, tmp_path / "aided.safetensors")  # what Detector.save wrote before
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        plain_file = detrax.load(tmp_path / "plain.safetensors", query_groups=1, dn_groups=0, encoder_head=False)
        assert not said
        old_file = detrax.load(tmp_path / "aided.safetensors")
    assert len(said) == 1 and "training-only aids' weights" in str(said[0].message)
    rs = np.random.default_rng(0)
    pixels = jnp.asarray(rs.normal(size=(2, 64, 80, 3)), jnp.float32)
    mask = jnp.ones((2, 64, 80), bool).at[1, :, 60:].set(False)
    want = compiled(aided, pixels, mask)  # eval mode: the first query group alone, no denoising, no encoder head
    for model in (detector.model, plain_file.model, old_file.model):
        c = model.config
        assert (c.query_groups, c.dn_groups, c.encoder_head, c.dn_box_noise) == (1, 0, False, 0.4)
        assert set(weight_arrays(model)) == {k for k in after if not k.startswith(AID_WEIGHTS)}
        got = compiled(model, pixels, mask)
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="without the training-only aids"):
        detrax.load(tmp_path / "plain.safetensors", query_groups=4)
    assert presets.get("detr_r50").model.dn_groups == 0 and not presets.get("detr_r50").model.encoder_head


def _every_layer(model, pixels, mask):
    out = compiled(model, jnp.asarray(pixels), jnp.asarray(mask))
    stack = lambda k: np.stack([np.asarray(a[k]) for a in out["aux_outputs"]] + [np.asarray(out[k])])
    return stack("pred_logits"), stack("pred_boxes")


def test_an_aided_run_converts_out_to_the_official_and_hf_detr(aided_run, tmp_path, capsys):
    """The aided run written by `detrax convert RUN OUT --to official|hf`: the official rendering (its state dict
    strict, its architecture from the file's own args) and transformers' `from_pretrained` give detrax's outputs
    on every decoder layer; a DC5 model (the demo's) is refused by the HF layout, whose ResNet has no dilation, and
    goes there without it; official -> detrax -> official and the segmentation layouts (DETRsegm,
    DetrForSegmentation) come back bitwise."""
    import argparse

    from conftest import require
    from hf_reference import build_hf_detr, hf_all_layers, padded_batch

    import detrax
    from detrax import cli
    from detrax.weights import convert as cv
    from detrax.weights.to_torch import hf_model, official_state_dict, write

    torch, transformers = require("torch"), require("transformers")
    import official_reference as ref

    numpy_sd = lambda module: {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    detector = detrax.load(aided_run)
    c = detector.config
    assert c.dilation and c.query_groups == 1  # the plain DETR of a DC5 demo
    pixels, mask = padded_batch([(61, 83), (77, 50)], seed=1)

    assert cli.main(["convert", aided_run, str(tmp_path / "official.pth"), "--to", "official"]) == 0
    with torch.serialization.safe_globals([argparse.Namespace]):  # the official files carry their args too
        saved = torch.load(tmp_path / "official.pth", weights_only=True)
    a = saved["args"]
    official = ref.DETR(num_classes=a.num_classes, depths=c.depths, width=c.width, dilation=a.dilation,
                        d=a.hidden_dim, nhead=a.nheads, enc=a.enc_layers, dec=a.dec_layers, ffn=a.dim_feedforward,
                        queries=a.num_queries, pre_norm=a.pre_norm).eval()
    official.load_state_dict(saved["model"])  # strict: every key, no other
    with torch.no_grad():
        got = official(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(~mask))
    for g, want in zip(got, _every_layer(detector.model, pixels, mask)):
        np.testing.assert_allclose(g.numpy(), want, atol=1e-4, rtol=0)

    capsys.readouterr()
    assert cli.main(["convert", aided_run, str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "no hf layout: DC5 (HF DETR's own ResNet has no dilation)" in capsys.readouterr().err
    plain_c5 = detrax.load(aided_run, dilation=False)
    write(plain_c5.model, tmp_path / "hf", "hf", plain_c5.names)
    hf = transformers.DetrForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label[1] == "rectangle"
    for g, want in zip(hf_all_layers(hf, pixels, mask), _every_layer(plain_c5.model, pixels, mask)):
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=0)

    tiny = dict(num_classes=5, depths=(1, 1, 2, 3), width=8, d=32, nhead=8, enc=2, dec=2, ffn=64, queries=10)
    for source in (ref.DETR(**tiny), ref.DETRsegm(**tiny)):  # official -> detrax -> official; 8 heads: GroupNorm(8)
        source = numpy_sd(ref.randomise_batch_norm(source.eval()))
        back = official_state_dict(cv.convert(source, num_heads=8)[0])
        assert back.keys() == source.keys() and all(np.array_equal(back[k], source[k]) for k in source)
    source = numpy_sd(build_hf_detr(depths=(1, 1, 1, 1), embedding_size=8, num_labels=5, d_model=32, layers=2,
                                    ffn=64, heads=8, queries=10, segmentation=True))
    back = numpy_sd(hf_model(cv.convert(source, num_heads=8)[0]))
    assert back.keys() == source.keys() and all(np.array_equal(back[k], source[k]) for k in source)
