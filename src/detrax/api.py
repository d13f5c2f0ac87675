"""The library facade: `detrax.load(...)` -> a `Detector` that runs, predicts and saves."""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import numpy as np
from flax import nnx
from PIL import Image

from detrax import configs
from detrax.coco_names import class_names
from detrax.infer import Preprocess, batches, detect, make_infer, run_model
from detrax.model import DETR


class Detector:
    """A DETR ready for inference. `detector(pixels, mask)` runs the jitted model (compiled once per input
    shape) and returns the model's output dict; `detector.predict(images)` returns detections through the one
    inference path (`infer`), with the val transform the model was trained with (`preprocess`; 800/1333 for
    weights that do not say)."""

    def __init__(self, model: DETR, names: dict | None = None, per_image: bool | None = None,
                 data: configs.DataConfig | None = None, runtime: str = "xla", runtime_options: dict | None = None):
        """`per_image`: see `infer.run_model` (image by image inside one compiled call: the CPU default for large
        images; results are the same either way, a test). `data`: the data config the model was trained with
        (a run's), whose val transform inference uses; None: the official 800/1333. `runtime`: what runs
        `infer` and `predict` (`detrax.runtimes`: xla, onnxruntime, openvino), with its `runtime_options`."""
        model.eval()
        self.model = model
        self.config = model.config
        self.names = names if names is not None else class_names(int(model.config.num_classes))
        self.per_image = per_image
        self.data = data
        self.preprocess = Preprocess.of(data or configs.DataConfig())
        graphdef, state = nnx.split(model)
        self._state = state
        self._forward = jax.jit(lambda state, pixels, mask: run_model(nnx.merge(graphdef, state), pixels, mask,
                                                                      per_image))
        self._infer = make_infer(graphdef, per_image)
        self.runtime, self.runtime_options = runtime, dict(runtime_options or {})
        self._run = None  # the runtime's infer, made at first use

    def with_runtime(self, runtime: str, **options) -> Detector:
        """This detector (the same model and weights) run by another runtime."""
        from detrax import runtimes

        runtimes.check(runtime)  # named now, not at the first image
        other = copy.copy(self)
        other.runtime, other.runtime_options, other._run = runtime, options, None
        return other

    def with_config(self, **overrides) -> Detector:
        """A detector of the same weights whose model config differs (e.g. `dtype="bfloat16"`)."""
        from detrax.model import assemble, weight_arrays

        model = assemble(dataclasses.replace(self.config, **overrides), weight_arrays(self.model))
        return Detector(model, self.names, self.per_image, self.data, self.runtime, self.runtime_options)

    def set_weights(self, arrays: dict) -> None:
        """New weights ({"backbone/conv1/kernel": array, ...}, all of them) of the same shapes: the compiled
        forward passes are kept, nothing recompiles."""
        from detrax.model import WEIGHTS, assemble

        nnx.update(self.model, nnx.state(assemble(self.config, arrays), WEIGHTS))
        self._state = nnx.state(self.model)
        self._run = None  # an exported model holds the old weights

    def __call__(self, pixels, mask=None) -> dict:
        pixels = np.asarray(pixels, np.float32)
        mask = np.ones(pixels.shape[:3], bool) if mask is None else np.asarray(mask, bool)
        return self._forward(self._state, pixels, mask)

    def infer(self, pixels, mask, orig_size):
        """uint8 pixels [B, H, W, 3], mask [B, H, W], orig_size [B, 2] -> (scores, labels, boxes) for every query
        (see `infer.make_infer`), by the detector's runtime."""
        if self._run is None:
            from detrax import runtimes

            self._run = runtimes.make(self.runtime, self, **self.runtime_options)
        return self._run(pixels, mask, orig_size)

    def _prep(self, size, max_size) -> Preprocess:
        """The model's own preprocessing, with the sizes given here (None: its own)."""
        given = {k: v for k, v in (("size", size), ("max_size", max_size)) if v is not None}
        return dataclasses.replace(self.preprocess, **given)

    def predict(self, images, threshold: float = 0.7, batch_size: int = 8, size: int | None = None,
                max_size: int | None = None) -> list[dict] | dict:
        """Paths, PIL images or HxWx3 uint8 arrays (one or a list) -> per image a dict of `boxes` [N, 4]
        absolute (x0, y0, x1, y1), `scores`, `labels` and `names`, best first. Images are resized as the
        official val transform (shorter side `size`, longer at most `max_size`; by default the model's own)."""
        single = not isinstance(images, (list, tuple))
        pil = [_image(im) for im in ([images] if single else images)]
        dets = detect(self.infer, pil, self._prep(size, max_size), threshold=threshold, batch_size=batch_size)
        for d in dets:
            d["names"] = [self.names.get(int(label), str(int(label))) for label in d["labels"]]
        return dets[0] if single else dets

    def attention(self, image, det: dict, size: int | None = None, max_size: int | None = None, points=None):
        """A PNG-ready panel of what the model looked at for each detection of `det` (from `predict` on this
        image), and of the encoder's self-attention at `points` [(x, y), ...] in image pixels."""
        from detrax.attention_maps import attention_panels

        image = _image(image)
        batch = next(batches([image], self._prep(size, max_size), 1))
        return attention_panels(self.model, image, batch, det, points)

    def save(self, path: str | os.PathLike) -> None:
        """Detrax weights with this detector's class names and val transform."""
        from detrax.weights import save_weights

        categories = [{"id": i, "name": n} for i, n in sorted(self.names.items())]
        p = self.preprocess
        data = {"val_size": p.size, "max_size": p.max_size, "bucket_step": p.step} if self.data else None
        save_weights(self.model, path, categories=categories, data=data)


def _image(im) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> an RGB PIL image."""
    from detrax.predict import read_image

    if isinstance(im, (str, os.PathLike)):
        return read_image(os.fspath(im))
    return im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))


def load(path: str | os.PathLike, runtime: str = "xla", **config_overrides) -> Detector:
    """A Detector from a training run's workdir (its latest checkpoint), detrax weights (`.safetensors` written by
    `detrax convert` or `Detector.save`, with the class names and val transform they carry), an official / HF /
    torchvision / BiT / MasterSkepticista/detr checkpoint (converted on the fly), or `random:PRESET` for random
    weights; run by `runtime` (`detrax.runtimes`)."""
    detector = _load(os.fspath(path), **config_overrides)
    return detector if runtime == "xla" else detector.with_runtime(runtime)


def _load(path: str, **config_overrides) -> Detector:
    if path.startswith("random:"):
        cfg = dataclasses.replace(configs.get(path.split(":", 1)[1]).model, **config_overrides)
        return Detector(DETR(cfg.with_classes(), rngs=nnx.Rngs(0)))
    from detrax.weights import is_run, load_model

    if is_run(path):
        from detrax import checkpoint

        model, meta = checkpoint.load_run(path, with_meta=True)
        names = ({int(c["id"]): c["name"] for c in meta["categories"]} if "categories" in meta else
                 {int(k): v for k, v in meta.get("names", {}).items()}) or None  # runs written before categories
        return Detector(model, names=names, data=configs.from_dict(meta["config"]).data)  # the run's val transform
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (a run's workdir, a weights file or random:PRESET)")
    model, meta = load_model(path, with_meta=True, **config_overrides)
    names = {int(c["id"]): c["name"] for c in meta.get("categories", [])} or None
    data = configs.DataConfig(**meta["data"]) if "data" in meta else None
    return Detector(model, names=names, data=data)
