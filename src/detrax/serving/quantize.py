"""int8 post-training quantization of detrax's ONNX export (`detrax export --format onnx --quantize int8`,
`export(..., quantize="int8", calibration=images)`).

The float32 graph becomes a QDQ graph (QuantizeLinear / DequantizeLinear around the quantized operators), which ONNX
Runtime and OpenVINO both run with int8 kernels: ONNX Runtime's static quantization, with activation ranges
calibrated (min / max, or a percentile: `quantize_onnx`'s `method`) on images passed through the detector's own val
transform, as `predict` passes them. Quantized: the convolutions and matrix products (weights int8 per output
channel, activations uint8 per tensor). The weights keep 7 bits ([-64, 64], ONNX Runtime's `reduce_range`): x86 CPUs
without VNNI (AVX2, AVX-512 before Cascade Lake) multiply uint8 by int8 in pairs summed into int16 (VPMADDUBSW),
which saturates on full-range weights; both runtimes then gave logits off by 1.6 (their spread 1.0) on an AVX2 EPYC,
0.12 with 7 bits. Kept in float: everything else (softmax, layer norm, the position encoding, residual sums) and the
class and box heads (`head_nodes`), the small layers whose int8 error reaches the outputs unaveraged.
The file says so in its metadata (`detrax.precision`, `detrax.quantization`: tool, what was quantized, what was
kept in float, the calibration images).
"""

from __future__ import annotations

import json
import os

import numpy as np

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
METHODS = {"minmax": "MinMax", "percentile": "Percentile"}  # ONNX Runtime's CalibrationMethod names
METADATA = "detrax.quantization"


def calibration_batches(detector, images) -> list[dict]:
    """Images (paths, PIL images or uint8 arrays) -> the ONNX model's inputs, one image per batch
    ({"pixels" uint8 [1, H, W, 3], "mask" bool [1, H, W]}), resized and padded as the inference path does."""
    from detrax.serving.images import to_rgb
    from detrax.serving.infer import batches

    images = [to_rgb(im) for im in images]
    if not images:
        raise ValueError("int8 calibration needs at least one image")
    return [{"pixels": np.asarray(b["pixels"], np.uint8), "mask": np.asarray(b["mask"], bool)}
            for b in batches(images, detector.preprocess, 1)]


def calibration_images(source: str, count: int, split: str = "auto") -> tuple[list, dict]:
    """`count` images for calibration from `source`: a data folder (its training split, or `split`; images spread
    evenly over it), else image files or folders of images. Returns (PIL images, what they are for the metadata)."""
    from detrax.data.coco import load_image
    from detrax.data.sources import list_splits, read_split, resolve_split
    from detrax.serving.images import list_images, read_image

    if source.startswith("tfds:") or os.path.isdir(source) and list_splits(source):
        split = resolve_split(source, split, "train")
        records = read_split(source, split).records  # indexed, not listed: a TFDS split is read lazily
        picked = [records[i] for i in _spread(len(records), count)]
        where = source if source.startswith("tfds:") else os.path.abspath(source)
        return [load_image(r) for r in picked], {"data": where, "split": split}
    files = list_images([source])
    if not files:
        raise ValueError(f"{source}: no images to calibrate on (a data folder, an image or a folder of images)")
    return [read_image(files[i]) for i in _spread(len(files), count)], {"files": os.path.abspath(source)}


def _spread(n: int, count: int) -> list[int]:
    """`count` indices (at most `n`) spread evenly over range(n), first and last included."""
    return [int(i) for i in np.linspace(0, n - 1, min(count, n)).astype(int)]


# the operators between the decoder's last layer norm and the outputs: the class and box heads' layers
_HEAD_OPS = {"Gemm", "MatMul", "Relu", "Sigmoid", "Add", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity",
             "Cast", "Slice", "Concat", "Gather", "Expand"}


def head_nodes(model) -> list[str]:
    """Names of the matrix products of the class and box heads: reached from the graph's outputs backwards through
    head operators only (the walk stops at the decoder's layer norm, whose scale is a Mul)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    seen, todo, found = set(), [o.name for o in model.graph.output], []
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen or node.op_type not in _HEAD_OPS:
            continue
        seen.add(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            found.append(node.name)
        todo += list(node.input)
    return found


def quantize_onnx(src: str, dst: str, batches: list[dict], about: dict | None = None,
                  keep_heads: bool = True, method: str = "minmax") -> dict:
    """Quantize the float ONNX file `src` into `dst` (QDQ), calibrated on `batches` (`calibration_batches`) by
    `method` (`METHODS`: each activation's min / max, or its 99.999th percentile, which an outlier moves less and
    which takes about 4x longer); `about` (the calibration's source) goes into the metadata. Returns the metadata
    written. `keep_heads=False` quantizes the class and box heads too (measured on the demo run: AP50 65.66
    against 65.87 with them in float)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: methods: {', '.join(METHODS)}")
    model = onnx.load(src, load_external_data=False)
    excluded = head_nodes(model) if keep_heads else []

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            return next(self.left, None)

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                    use_external_data_format=os.path.exists(f"{src}.data"),
                    calibration_providers=["CPUExecutionProvider"])
    shapes = sorted({tuple(b["pixels"].shape[1:3]) for b in batches})
    kept = [f"the class and box heads ({len(excluded)} matrix products)"] if excluded else []
    meta = {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ)",
            "weights": "int8 in [-64, 64] (7 bits), per output channel",
            "activations": f"uint8, per tensor, {method} calibration",
            "quantized_ops": list(QUANTIZED_OPS),
            "kept_float": kept + ["every other operator: attention's products, softmax, layer norm, sums"],
            "calibration": {**(about or {}), "images": len(batches), "sizes": [f"{h}x{w}" for h, w in shapes]}}
    set_metadata(dst, {"detrax.precision": "int8", METADATA: json.dumps(meta)})
    return meta


def set_metadata(path: str, props: dict) -> None:
    """Add `props` to an ONNX file's metadata (its external weights untouched)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def metadata(path: str) -> dict:
    """An ONNX file's detrax metadata: {"precision": ..., "quantization": {...}} (float32 where none is said)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    out = {"precision": props.get("detrax.precision", "float32")}
    if METADATA in props:
        out["quantization"] = json.loads(props[METADATA])
    return out
