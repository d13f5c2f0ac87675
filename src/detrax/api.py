"""The library facade: `detrax.load(...)` -> a `Detector` that runs, predicts and saves."""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from detrax.config import presets, schema
from detrax.data.coco_names import class_names
from detrax.models.detr import DETR
from detrax.serving.images import to_rgb
from detrax.serving.infer import BATCH_SIZE, Preprocess, batches, detect, make_infer, run, run_model
from detrax.serving.postprocess import THRESHOLD, select


class Detector:
    """A DETR ready for inference. `detector(pixels, mask)` runs the jitted model (compiled once per input
    shape) and returns the model's output dict; `detector.predict(images)` returns detections through the one
    inference path (`infer`), with the val transform the model was trained with (`preprocess`; `DataConfig`'s
    for weights that do not say)."""

    def __init__(self, model: DETR, names: dict | None = None, per_image: bool | None = None,
                 data: schema.DataConfig | None = None, runtime: str = "xla", runtime_options: dict | None = None,
                 things: dict | None = None):
        """`per_image`: see `infer.run_model` (image by image inside one compiled call: the CPU default for large
        images; results are the same either way, a test). `data`: the data config the model was trained with
        (a run's), whose val transform inference uses; None: `DataConfig`'s (the official). `runtime`: what runs
        `infer` and `predict` (`detrax.serving.runtimes`: xla, onnxruntime, openvino), with its `runtime_options`.
        `things`: {category id: thing (True) or stuff}, for panoptic segmentation (missing: thing)."""
        model.eval()
        self.model = model
        self.config = model.config
        self.names = names if names is not None else class_names(int(model.config.num_classes))
        self.per_image = per_image
        self.data = data
        self.preprocess = Preprocess.of(data or schema.DataConfig())
        graphdef, state = nnx.split(model)
        self._state = state
        self._forward = jax.jit(lambda state, pixels, mask: run_model(nnx.merge(graphdef, state), pixels, mask,
                                                                      per_image))
        self._infer = make_infer(graphdef, per_image)
        self._infer_masks = make_infer(graphdef, per_image, masks=True) if model.config.masks else None
        self.things = dict(things or {})
        self.runtime, self.runtime_options = runtime, dict(runtime_options or {})
        self._run = None  # the runtime's infer, made at first use

    def with_runtime(self, runtime: str, **options) -> Detector:
        """This detector (the same model and weights) run by another runtime."""
        from detrax.serving import runtimes

        runtimes.check(runtime)  # named now, not at the first image
        other = copy.copy(self)
        other.runtime, other.runtime_options, other._run = runtime, options, None
        return other

    def with_config(self, **overrides) -> Detector:
        """A detector of the same weights whose model config differs (e.g. `dtype="bfloat16"`)."""
        from detrax.models.detr import assemble, weight_arrays

        model = assemble(dataclasses.replace(self.config, **overrides), weight_arrays(self.model))
        return Detector(model, self.names, self.per_image, self.data, self.runtime, self.runtime_options,
                        self.things)

    def set_weights(self, arrays: dict) -> None:
        """New weights ({"backbone/conv1/kernel": array, ...}, all of them) of the same shapes: the compiled
        forward passes are kept, nothing recompiles."""
        from detrax.models.detr import WEIGHTS, assemble

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
            from detrax.serving import runtimes

            self._run = runtimes.make(self.runtime, self, **self.runtime_options)
        return self._run(pixels, mask, orig_size)

    def infer_xla(self, pixels, mask, orig_size):
        """As `infer`, by XLA: the `xla` runtime, the detector's own jitted inference function."""
        return self._infer(self._state, pixels, mask, orig_size)

    def infer_masks(self, pixels, mask, orig_size):
        """As `infer`, with the mask head's pred_logits and pred_masks after the detections (a model with a mask
        head), by the detector's runtime."""
        if self._infer_masks is None:
            raise ValueError("this model has no mask head (model.masks): it detects boxes only")
        if self.runtime != "xla":
            return self.infer(pixels, mask, orig_size)  # an exported mask model gives its masks too
        return self._infer_masks(self._state, pixels, mask, orig_size)

    def segment(self, images, task: str = "panoptic", threshold: float | None = None, batch_size: int = BATCH_SIZE,
                size: int | None = None, max_size: int | None = None) -> list[dict] | dict:
        """Per image (paths, PIL images or arrays, one or a list), with a mask head: for `task` panoptic, `ids`
        [H, W] uint32 (segment ids from 1, 0 where none) and `segments` [{id, category_id, name, isthing, area,
        score}] (`panoptic.panoptic_segments`, threshold `panoptic.THRESHOLD` by default); for `segm`, the
        detections of `predict` (threshold `postprocess.THRESHOLD`) with their `masks` [N, H, W] bool
        (`panoptic.instance_masks`)."""
        from detrax.serving import panoptic

        if task not in ("panoptic", "segm"):
            raise ValueError(f"task must be panoptic or segm, not {task!r}")

        def one(out, i, batch):
            scores, labels, boxes, logits, masks = out
            hw, orig = tuple(batch["size"][i]), tuple(batch["orig_size"][i])
            if task == "panoptic":
                ids, segments = panoptic.panoptic_segments(logits[i], masks[i], hw, orig, self.things,
                                                           self.config.class_ids,
                                                           panoptic.THRESHOLD if threshold is None else threshold)
                return {"ids": ids, "segments": [seg | {"name": self._name(seg["category_id"])} for seg in segments]}
            det = select(scores[i:i + 1], labels[i:i + 1], boxes[i:i + 1],
                         THRESHOLD if threshold is None else threshold)[0]
            det["masks"] = panoptic.instance_masks(masks[i][det["queries"]], hw, orig)
            return det | {"names": [self._name(label) for label in det["labels"]]}

        single = not isinstance(images, (list, tuple))
        pil = [to_rgb(im) for im in ([images] if single else images)]
        results = run(self.infer_masks, pil, self._prep(size, max_size), batch_size, one)
        return results[0] if single else results

    def _name(self, label) -> str:
        return self.names.get(int(label), str(int(label)))

    def _prep(self, size, max_size) -> Preprocess:
        """The model's own preprocessing, with the sizes given here (None: its own)."""
        given = {k: v for k, v in (("size", size), ("max_size", max_size)) if v is not None}
        return dataclasses.replace(self.preprocess, **given)

    def predict(self, images, threshold: float = THRESHOLD, batch_size: int = BATCH_SIZE, size: int | None = None,
                max_size: int | None = None) -> list[dict] | dict:
        """Paths, PIL images or HxWx3 uint8 arrays (one or a list) -> per image a dict of `boxes` [N, 4]
        absolute (x0, y0, x1, y1), `scores`, `labels` and `names`, best first. Images are resized as the
        official val transform (shorter side `size`, longer at most `max_size`; by default the model's own)."""
        single = not isinstance(images, (list, tuple))
        pil = [to_rgb(im) for im in ([images] if single else images)]
        dets = detect(self.infer, pil, self._prep(size, max_size), threshold=threshold, batch_size=batch_size)
        dets = [d | {"names": [self._name(label) for label in d["labels"]]} for d in dets]
        return dets[0] if single else dets

    def attention(self, image, det: dict, size: int | None = None, max_size: int | None = None, points=None):
        """A PNG-ready panel of what the model looked at for each detection of `det` (from `predict` on this
        image), and of the encoder's self-attention at `points` [(x, y), ...] in image pixels."""
        from detrax.serving.attention_maps import attention_panels

        image = to_rgb(image)
        batch = next(batches([image], self._prep(size, max_size), 1))
        return attention_panels(self.model, image, batch, det, points)

    def save(self, path: str | os.PathLike) -> None:
        """Detrax weights of the plain DETR this detector runs (no training-only aids' weights: the official
        layout), with its class names and val transform."""
        from detrax.models.detr import plain
        from detrax.weights.files import save_weights

        categories = [{"id": i, "name": n} | ({"isthing": int(self.things[i])} if i in self.things else {})
                      for i, n in sorted(self.names.items())]
        p = self.preprocess
        data = {"val_size": p.size, "max_size": p.max_size, "bucket_step": p.step} if self.data else None
        save_weights(plain(self.model), path, categories=categories, data=data)


def load(path: str | os.PathLike, runtime: str = "xla", weights: str = "auto", **config_overrides) -> Detector:
    """A Detector from a training run's workdir (`weights`: its `best` evaluated weights, its `last` checkpoint's,
    their moving average where the run keeps one, or `raw`, the last trained weights themselves; `auto`: the best
    where the run kept them, else the last), detrax weights (`.safetensors` written by
    `detrax convert` or `Detector.save`, with the class names and val transform they carry), an official / HF /
    torchvision / BiT / MasterSkepticista/detr checkpoint (converted on the fly), or `random:PRESET` for random
    weights; run by `runtime` (`detrax.serving.runtimes`). Turns on JAX's persistent compilation cache
    (`detrax.serving.compilation_cache`: the next process compiles nothing it compiled; DETRAX_COMPILATION_CACHE=off
    turns it off)."""
    from detrax.serving import compilation_cache

    compilation_cache.enable()
    detector = _load(os.fspath(path), weights, **config_overrides)
    return detector if runtime == "xla" else detector.with_runtime(runtime)


def _load(path: str, weights: str = "auto", **config_overrides) -> Detector:
    if path.startswith("random:") and weights == "auto":
        cfg = dataclasses.replace(presets.get(path.split(":", 1)[1]).model, **config_overrides)
        return Detector(DETR(cfg.with_classes(), rngs=nnx.Rngs(0)))
    from detrax.weights.opener import open_weights

    opened = open_weights(path, weights=weights, **config_overrides)
    names = {int(c["id"]): c["name"] for c in opened.categories} or None
    return Detector(opened.model, names=names, data=opened.data, things=_things(opened.categories))


def _things(categories: list) -> dict:
    """{id: thing or stuff} of the categories that say (panoptic data's `isthing`)."""
    return {int(c["id"]): bool(c["isthing"]) for c in categories if "isthing" in c}
