"""Conversion of official DETR, HF DETR and torchvision ResNet weights, against independent torch references."""

import argparse
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled, require
from hf_reference import build_hf_detr, hf_all_layers, padded_batch

from detrax.config.schema import ModelConfig
from detrax.models.backbones.resnet import ResNet
from detrax.weights import convert as cv
from detrax.weights import files as weights

torch = require("torch")
import official_reference as ref  # noqa: E402

TINY = dict(num_classes=5, depths=(1, 1, 2, 3), width=8, d=32, nhead=4, enc=2, dec=2, ffn=64, queries=10)
SIZES = [(61, 83), (77, 50)]  # odd sizes, both padded


def _numpy_sd(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _official(dilation=False, pre_norm=False, seed=0):
    torch.manual_seed(seed)
    model = ref.DETR(**TINY, dilation=dilation, pre_norm=pre_norm).eval()
    return ref.randomise_batch_norm(model, seed)


def _run_official(model, pixels, mask):
    with torch.no_grad():
        logits, boxes = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(~mask))
    return logits.numpy(), boxes.numpy()


def _all_layers(model, pixels, mask):
    out = compiled(model, pixels, mask)
    stack = lambda k: np.stack([a[k] for a in out["aux_outputs"]] + [out[k]])
    return stack("pred_logits"), stack("pred_boxes")


@pytest.mark.parametrize("dilation,pre_norm", [(False, False), (True, False), (False, True)])
def test_official_checkpoint_gives_official_outputs(tmp_path, dilation, pre_norm):
    official = _official(dilation, pre_norm)
    pixels, mask = padded_batch(SIZES, seed=1)
    want_logits, want_boxes = _run_official(official, pixels, mask)
    path = tmp_path / ("detr-dc5.pth" if dilation else "detr.pth")
    torch.save({"model": official.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    report = cv.convert_file(path, tmp_path / "out.safetensors", num_heads=4)
    cfg = report["config"]
    assert report["format"] == "official" and cfg.dilation == dilation and cfg.pre_norm == pre_norm
    assert (cfg.depths, cfg.width, cfg.hidden_dim, cfg.enc_layers, cfg.dec_layers, cfg.num_queries,
            cfg.num_classes) == ((1, 1, 2, 3), 8, 32, 2, 2, 10, 5)
    model = weights.load_weights(tmp_path / "out.safetensors")
    logits, boxes = _all_layers(model, pixels, mask)
    assert logits.shape == (2, 2, 10, 6)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)


def test_dc5_backbone_matches_dilated_torch_resnet_stage_by_stage():
    depths = (2, 2, 3, 3)
    torch.manual_seed(0)
    theirs = ref.randomise_batch_norm(ref.ResNet(depths, width=8, dilation=True).eval())
    model, report = cv.convert(_numpy_sd(theirs) | {"fc.weight": np.zeros((1000, 256), np.float32)},
                               ModelConfig(backbone="resnet", depths=depths, width=8, hidden_dim=32, num_heads=4),
                               dilation=True)
    assert report["format"] == "torchvision" and report["fresh"]  # the transformer and heads are new
    x = np.random.default_rng(0).standard_normal((2, 70, 45, 3)).astype(np.float32)
    with torch.no_grad():
        want = theirs.stages(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    got = model.backbone.stages(jnp.asarray(x))
    strides = [4, 8, 16, 16]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape[1] == -(-70 // strides[i]) and g.shape[-1] == w.shape[1]
        np.testing.assert_allclose(np.asarray(g), w.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-5,
                                   err_msg=f"layer{i + 1}")


def test_torchvision_resnet_with_bn_counters_and_classifier():
    torch.manual_seed(0)
    tv = ref.randomise_batch_norm(ref.ResNet((1, 1, 1, 1), width=8, norm=torch.nn.BatchNorm2d, fc=True).eval())
    sd = _numpy_sd(tv)
    assert any(k.endswith("num_batches_tracked") for k in sd) and "fc.weight" in sd
    model, report = cv.convert(sd, ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, hidden_dim=32,
                                               num_heads=4, num_classes=3))
    assert "class_embed/kernel" in report["fresh"] and not any(k.startswith("backbone") for k in report["fresh"])
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = tv.stages(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[-1].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(compiled(model.backbone, jnp.asarray(x))), want, atol=1e-4, rtol=1e-5)
    assert compiled(model, x)["pred_logits"].shape == (1, 100, 4)


def test_hf_transformers4_hub_names_from_safetensors(tmp_path):
    hf = build_hf_detr(depths=(1, 1, 1, 1), embedding_size=8, num_labels=5, d_model=32, layers=2, ffn=64,
                       heads=4, queries=10)
    pixels, mask = padded_batch(SIZES, seed=2)
    want_logits, want_boxes = hf_all_layers(hf, pixels, mask)
    renames = [("model.backbone.model.", "model.backbone.conv_encoder.model."), (".o_proj.", ".out_proj."),
               (".mlp.fc", ".fc")]  # transformers 5 names -> the names in the published (v4) files
    sd = {}
    for k, v in hf.state_dict().items():
        for a, b in renames:
            k = k.replace(a, b)
        sd[k] = v.numpy()
    from safetensors.numpy import save_file

    save_file(sd, tmp_path / "model.safetensors")
    report = cv.convert_file(tmp_path / "model.safetensors", tmp_path / "out.safetensors", num_heads=4)
    assert report["format"] == "hf" and report["config"].num_classes == 5
    logits, boxes = _all_layers(weights.load_weights(tmp_path / "out.safetensors"), pixels, mask)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def official_sd():
    return _numpy_sd(_official())


def test_unused_source_key_is_named(official_sd):
    sd = dict(official_sd, **{"transformer.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(cv.ConversionError, match=r"left unused \(1\): transformer\.extra\.weight"):
        cv.convert(sd, num_heads=4)


def test_missing_source_key_is_named(official_sd):
    sd = {k: v for k, v in official_sd.items() if k != "transformer.decoder.layers.1.norm2.bias"}
    with pytest.raises(cv.ConversionError, match=r"missing \(1\): transformer\.decoder\.layers\.1\.norm2\.bias"):
        cv.convert(sd, num_heads=4)


def test_wrong_shape_names_both_shapes(official_sd):
    sd = dict(official_sd)
    sd["transformer.encoder.layers.0.linear2.bias"] = np.zeros(33, np.float32)
    msg = r"linear2/bias .*linear2\.bias \(33,\).* shape \(33,\).*needs \(32,\)"
    with pytest.raises(cv.ConversionError, match=msg):
        cv.convert(sd, num_heads=4)


def test_unrecognised_layout_and_bad_files(tmp_path):
    with pytest.raises(cv.ConversionError, match="unrecognised checkpoint layout.*'a.weight'"):
        cv.convert({"a.weight": np.zeros(2, np.float32)})
    with pytest.raises(cv.ConversionError, match="no such file"):
        cv.read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(cv.ConversionError, match="junk.pth: not a weights file detrax knows"):
        cv.read_state_dict(tmp_path / "junk.pth")


def test_torch_file_without_torch_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"\x80\x02}q\x00.")  # the start of a pickle: torch's legacy format
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(cv.ConversionError, match=r"needs PyTorch: pip install 'detrax\[torch\]'"):
        cv.read_state_dict(tmp_path / "w.pth")


def test_weights_file_round_trip_and_bad_file(tmp_path, official_sd):
    model, _ = cv.convert(official_sd, num_heads=4)
    weights.save_weights(model, tmp_path / "w.safetensors")
    again = weights.load_weights(tmp_path / "w.safetensors")
    x = np.random.default_rng(0).standard_normal((1, 40, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(compiled(model, x)["pred_boxes"], compiled(again, x)["pred_boxes"])
    with pytest.raises(ValueError, match="not a detrax weights file"):
        from safetensors.numpy import save_file
        save_file({"a": np.zeros(1, np.float32)}, tmp_path / "other.safetensors")
        weights.load_weights(tmp_path / "other.safetensors")


def test_an_unreadable_weights_file_is_named(tmp_path, monkeypatch, capsys):
    """A file without read permission: one line naming it, from the API and the CLI (root reads anything, so the
    permission check is told that it may not)."""
    import os

    import detrax
    from detrax import cli

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights")
    path.chmod(0)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(path) and access(p, mode, **kw))
    with pytest.raises(PermissionError, match=f"{path}: cannot be read"):
        detrax.load(path)
    assert cli.main(["eval", str(path), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"detrax: error: {path}: cannot be read (no read permission for this user)\n"


def test_files_are_told_by_their_content_not_their_names(tmp_path, official_sd):
    """`detrax convert official.pth converted` (no suffix), then `detrax.load("converted")`; a torch file named
    .safetensors and an .npz named .bin are read for what they are; anything else is named as such."""
    import detrax
    from detrax import cli

    tensors = {k: torch.from_numpy(v) for k, v in official_sd.items()}
    torch.save({"model": tensors}, tmp_path / "official.pth")
    torch.save({"model": tensors}, tmp_path / "misnamed.safetensors")
    torch.save({"model": tensors}, tmp_path / "legacy", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "arrays.npz", a=np.zeros(2, np.float32))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.bin")
    (tmp_path / "text.pth").write_text("hello")
    kinds = {name: weights.file_kind(tmp_path / name) for name in ("official.pth", "misnamed.safetensors",
                                                                     "legacy", "arrays.bin")}
    assert kinds == {"official.pth": "torch", "misnamed.safetensors": "torch", "legacy": "torch",
                     "arrays.bin": "npz"}
    with pytest.raises(ValueError, match="text.pth: not a weights file"):
        weights.file_kind(tmp_path / "text.pth")
    assert cli.main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "converted"), "--num-heads", "4"]) == 0
    assert weights.file_kind(tmp_path / "converted") == "safetensors" and weights.is_detrax(tmp_path / "converted")
    x = np.random.default_rng(0).standard_normal((1, 40, 40, 3)).astype(np.float32)
    want = compiled(detrax.load(str(tmp_path / "official.pth"), num_heads=4).model, x)["pred_boxes"]
    for name in ("converted", "misnamed.safetensors", "legacy"):
        got = detrax.load(str(tmp_path / name), **({} if name == "converted" else {"num_heads": 4}))
        np.testing.assert_array_equal(compiled(got.model, x)["pred_boxes"], want, err_msg=name)
    assert cli.main(["convert", str(tmp_path / "text.pth"), str(tmp_path / "x")]) == 2


def test_resnet_module_has_torchvision_structure():
    m = ResNet((3, 4, 6, 3), rngs=__import__("flax").nnx.Rngs(0))
    assert len(m.layer3) == 6 and m.out_channels == 2048 and m.layer2[0].conv2.stride == 2


def test_cli_convert(tmp_path, capsys, official_sd):
    from detrax import cli

    torch.save({"model": {k: torch.from_numpy(v) for k, v in official_sd.items()}}, tmp_path / "detr-r50-dc5.pth")
    assert cli.main(["convert", str(tmp_path / "detr-r50-dc5.pth"), str(tmp_path / "w.safetensors"),
                     "--num-heads", "4"]) == 0
    out = capsys.readouterr().out
    assert "official checkpoint" in out and "DC5" in out
    assert weights.model_config(tmp_path / "w.safetensors").dilation
    assert cli.main(["convert", str(tmp_path / "nothing.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "nothing.pth: no such file" in capsys.readouterr().err

