"""The one inference path: uint8 images -> detections. Evaluation during training, `detrax eval`,
`detrax predict`, `Detector.predict` and the attention maps all take it.

Every image is resized by the run's val transform (`Preprocess`: shorter side `size`, longer at most `max_size`)
and padded to its own shape bucket (height and width rounded up to a multiple of `step`), never to the largest
image of its batch: its detections do not depend on the other images. Images of one bucket share batches, a
short batch is filled with blanks (static shapes: each bucket compiles once). Pixels travel as uint8 and are
normalised on the device, as in the training step; post-processing runs on the device too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from detrax.data import transforms as T
from detrax.data.batching import Collate, group_by_shape
from detrax.serving.postprocess import THRESHOLD, postprocess, select

BATCH_SIZE = 8  # images per inference batch, by default


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The val transform and its padding, as a run was trained with (`of(cfg.data)`)."""

    size: int
    max_size: int | None
    step: int

    @classmethod
    def of(cls, data_cfg) -> Preprocess:
        return cls(data_cfg.val_size, data_cfg.max_size, data_cfg.bucket_step)

    def example(self, image, index: int):
        """An RGB PIL image -> (uint8 pixels [h, w, 3], target) as the loader's val examples."""
        target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "image_id": index,
                  "orig_size": (image.height, image.width)}
        return T.val_transform(image, target, self.size, self.max_size)


def run_model(model, pixels, mask, per_image: bool | None = None):
    """The model's outputs for normalised `pixels` [B, H, W, 3]. `per_image`: run the batch image by image inside
    the compiled call (`lax.map`), which keeps the working set of one image; default (None): on the CPU for images
    of at least 320x320, where a batched forward is hardly cheaper per image (benchmarks/history.md); never on
    accelerators, where a batch fills the chip. Results are the same either way (a test)."""
    b, h, w = pixels.shape[:3]  # static: decided once per compiled shape
    one_by_one = (jax.default_backend() == "cpu" and h * w >= 320 * 320) if per_image is None else per_image
    if one_by_one and b > 1:
        one = lambda xm: jax.tree.map(lambda t: t[0], model(xm[0][None], xm[1][None]))
        return jax.lax.map(one, (pixels, mask))  # outputs stacked: the batched dict
    return model(pixels, mask)


def normalized(model, pixels, mask):
    """uint8 pixels -> the model's input, normalised as its config says (on the device, inside a jitted call)."""
    return T.normalize_batch(pixels, mask, model.config.pixel_mean, model.config.pixel_std)


@functools.lru_cache(maxsize=8)
def make_infer(graphdef, per_image: bool | None = None, masks: bool = False):
    """A jitted (model state, pixels uint8 [B, H, W, 3], mask [B, H, W], orig_size [B, 2]) -> (scores [B, Q],
    labels [B, Q] (category ids), boxes [B, Q, 4] absolute (x0, y0, x1, y1) in the original image); with `masks`
    (a model with a mask head) also its pred_logits [B, Q, C + 1] and pred_masks [B, Q, H / 4, W / 4], for the
    host's segmentation post-processing (`panoptic`). `graphdef` is a model's in eval mode; the state may be a
    training run's live, sharded one. Kept for equal arguments: another model of the same structure (another
    run's, a reloaded one) traces and compiles nothing again."""

    @jax.jit
    def infer(state, pixels, mask, orig_size):
        model = nnx.merge(graphdef, state)
        outputs = run_model(model, normalized(model, pixels, mask), mask, per_image)
        detections = postprocess(outputs, orig_size, model.config.class_ids)
        return (*detections, outputs["pred_logits"], outputs["pred_masks"]) if masks else detections

    return infer


def batches(images, prep: Preprocess, batch_size: int):
    """Batches (as the loader's: pixels, mask, orig_size, image_id = the image's index, real) of PIL images."""
    examples = [prep.example(im, i) for i, im in enumerate(images)]
    collate = Collate(0, prep.step, batch_size)
    for group in group_by_shape([x.shape[:2] for x, _ in examples], prep.step, batch_size):
        yield collate([examples[i] for i in group])


def run(infer, images, prep: Preprocess, batch_size: int, per_image: Callable[[list, int, dict], Any]) -> list:
    """The one inference loop over PIL images: `infer(pixels, mask, orig_size)` on each batch, then
    `per_image(outputs, i, batch)` (outputs as NumPy arrays; i the image's row in its batch) for every real image.
    Returns what `per_image` gave, in the images' order."""
    results: list = [None] * len(images)
    for batch in batches(images, prep, batch_size):
        outputs = [np.asarray(x) for x in infer(batch["pixels"], batch["mask"], batch["orig_size"])]
        for i in np.flatnonzero(batch["real"]):
            results[int(batch["image_id"][i])] = per_image(outputs, int(i), batch)
    return results


def detect(infer, images, prep: Preprocess, *, threshold: float = THRESHOLD, batch_size: int = BATCH_SIZE) -> list:
    """`infer(pixels, mask, orig_size)` -> (scores, labels, boxes). Per PIL image, a dict of `boxes` [N, 4]
    absolute (x0, y0, x1, y1), `scores` [N], `labels` [N] and `queries` [N], best first."""
    return run(infer, images, prep, batch_size,
               lambda out, i, _: select(out[0][i:i + 1], out[1][i:i + 1], out[2][i:i + 1], threshold)[0])
