"""Export for serving and the runtimes that run exports: the exported model is the detector's, at any batch and
image size, and every runtime gives the detections of the one inference path."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import detrax
from detrax import cli
from detrax.config import presets, schema
from detrax.config.overrides import override
from detrax.data.synthetic import scene
from detrax.models.backbones import registry as backbones
from detrax.serving.export import FORMATS, Shape, export, load_stablehlo
from detrax.serving.infer import batches

DATA = schema.DataConfig(val_size=96, max_size=150, bucket_step=32)


@pytest.fixture(scope="module")
def detector():
    return detrax.Detector(detrax.DETR(presets.tiny().model, rngs=nnx.Rngs(3)), data=DATA)


@pytest.fixture(scope="module")
def onnx_file(detector, tmp_path_factory):
    """The detector exported to ONNX once, any batch and size."""
    return export(detector, tmp_path_factory.mktemp("onnx") / "tiny.onnx", "onnx")


def _batch(detector, seed, sizes):
    """Images of these sizes, and the first batch `infer.batches` makes of them."""
    rng = np.random.default_rng(seed)
    images = [scene(rng, h, w)[0] for h, w in sizes]
    return images, next(batches(images, detector.preprocess, len(images)))


def _on_canvas(batch, height, width):
    """A batch placed in the top-left corner of a larger canvas (padding: mask False)."""
    b, h, w = batch["mask"].shape
    pixels = np.zeros((b, height, width, 3), np.uint8)
    mask = np.zeros((b, height, width), bool)
    pixels[:, :h, :w], mask[:, :h, :w] = batch["pixels"], batch["mask"]
    return pixels, mask, batch["orig_size"]


def _model_outputs(detector, pixels, mask):
    normalised = (pixels / 255.0 - np.array(detector.config.pixel_mean)) / np.array(detector.config.pixel_std)
    return detector(normalised.astype(np.float32) * mask[..., None], mask)


def test_stablehlo_export_equals_the_inference_path_at_any_batch_and_size(detector, tmp_path):
    path = export(detector, tmp_path / "tiny.stablehlo", "stablehlo")
    served = load_stablehlo(path)
    for seed, sizes in ((0, [(120, 90), (100, 80)]), (1, [(90, 150)])):  # one shape bucket each
        _, batch = _batch(detector, seed, sizes)
        inputs = (batch["pixels"], batch["mask"], batch["orig_size"])
        want, got = detector.infer(*inputs), served(*inputs)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # boxes in pixels
        assert np.asarray(got[2]).shape == (len(sizes), detector.config.num_queries, 4)  # all in one batch


def test_onnx_export_runs_in_onnxruntime_with_the_models_outputs(detector, onnx_file):
    from conftest import require

    ort = require("onnxruntime")
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels", "mask"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    assert [str(d) for d in session.get_inputs()[0].shape] == ["B", "H", "W", "3"]  # any batch and size
    for seed, sizes, more in ((1, [(120, 90), (100, 80)], (64, 32)), (2, [(61, 37)], (5, 3))):
        _, batch = _batch(detector, seed, sizes)
        h, w = batch["mask"].shape[1:]
        pixels, mask, _ = _on_canvas(batch, h + more[0], w + more[1])  # padded; the second: no multiple of 32
        got = session.run(None, {"pixels": pixels, "mask": mask})
        want = _model_outputs(detector, pixels, mask)
        np.testing.assert_allclose(got[0], want["pred_logits"], atol=1e-4)
        np.testing.assert_allclose(got[1], want["pred_boxes"], atol=1e-4)


def test_a_fixed_shape_and_bfloat16_are_what_the_export_holds(detector, tmp_path):
    path = export(detector, tmp_path / "fixed.stablehlo", "stablehlo", Shape(2, 96, 128), dtype="bfloat16")
    served = load_stablehlo(path)
    _, batch = _batch(detector, 3, [(90, 120), (80, 100)])
    assert batch["mask"].shape[0] == 2
    pixels, mask, sizes = _on_canvas(batch, 96, 128)
    bf16 = detector.with_config(dtype="bfloat16")
    assert bf16.model.dtype == jax.numpy.bfloat16 and detector.config.dtype == "float32"
    want, got = bf16.infer(pixels, mask, sizes), served(pixels, mask, sizes)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-2)
    fp32 = detector.infer(pixels, mask, sizes)
    assert np.abs(np.asarray(got[0]) - np.asarray(fp32[0])).max() > 1e-5  # it did compute in bfloat16
    with pytest.raises(ValueError, match="shape"):
        served(pixels[:1], mask[:1], sizes[:1])  # batch 2 only


def _callback_backbone(config, rngs):
    class HostFeatures(nnx.Module):  # features computed on the host: nothing ONNX can hold
        out_channels = 3

        def __call__(self, x, mask=None):
            x = x[:, ::32, ::32]
            return jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    return HostFeatures()


def test_a_model_onnx_cannot_hold_is_named(tmp_path):
    from conftest import require

    require("jax2onnx", "onnx")
    backbones.register(backbones.Backbone("host", _callback_backbone))
    try:
        cfg = override(presets.tiny(), ["model.backbone=host"]).model
        det = detrax.Detector(detrax.DETR(cfg, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match="cannot be exported to ONNX: .*'pure_callback'"):
            export(det, tmp_path / "host.onnx", "onnx")
    finally:
        del backbones.FAMILIES["host"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_every_runtime_gives_the_detections_of_xla(detector, onnx_file, runtime):
    from conftest import require

    require(runtime, "onnx")
    images, _ = _batch(detector, 4, [(120, 90), (70, 140), (150, 100)])
    want = detector.predict(images, threshold=0.0, batch_size=2)  # every query
    got = detector.with_runtime(runtime, onnx=onnx_file).predict(images, threshold=0.0, batch_size=2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["queries"], w["queries"])
        np.testing.assert_array_equal(g["labels"], w["labels"])
        np.testing.assert_allclose(g["boxes"], w["boxes"], atol=1e-3)
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5)


def test_export_cli_and_bad_input(detector, tmp_path, capsys):
    detector.save(tmp_path / "w.safetensors")
    out = tmp_path / "served" / "model.bin"
    assert cli.main(["export", str(tmp_path / "w.safetensors"), str(out), "--size", "128x160", "--batch", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shape"] == {"batch": 1, "height": 128, "width": 160} and printed["dtype"] == "float32"
    assert load_stablehlo(out) is not None
    assert cli.main(["export", str(tmp_path / "w.safetensors"), str(out), "--size", "128x"]) == 2
    assert "--size '128x': expected HxW" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "w.safetensors"), str(out), "--format", "tflite"]) == 2
    assert "unknown export format 'tflite'; formats: onnx, stablehlo" in capsys.readouterr().err
    (tmp_path / "junk.bin").write_bytes(b"not an export")
    with pytest.raises(ValueError, match="junk.bin: not a detrax stablehlo export"):
        load_stablehlo(tmp_path / "junk.bin")
    assert set(FORMATS) == {"onnx", "stablehlo"}  # the built-ins only
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; runtimes: onnxruntime, openvino, xla"):
        detector.with_runtime("tensorrt")
    with pytest.raises(FileNotFoundError, match="nothing.onnx: no such ONNX file"):
        detector.with_runtime("onnxruntime", onnx=str(tmp_path / "nothing.onnx")).predict(np.zeros((8, 8, 3)))


def test_predict_cli_runtime_flag(detector, onnx_file, tmp_path, capsys, monkeypatch):
    """`--runtime`, and with `--model` the exported file itself (`onnx_file`, this detector's export): the same
    detections as the model exported on the fly, which leaves nothing in the temporary folder."""
    import tempfile

    from conftest import require

    require("onnxruntime", "onnx")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    detector.save(tmp_path / "w.safetensors")
    rng = np.random.default_rng(5)
    for i in range(2):
        scene(rng, 100, 130)[0].save(tmp_path / f"{i}.png")
    results = {}
    for name, flags in [("xla", ["--runtime", "xla"]), ("onnxruntime", ["--runtime", "onnxruntime"]),
                        ("file", ["--runtime", "onnxruntime", "--model", str(onnx_file)])]:
        out = tmp_path / name
        args = ["predict", str(tmp_path / "w.safetensors"), str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                "--out", str(out), "--threshold", "0.0", *flags]
        assert cli.main(args) == 0, capsys.readouterr().err
        results[name] = json.loads((out / "results.json").read_text())
    assert len(results["xla"]) == 2 * detector.config.num_queries
    assert results["file"] == results["onnxruntime"]
    assert not list((tmp_path / "tmp").iterdir())  # the on-the-fly export removed
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "w.safetensors"), str(tmp_path / "0.png"), "--out",
                     str(tmp_path / "x"), "--model", str(onnx_file)]) == 2
    assert "--model is an exported file for another runtime" in capsys.readouterr().err
    for a, b in zip(results["onnxruntime"], results["xla"], strict=True):
        assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.02)  # rounded to 0.01 px in the file


def test_official_detr_r50_converted_and_exported_by_the_cli_gives_official_outputs(tmp_path, capsys):
    """The official DETR-R50 (random weights, non-trivial batch-norm statistics), `detrax convert` then `detrax
    export --format onnx --size HxW`: ONNX Runtime gives the official outputs on a padded batch."""
    import argparse

    from conftest import require

    torch = require("torch")
    ort = require("onnxruntime", "onnx")
    import official_reference as ref

    torch.manual_seed(0)
    official = ref.randomise_batch_norm(ref.DETR().eval())  # R50, 6 + 6 layers, 100 queries, 91 classes
    torch.save({"model": official.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "detr.pth")
    assert cli.main(["convert", str(tmp_path / "detr.pth"), str(tmp_path / "detr.safetensors")]) == 0
    out = tmp_path / "detr.onnx"
    assert cli.main(["export", str(tmp_path / "detr.safetensors"), str(out), "--format", "onnx", "--size",
                     "96x128", "--batch", "2"]) == 0, capsys.readouterr().err
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 96, 128, 3), dtype=np.uint8)
    mask = np.zeros((2, 96, 128), bool)
    mask[0, :96, :100], mask[1, :70, :128] = True, True  # both padded
    normalised = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    normalised = (normalised * mask[..., None]).astype(np.float32)
    with torch.no_grad():
        logits, boxes = official(torch.from_numpy(normalised).permute(0, 3, 1, 2).contiguous(),
                                 torch.from_numpy(~mask))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in session.get_inputs()] == [(2, 96, 128, 3), (2, 96, 128)]
    got_logits, got_boxes = session.run(None, {"pixels": pixels, "mask": mask})
    np.testing.assert_allclose(got_logits, logits[-1].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_boxes, boxes[-1].numpy(), atol=1e-4, rtol=0)
