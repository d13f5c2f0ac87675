"""Export formats: a detector written out for serving without detrax, with its weights inside. Input sizes are
dynamic (symbolic batch, height and width) unless a `Shape` fixes them.

A format is a function (detector, path, shape) -> None, registered with `register_format(name, fn)`; `export`
and `detrax export` take any registered one. Built in:
- `stablehlo`: `jax.export`'s serialized StableHLO of the one inference function (`infer.make_infer`: uint8
  pixels, padding mask and original sizes in; scores, labels and absolute boxes out, normalisation and
  post-processing included); `load_stablehlo(path)` runs it with JAX alone (on any platform it was exported for).
- `onnx` (the `onnx` extra: jax2onnx): the model's own outputs for the runtimes people deploy with (ONNX Runtime,
  OpenVINO; `serving.runtimes`): inputs `pixels` uint8 [B, H, W, 3] and `mask` bool [B, H, W] (True on the image),
  normalised inside; outputs `pred_logits` [B, Q, C + 1] and `pred_boxes` [B, Q, 4] (cx, cy, w, h relative to each
  image), and for a mask model `pred_masks` [B, Q, H / 4, W / 4], as `Detector.__call__` gives them. Post-processing
  stays with the caller (`postprocess`, `panoptic`). The graph is folded before it is written
  (`onnx_graph.simplify`: the same outputs, fewer passes over the activations). Large weights are written beside
  the graph as `<path>.data` (ONNX's external data; the runtimes read it from there).
`dtype="bfloat16"` exports the model computing in bfloat16 (weights stored in float32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    """The exported function's input: `batch` images padded into a `height` x `width` canvas; None: any size
    (a symbolic dimension)."""

    batch: int | None = None
    height: int | None = None
    width: int | None = None

    def dims(self) -> tuple:
        """(B, H, W) with a symbolic dimension for each one left free."""
        given = dataclasses.astuple(self)
        free = [name for name, v in zip("BHW", given) if v is None]
        symbols = dict(zip(free, jax.export.symbolic_shape(", ".join(free)))) if free else {}
        return tuple(symbols.get(name, v) for name, v in zip("BHW", given))

    def inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """(pixels uint8 [B, H, W, 3], mask bool [B, H, W], orig_size int32 [B, 2])."""
        b, h, w = self.dims()
        return (jax.ShapeDtypeStruct((b, h, w, 3), np.uint8), jax.ShapeDtypeStruct((b, h, w), np.bool_),
                jax.ShapeDtypeStruct((b, 2), np.int32))


FORMATS: dict[str, Callable] = {}


def register_format(name: str, fn: Callable) -> None:
    """`fn(detector, path, shape)` writes `detector` to `path` for inputs of `shape` (a `Shape`)."""
    FORMATS[name] = fn


def export(detector, path: str | os.PathLike, format: str = "stablehlo", shape: Shape | None = None,
           dtype: str | None = None, quantize: str | None = None, calibration=None,
           calibration_about: dict | None = None, calibration_method: str = "minmax") -> str:
    """Write `detector` (a `detrax.Detector`) to `path` in a registered format, for inputs of `shape` (default:
    any batch and size), computing in `dtype` (default: the model's); returns the path. `quantize="int8"` (onnx):
    post-training quantization calibrated on `calibration` (images: paths, PIL images or uint8 arrays), whose
    source `calibration_about` describes in the file's metadata, by `calibration_method` (`serving.quantize`)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; formats: {', '.join(sorted(FORMATS))}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8, not {quantize!r}")
    if quantize and format != "onnx":
        raise ValueError(f"int8 quantization is for the onnx format, not {format}")
    if dtype not in (None, detector.config.dtype):
        detector = detector.with_config(dtype=dtype)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not quantize:
        FORMATS[format](detector, path, shape or Shape())
        return path
    from detrax.serving.quantize import calibration_batches, quantize_onnx

    batches = calibration_batches(detector, calibration or [])  # before the export: a clear error first
    with tempfile.TemporaryDirectory(prefix="detrax-float-") as work:
        FORMATS[format](detector, os.path.join(work, "float.onnx"), shape or Shape())
        quantize_onnx(os.path.join(work, "float.onnx"), path, batches, calibration_about, method=calibration_method)
    return path


def serving_function(detector):
    """(pixels, mask, orig_size) -> (scores, labels, boxes), with the detector's weights inside."""
    from flax import nnx

    from detrax.serving.infer import make_infer

    graphdef, state = nnx.split(detector.model)
    infer = make_infer(graphdef, per_image=False, masks=detector.config.masks)  # sizes may be symbolic: no choice
    return jax.jit(lambda pixels, mask, orig_size: infer(state, pixels, mask, orig_size))  # weights: constants


def _stablehlo(detector, path: str, shape: Shape) -> None:
    exported = jax.export.export(serving_function(detector))(*shape.inputs())
    with open(path, "wb") as f:
        f.write(exported.serialize())


def load_stablehlo(path: str | os.PathLike) -> Callable:
    """The function a `stablehlo` export holds: (pixels, mask, orig_size) -> (scores, labels, boxes)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - flatbuffers raise many kinds for bytes that are not an export
        raise ValueError(f"{os.fspath(path)}: not a detrax stablehlo export ({type(e).__name__})") from None
    return exported.call


def outputs(detector) -> list[str]:
    """The model outputs an ONNX export holds: pred_logits, pred_boxes, and pred_masks for a mask model."""
    return ["pred_logits", "pred_boxes", *(["pred_masks"] if detector.config.masks else [])]


def model_function(detector):
    """(pixels uint8, mask) -> the model's `outputs`, normalised inside, with the detector's weights."""
    from flax import nnx

    from detrax.serving.infer import normalized

    graphdef, state = nnx.split(detector.model)
    names = outputs(detector)

    def forward(pixels, mask):
        model = nnx.merge(graphdef, state)
        out = model(normalized(model, pixels, mask), mask)
        return tuple(out[k] for k in names)

    return forward


def _onnx(detector, path: str, shape: Shape) -> None:
    try:
        from jax2onnx import to_onnx

        from detrax.serving.onnx_graph import simplify
    except ImportError:
        raise ValueError("the onnx format needs jax2onnx: pip install 'detrax[onnx]'") from None
    pixels, mask, _ = shape.inputs()
    quiet = logging.getLogger("onnx_ir")  # its serializer warns about every shape constant
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="detrax-jax2onnx-") as work:
            traced = os.path.join(work, f"{os.path.basename(work)}.onnx")  # a name no working folder holds (onnx)
            to_onnx(model_function(detector), [pixels, mask], model_name="detr", input_names=["pixels", "mask"],
                    output_names=outputs(detector), return_mode="file", output_path=traced)
            simplify(traced, path)
    except NotImplementedError as e:  # jax2onnx names the primitive it has no rule for
        raise ValueError(f"this model cannot be exported to ONNX: {e}") from None
    finally:
        quiet.setLevel(level)


register_format("stablehlo", _stablehlo)
register_format("onnx", _onnx)
