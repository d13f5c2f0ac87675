"""The library facade: `detrax.load(...)` -> a `Detector` that runs, predicts and saves."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from PIL import Image

from detrax import configs
from detrax.coco_names import class_names
from detrax.model import DETR


class Detector:
    """A DETR ready for inference. `detector(pixels, mask)` runs the jitted model (compiled once per input
    shape) and returns the model's output dict; `detector.predict(images)` returns detections."""

    def __init__(self, model: DETR, names: dict | None = None, per_image: bool | None = None):
        """`per_image`: run a batch image by image inside one compiled call (`lax.map`), which keeps the working
        set of one image. Default (None): on the CPU for images of at least 320x320, where a batched forward is
        hardly cheaper per image than single calls (DETR-R50 at 800x1216 on 2 cores: 1.29 s per image in a batch
        of 4, 1.31 s alone, 1.17 s per image with `per_image`); never on accelerators, where a batch fills the chip.
        Results are the same either way (a test)."""
        model.eval()
        self.model = model
        self.config = model.config
        self.names = names if names is not None else class_names(model.config.num_classes)
        self.per_image = per_image
        graphdef, state = nnx.split(model)
        cpu = jax.default_backend() == "cpu"

        @jax.jit
        def forward(state, pixels, mask):
            model = nnx.merge(graphdef, state)
            b, h, w = pixels.shape[:3]  # static: decided once per compiled shape
            one_by_one = cpu and h * w >= 320 * 320 if per_image is None else per_image
            if one_by_one and b > 1:
                one = lambda xm: jax.tree.map(lambda t: t[0], model(xm[0][None], xm[1][None]))
                return jax.lax.map(one, (pixels, mask))  # outputs stacked: the batched dict
            return model(pixels, mask)

        self._state, self._forward = state, forward

    def set_weights(self, arrays: dict) -> None:
        """New weights ({"backbone/conv1/kernel": array, ...}, all of them) of the same shapes: the compiled
        forward passes are kept, nothing recompiles."""
        from detrax.model import WEIGHTS, assemble

        nnx.update(self.model, nnx.state(assemble(self.config, arrays), WEIGHTS))
        self._state = nnx.state(self.model)

    def __call__(self, pixels, mask=None) -> dict:
        pixels = np.asarray(pixels, np.float32)
        mask = np.ones(pixels.shape[:3], bool) if mask is None else np.asarray(mask, bool)
        return self._forward(self._state, pixels, mask)

    def predict(self, images, threshold: float = 0.7, batch_size: int = 8, size: int = 800,
                max_size: int = 1333) -> list[dict] | dict:
        """Paths, PIL images or HxWx3 uint8 arrays (one or a list) -> per image a dict of `boxes` [N, 4]
        absolute (x0, y0, x1, y1), `scores`, `labels` and `names`, best first. Images are resized as the
        official val transform (shorter side `size`, longer at most `max_size`)."""
        from detrax.predict import detect, read_image

        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        pil = [read_image(os.fspath(im)) if isinstance(im, (str, os.PathLike)) else
               im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
               for im in images]
        dets = detect(self, pil, threshold=threshold, batch_size=batch_size, size=size, max_size=max_size)
        for d in dets:
            d["names"] = [self.names.get(int(label), str(int(label))) for label in d["labels"]]
        return dets[0] if single else dets

    def attention(self, image, det: dict, size: int = 800, max_size: int = 1333, points=None):
        """A PNG-ready panel of what the model looked at for each detection of `det` (from `predict` on this
        image), and of the encoder's self-attention at `points` [(x, y), ...] in image pixels."""
        from detrax.attention_maps import attention_panels
        from detrax.data.transforms import normalize, resize
        from detrax.predict import read_image

        image = read_image(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else image
        return attention_panels(self.model, image, normalize(resize(image, size, max_size)), det, points)

    def save(self, path: str | os.PathLike) -> None:
        from detrax.weights import save_weights

        save_weights(self.model, path)


def load(path: str | os.PathLike, **config_overrides) -> Detector:
    """A Detector from a training run's workdir (its latest checkpoint), detrax weights (`.safetensors` written by
    `detrax convert` or `Detector.save`), an official / HF / torchvision / BiT checkpoint (converted on the fly), or
    `random:PRESET` for random weights."""
    path = os.fspath(path)
    if path.startswith("random:"):
        cfg = configs.get(path.split(":", 1)[1]).model
        import dataclasses

        return Detector(DETR(dataclasses.replace(cfg, **config_overrides), rngs=nnx.Rngs(0)))
    if os.path.isdir(path):
        from detrax import checkpoint

        model, meta = checkpoint.load_run(path, with_meta=True)
        names = {int(k): v for k, v in meta.get("names", {}).items()} or None
        return Detector(model, names=names)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (a run's workdir, a weights file or random:PRESET)")
    from detrax import weights

    if weights.is_detrax(path):  # told by its content, whatever its name
        return Detector(weights.load_weights(path, **config_overrides))
    from detrax.convert import convert, read_state_dict

    model, _ = convert(read_state_dict(path), **config_overrides)
    return Detector(model)
