"""int8 export (detrax.serving.quantize): the file says what it is, keeps the heads in float, runs in both runtimes
near the float model; `detrax export --quantize int8` calibrates on a data folder and reports the accuracy kept."""

import argparse
import json

import numpy as np
import pytest
from conftest import require
from flax import nnx

import detrax
from detrax import cli, commands
from detrax.config import presets, schema
from detrax.data.synthetic import scene, write_dataset
from detrax.serving import quantize
from detrax.serving.export import export
from detrax.serving.infer import batches

DATA = schema.DataConfig(val_size=96, max_size=150, bucket_step=32)


@pytest.fixture(scope="module")
def detector():
    return detrax.Detector(detrax.DETR(presets.tiny().model, rngs=nnx.Rngs(3)), data=DATA)


def test_an_int8_file_says_so_keeps_the_heads_in_float_and_stays_near_float(detector, tmp_path):
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    rng = np.random.default_rng(0)
    calibration = [scene(rng, 100, 130)[0] for _ in range(6)]
    f = export(detector, tmp_path / "f.onnx", "onnx")
    q = export(detector, tmp_path / "q.onnx", "onnx", quantize="int8", calibration=calibration,
               calibration_about={"files": "six scenes"})
    meta = quantize.metadata(q)
    assert quantize.metadata(f) == {"precision": "float32"}
    assert meta["precision"] == "int8"
    assert meta["quantization"]["calibration"] == {"files": "six scenes", "images": 6, "sizes": ["96x128"]}
    graph = onnx.load(q).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    products = {n.name: n for n in graph.node if n.op_type in ("Gemm", "MatMul", "Conv")}
    heads = quantize.head_nodes(onnx.load(f))
    assert len(heads) == 4  # the class head, the box MLP's three layers
    assert all(not set(products[h].input) & dequantized for h in heads)
    assert sum(bool(set(n.input) & dequantized) for n in products.values()) == len(products) - 4
    assert "the class and box heads (4 matrix products)" in meta["quantization"]["kept_float"]
    # 7-bit weights (|w| <= 64): full-range int8 saturates CPUs without VNNI (u8 x s8 pairs summed in int16): logits
    # off by 1.6 on an AVX2 EPYC
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(np.abs(w.astype(int)).max() <= 64 for w in weights)

    b = next(batches([scene(rng, 100, 130)[0] for _ in range(4)], detector.preprocess, 4))
    feed = {"pixels": b["pixels"], "mask": b["mask"]}
    (lf, bf), (lq, bq) = (ort.InferenceSession(p).run(None, feed) for p in (f, q))
    # measured: logits within 0.13 (their spread 1.0), boxes within 0.014, correlation 0.9990 (AVX2 EPYC; 0.06,
    # 0.005 with VNNI). A trained model's AP is what int8 keeps: bench_int8.py
    assert 0 < np.abs(lq - lf).max() < 0.2 and np.abs(bq - bf).max() < 0.03
    assert np.corrcoef(lq.ravel(), lf.ravel())[0, 1] > 0.998
    ov = require("openvino", "onnx")
    compiled = ov.Core().compile_model(q, "CPU")
    out = compiled.create_infer_request().infer(feed)
    np.testing.assert_allclose(out[compiled.output("pred_boxes")], bq, atol=0.01)
    # percentile calibration: its own ranges (another file), said in the metadata, as near the float model
    p = tmp_path / "p.onnx"
    made = quantize.quantize_onnx(f, p, quantize.calibration_batches(detector, calibration), method="percentile")
    assert made["activations"] == "uint8, per tensor, percentile calibration" == \
        quantize.metadata(p)["quantization"]["activations"]
    lp, bp = ort.InferenceSession(p).run(None, feed)
    assert not np.array_equal(lp, lq) and np.abs(lp - lf).max() < 0.2 and np.abs(bp - bf).max() < 0.03
    with pytest.raises(ValueError, match="calibration method 'entropy': methods: minmax, percentile"):
        quantize.quantize_onnx(f, p, [], method="entropy")


def test_export_cli_quantizes_on_a_data_folder_and_reports_the_accuracy_kept(detector, tmp_path, capsys):
    require("onnxruntime", "onnx")
    data = tmp_path / "data"
    write_dataset(str(data), num_images=8, seed=2, sizes=(90, 140))
    weights = tmp_path / "w.safetensors"
    detector.save(weights)
    out = tmp_path / "int8.onnx"
    args = ["export", str(weights), str(out), "--format", "onnx", "--quantize", "int8", "--calibration", str(data),
            "--calibration-images", "4"]
    assert cli.main(args) == 0, capsys.readouterr().err
    done = json.loads(capsys.readouterr().out)
    assert done["quantize"] == "int8" and done["calibration"] == {"data": str(data), "split": "train",
                                                                  "images_used": 4}
    accuracy = done["accuracy"]
    assert accuracy["split"] == "val" and accuracy["within_tolerance"] is True
    assert {"float32_AP50", "float32_AP", "int8_AP50", "int8_AP"} <= set(accuracy)
    assert quantize.metadata(str(out))["quantization"]["calibration"]["images"] == 4

    # int8 that must gain a point to pass is reported (on stderr, and in the JSON), and the file is written
    assert cli.main([*args, "--tolerance", "-1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["accuracy"]["within_tolerance"] is False
    assert "detrax export: int8 AP50" in captured.err and "more than -1.0 points below float32's" in captured.err

    # the file itself evaluated through the one inference path
    assert cli.main(["eval", str(weights), "--data", str(data), "--runtime", "onnxruntime", "--model", str(out)]) == 0
    assert {"AP", "AP50"} <= set(json.loads(capsys.readouterr().out))

    assert cli.main(["export", str(weights), str(out), "--format", "onnx", "--quantize", "int8"]) == 2
    assert "no training data recorded here to calibrate int8 on; give --calibration" in capsys.readouterr().err
    assert cli.main(["export", str(weights), str(tmp_path / "m.bin"), "--quantize", "int8", "--calibration",
                     str(data)]) == 2
    assert "int8 quantization is for the onnx format, not stablehlo" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*args[:7], "--calibration", str(empty)]) == 2
    assert "empty: no images to calibrate on" in capsys.readouterr().err


def test_a_run_calibrates_on_its_own_training_data(tmp_path):
    from detrax.training.start import FORMAT, write_record

    data = tmp_path / "data"
    data.mkdir()
    write_record(str(tmp_path), {"format": FORMAT, "data": {"path": str(data), "split": "train", "images": 3}})
    got = commands._calibration_source(argparse.Namespace(calibration=None, checkpoint=str(tmp_path)))
    assert got == (str(data), "train")
    given = argparse.Namespace(calibration="elsewhere", checkpoint=str(tmp_path))
    assert commands._calibration_source(given) == ("elsewhere", "auto")
