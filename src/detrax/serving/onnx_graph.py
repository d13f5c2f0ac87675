"""The ONNX export's graph made cheaper to run, with the same outputs: what jax2onnx writes, folded by ONNX Runtime's
basic graph optimisations (constants, Conv + Add: standard ONNX operators only, for any runtime), then each
per-channel shift after a convolution or matrix product (the frozen batch norm's, a layer's bias), which jax2onnx
writes as a broadcast Add behind a layout Transpose or Reshape, moved into that Conv's or Gemm's own bias input.
An int8 file quantizes the bias with its product (QLinearConv / QGemm with an int32 bias): no float pass over
every activation for it (what that gives: bench_export.py).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


def simplify(src: str, dst: str) -> int:
    """`src` (an ONNX file) optimised into `dst` (weights beside it as `<dst>.data` when `src` had them). Returns
    how many shifts were moved into their product's bias."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="detrax-onnx-graph-") as work:
        folded = os.path.join(work, "basic.onnx")
        _basic(src, folded)
        model = onnx.shape_inference.infer_shapes(onnx.load(folded))  # its weights read in from beside it
    moved = fold_shifts(model.graph)
    drop_null_c(model.graph)
    save(model, dst, external=os.path.exists(f"{src}.data"))
    return moved


def save(model, path: str, external: bool) -> None:
    """`model` written to `path`, its weights (with `external`) to `<path>.data` beside it, replacing both.
    (onnx's own `save_as_external_data` looks for an existing data file relative to the working folder, not the
    model's, and appends to one it finds.)"""
    import onnx
    from onnx.external_data_helper import set_external_data

    data = f"{path}.data"
    if os.path.exists(data):
        os.remove(data)
    if external:
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                set_external_data(tensor, os.path.basename(data))
    onnx.save_model(model, path)


def _basic(src: str, dst: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{os.path.basename(dst)}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


# the product, and the layout op jax2onnx writes between it and the shift
_PRODUCTS = {"Conv": ("Transpose", [0, 2, 3, 1]), "Gemm": ("Reshape", None)}


def fold_shifts(graph) -> int:
    """Rewrite `product -> layout -> Add(shift)` as `product(+ shift) -> layout`, where `shift` is a constant
    per-channel vector (shape [..., 1, C]) and each intermediate feeds that node alone. In place; returns the count."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    shapes = {v.name: v.type.tensor_type.shape for v in graph.value_info}
    rename, dead = {}, []
    for add in graph.node:
        if add.op_type != "Add":
            continue
        for x, s in (add.input, add.input[::-1]):
            shift = numpy_helper.to_array(inits[s]) if s in inits else None
            layout, product = producer.get(x), None
            if shift is None or shift.ndim == 0 or shift.size != shift.shape[-1] or layout is None:
                continue
            product = producer.get(layout.input[0])
            if product is None or product.op_type not in _PRODUCTS or layout.op_type != _PRODUCTS[product.op_type][0]:
                continue
            perm = [list(a.ints) for a in layout.attribute if a.name == "perm"]
            if _PRODUCTS[product.op_type][1] not in (None, *perm):
                continue
            if users.get(x) != 1 or users.get(product.output[0]) != 1 or x in outputs:
                continue
            if len(product.input) > 2 and product.input[2] and product.input[2] not in inits:
                continue
            if _channels(product, inits) != shift.size or _last_dim(x, shapes) != shift.size:
                continue  # the shift must run along the product's output channels
            bias = shift.reshape(-1).astype(np.float32)
            if len(product.input) > 2 and product.input[2]:  # Gemm's C counts beta times (jax2onnx: 0 times 0)
                beta = [a for a in product.attribute if a.name == "beta"]
                scale = beta[0].f if beta else 1.0
                bias = bias + scale * numpy_helper.to_array(inits[product.input[2]]).reshape(-1)
            for a in product.attribute:
                if a.name == "beta":
                    a.f = 1.0
            graph.initializer.append(numpy_helper.from_array(bias, f"{product.output[0]}_shift"))
            del product.input[2:]
            product.input.append(f"{product.output[0]}_shift")
            rename[add.output[0]] = x
            dead.append(add)
            break
    for node in dead:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in graph.output:  # an Add that was a graph output keeps its name through an Identity
        if out.name in rename:
            graph.node.append(_identity(rename[out.name], out.name))
    return len(dead)


def drop_null_c(graph) -> None:
    """A Gemm's C that counts zero times (beta 0: jax2onnx's product without a bias) removed, with its beta: ONNX
    Runtime's quantizer takes any C for a bias, and fails on a scalar one."""
    for node in graph.node:
        beta = [a for a in node.attribute if a.name == "beta"]
        if node.op_type == "Gemm" and len(node.input) > 2 and beta and beta[0].f == 0.0:
            del node.input[2:]
            node.attribute.remove(beta[0])


def _channels(product, inits) -> int | None:
    """The output channels of a Conv (weight [M, C, kh, kw]) or Gemm (B [K, N], or [N, K] with transB)."""
    weight = inits.get(product.input[1])
    if weight is None:
        return None
    if product.op_type == "Conv":
        return weight.dims[0]
    trans_b = any(a.name == "transB" and a.i for a in product.attribute)
    return weight.dims[0] if trans_b else weight.dims[1]


def _last_dim(name: str, shapes: dict) -> int | None:
    dims = shapes[name].dim if name in shapes else []
    return dims[-1].dim_value or None if dims else None


def _identity(src: str, dst: str):
    from onnx import helper

    return helper.make_node("Identity", [src], [dst], name=f"{dst}_identity")
