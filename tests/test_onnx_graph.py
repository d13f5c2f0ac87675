"""The export's graph folding (detrax.serving.onnx_graph): a per-channel shift after a Conv or Gemm moves into its
bias, as jax2onnx lays them out (NHWC behind a Transpose, a 1x1 convolution's Gemm behind a Reshape, Gemm's
beta 0), the outputs unchanged; shifts that do not run along the product's channels stay where they are."""

import numpy as np
from conftest import require

from detrax.serving import onnx_graph


def _graph(onnx):
    """x [2, 4, 4, 16] -> Conv (NCHW between Transposes) + shift -> Relu -> y; x as [32, 16] -> Gemm (beta 0, C 0)
    -> [2, 4, 4, 24] + shift -> z; another Gemm -> [2, 4, 4, 8, 3] + a shift of 3 (not its channels) -> w; and a
    Conv + shift that is itself the graph's output v. Weights of 1.5 KiB: written as external data."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    const = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)
    ints = lambda name, a: numpy_helper.from_array(np.asarray(a, np.int64), name)
    inits = [const("w", rng.normal(size=(24, 16, 1, 1))), const("w2", rng.normal(size=(24, 16, 1, 1))),
             const("s24", rng.normal(size=(1, 1, 1, 24))), const("b", rng.normal(size=(16, 24))),
             const("b2", rng.normal(size=(16, 24))), const("zero", 0.0), const("t24", rng.normal(size=(1, 1, 1, 24))),
             const("s3", rng.normal(size=(3,))), ints("flat", [32, 16]), ints("nhwc", [2, 4, 4, 24]),
             ints("split", [2, 4, 4, 8, 3])]
    node = helper.make_node
    nodes = [node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             node("Conv", ["xt", "w"], ["c"]), node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]),
             node("Add", ["s24", "ct"], ["ca"]), node("Relu", ["ca"], ["y"]),
             node("Reshape", ["x", "flat"], ["xf"]),
             node("Gemm", ["xf", "b", "zero"], ["g"], beta=0.0), node("Reshape", ["g", "nhwc"], ["gr"]),
             node("Add", ["gr", "t24"], ["z"]),
             node("Gemm", ["xf", "b2", "zero"], ["g2"], beta=0.0), node("Reshape", ["g2", "split"], ["g2r"]),
             node("Add", ["g2r", "s3"], ["w_"]), node("Relu", ["w_"], ["w_out"]),
             node("Conv", ["xt", "w2"], ["c2"]), node("Transpose", ["c2"], ["c2t"], perm=[0, 2, 3, 1]),
             node("Add", ["c2t", "t24"], ["v"])]
    io = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "g", [io("x", [2, 4, 4, 16])],
                              [io("y", None), io("z", None), io("w_out", None), io("v", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def test_shifts_move_into_their_products_bias_with_the_same_outputs(tmp_path):
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    model = _graph(onnx)
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 16)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = run(model)
    assert onnx_graph.fold_shifts(model.graph) == 3  # the Conv's, the Gemm's, the output Conv's; not the split one
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 1 and ops.count("Identity") == 2  # the split Gemm's shift; z and v keep their names
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and n.output[0] == "g")
    assert [a.f for a in gemm.attribute if a.name == "beta"] == [1.0]
    for got, w in zip(run(model), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)


def test_simplify_gives_the_same_outputs_and_writes_its_weights_beside_the_file(tmp_path, monkeypatch):
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    model = _graph(onnx)
    src = tmp_path / "src.onnx"
    onnx_graph.save(model, str(src), external=True)
    assert (tmp_path / "src.onnx.data").stat().st_size == 4 * 1536  # the four weights
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    (tmp_path / "out" / "m.onnx.data").write_bytes(b"stale")  # onnx's own saver fails on this in the working folder
    dst = tmp_path / "out" / "m.onnx"
    sizes = []
    for _ in range(2):  # written again: its data file replaced, not appended to
        onnx_graph.simplify(str(src), str(dst))
        sizes.append((tmp_path / "out" / "m.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1] >= 4 * 1536
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 16)).astype(np.float32)
    want, got = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"x": x})
                 for f in (src, dst))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in onnx.load(str(dst)).graph.node].count("Add") == 1  # the split Gemm's shift alone
