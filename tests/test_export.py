"""Export for serving: the exported function is the one inference path, with the weights inside."""

import json

import numpy as np
import pytest
from flax import nnx

import detrax
from detrax import cli, configs
from detrax.data.synthetic import scene
from detrax.export import FORMATS, Shape, default_shape, export, load_stablehlo
from detrax.infer import batches

DATA = configs.DataConfig(val_size=96, max_size=150, bucket_step=32)


@pytest.fixture(scope="module")
def detector():
    return detrax.Detector(detrax.DETR(configs.tiny().model, rngs=nnx.Rngs(3)), data=DATA)


def _on_canvas(batch, shape):
    """A batch of `infer.batches` placed in the top-left corner of the export's canvas (padding: mask False)."""
    b, h, w = batch["mask"].shape
    pixels = np.zeros((shape.batch, shape.height, shape.width, 3), np.uint8)
    mask = np.zeros((shape.batch, shape.height, shape.width), bool)
    pixels[:b, :h, :w], mask[:b, :h, :w] = batch["pixels"], batch["mask"]
    sizes = np.ones((shape.batch, 2), np.int32)
    sizes[:b] = batch["orig_size"]
    return pixels, mask, sizes


def test_stablehlo_export_equals_the_inference_path(detector, tmp_path):
    shape = default_shape(detector, batch=2)
    assert shape == Shape(2, 160, 160)  # 150 rounded up to the bucket step 32
    path = export(detector, tmp_path / "tiny.stablehlo", "stablehlo", shape)
    served = load_stablehlo(path)
    rng = np.random.default_rng(0)
    images = [scene(rng, 120, 90)[0], scene(rng, 70, 140)[0]]
    batch = next(batches(images, detector.preprocess, 2))
    inputs = _on_canvas(batch, shape)
    want = detector.infer(*inputs)
    got = served(*inputs)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert np.asarray(got[2]).shape == (2, detector.config.num_queries, 4)


def test_onnx_export_runs_in_onnxruntime_with_the_models_outputs(detector, tmp_path):
    from conftest import require

    ort = require("onnxruntime")
    shape = default_shape(detector, batch=2)
    path = export(detector, tmp_path / "tiny.onnx", "onnx", shape)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels", "mask"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    rng = np.random.default_rng(1)
    images = [scene(rng, 120, 90)[0], scene(rng, 70, 140)[0]]
    pixels, mask, _ = _on_canvas(next(batches(images, detector.preprocess, 2)), shape)  # padded
    got = session.run(None, {"pixels": pixels, "mask": mask})
    normalised = (pixels / 255.0 - np.array(detector.config.pixel_mean)) / np.array(detector.config.pixel_std)
    want = detector(normalised.astype(np.float32) * mask[..., None], mask)
    np.testing.assert_allclose(got[0], want["pred_logits"], atol=1e-4)
    np.testing.assert_allclose(got[1], want["pred_boxes"], atol=1e-4)


def test_export_cli_and_bad_input(detector, tmp_path, capsys):
    detector.save(tmp_path / "w.safetensors")
    out = tmp_path / "served" / "model.bin"
    assert cli.main(["export", str(tmp_path / "w.safetensors"), str(out), "--height", "128"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # the weights file carries the detector's val transform: longer side at most 150, padded to a multiple of 32
    assert printed["shape"] == {"batch": 1, "height": 128, "width": 160}
    assert load_stablehlo(out) is not None
    assert cli.main(["export", str(tmp_path / "w.safetensors"), str(out), "--format", "tflite"]) == 2
    assert "unknown export format 'tflite'; formats: onnx, stablehlo" in capsys.readouterr().err
    (tmp_path / "junk.bin").write_bytes(b"not an export")
    with pytest.raises(ValueError, match="junk.bin: not a detrax stablehlo export"):
        load_stablehlo(tmp_path / "junk.bin")
    assert set(FORMATS) == {"onnx", "stablehlo"}  # the built-ins only
