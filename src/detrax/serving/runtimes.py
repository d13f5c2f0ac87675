"""Runtimes: what runs a detector's forward pass for `Detector.predict` / `detrax predict --runtime NAME`.

A runtime is a function (detector, **options) -> infer, where `infer(pixels uint8 [B, H, W, 3], mask [B, H, W],
orig_size [B, 2])` returns (scores, labels, boxes) as `infer.make_infer` does; `register_runtime(name, fn)` adds
one. Built in:
- `xla`: the detector's own jitted inference path (JAX on whatever device it has).
- `onnxruntime`, `openvino` (the `onnx` extra): the detector exported to ONNX once (`export`, format `onnx`, dynamic
  batch and size; weights inside), run by that runtime on the CPU; the model's outputs are post-processed by the
  same `postprocess` as `xla`'s (a mask model's masks too, for `Detector.segment`). Options: `onnx`, a file `detrax
  export --format onnx` wrote of this detector (default: export now, into a temporary folder); for openvino,
  `precision` (`f32`, or `bf16` on CPUs with bfloat16 instructions); for both, `threads` (0: one per
  core). An export made here lives in a temporary folder while the runtime reads it, and is removed after.
The weights are baked into an exported model: after `Detector.set_weights` the next call exports again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

import jax
import numpy as np

from detrax.serving.export import outputs
from detrax.serving.postprocess import postprocess

RUNTIMES: dict[str, Callable] = {}


def register_runtime(name: str, fn: Callable) -> None:
    """`fn(detector, **options)` -> infer(pixels, mask, orig_size) -> (scores, labels, boxes)."""
    RUNTIMES[name] = fn


def check(name: str) -> str:
    """`name` if it is a registered runtime, else a ValueError listing them."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; runtimes: {', '.join(sorted(RUNTIMES))}")
    return name


def make(name: str, detector, **options) -> Callable:
    return RUNTIMES[check(name)](detector, **options)


def _xla(detector, **options):
    if options:
        raise ValueError(f"the xla runtime takes no options, got {sorted(options)}")
    return detector.infer_xla


@contextlib.contextmanager
def onnx_file(detector, onnx: str | None = None):
    """`onnx` if given (an export of this detector), else the detector exported now (dynamic batch and size) into a
    temporary folder that is removed when the block ends (DETR-R50's file is 160 MiB): read it inside."""
    from detrax.serving.export import export

    if onnx is not None:
        if not os.path.isfile(onnx):
            raise FileNotFoundError(f"{onnx}: no such ONNX file")
        yield onnx
        return
    with tempfile.TemporaryDirectory(prefix="detrax-onnx-") as work:
        yield export(detector, os.path.join(work, "detr.onnx"), "onnx")


def _with_postprocess(forward: Callable, class_ids) -> Callable:
    """forward(pixels, mask) -> (logits, boxes[, masks]) as NumPy; detections as the xla runtime's, and for a mask
    model its logits and masks after them (as `infer.make_infer(masks=True)`)."""
    post = jax.jit(lambda logits, boxes, sizes: postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes,
                                                            class_ids))

    def infer(pixels, mask, orig_size):
        logits, boxes, *masks = forward(np.asarray(pixels, np.uint8), np.asarray(mask, bool))
        return (*post(logits, boxes, np.asarray(orig_size, np.int32)), *((logits, masks[0]) if masks else ()))

    return infer


def _need(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this runtime needs {module}: {install}") from None


def _onnxruntime(detector, onnx: str | None = None, threads: int = 0):
    ort = _need("onnxruntime", "pip install 'detrax[onnx]'")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the initializers it folds away
    options.intra_op_num_threads = threads  # 0: one per core
    with onnx_file(detector, onnx) as path:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = outputs(detector)
    forward = lambda pixels, mask: session.run(names, {"pixels": pixels, "mask": mask})
    return _with_postprocess(forward, detector.config.class_ids)


def _openvino(detector, onnx: str | None = None, precision: str = "f32", threads: int = 0):
    ov = _need("openvino", "pip install 'detrax[onnx]'")
    if precision not in ("f32", "bf16"):
        raise ValueError(f"openvino precision must be f32 or bf16, not {precision!r}")
    settings = {"INFERENCE_PRECISION_HINT": precision, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    with onnx_file(detector, onnx) as path:
        compiled = ov.Core().compile_model(path, "CPU", settings)
    request = compiled.create_infer_request()

    names = outputs(detector)

    def forward(pixels, mask):
        out = request.infer({"pixels": pixels, "mask": mask})
        return [out[compiled.output(name)] for name in names]

    return _with_postprocess(forward, detector.config.class_ids)


register_runtime("xla", _xla)
register_runtime("onnxruntime", _onnxruntime)
register_runtime("openvino", _openvino)
