"""The backbone's warm-up, training only: before a from-scratch detector's first step, its backbone learns to
classify the training set's own objects, cut out at the detector's scale (`data/crops.py`), through a linear
head on its mean feature that is then dropped. The detector is the same model with other starting weights.

Why it pays for a DETR from scratch: the set losses reach the backbone through the few matched queries and the
encoder, a weak signal for which class an object is; a classifier gets one per object, 64 objects a step, on
windows a tenth the pixels of an image (what it buys on a folder whose classes only their shape tells,
`benchmarks/foreign_set.py`: benchmarks/history.md). The frozen batch norm keeps
its statistics (calibrated on whole images first) and frozen stages stay frozen: only `nnx.Param`s train.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from detrax.config.schema import Config
from detrax.data.crops import object_crops
from detrax.data.transforms import normalize_batch
from detrax.training import step as train_step

BATCH = 64  # windows a step


class Classifier(nnx.Module):
    """A backbone (shared, not copied: training this trains the detector's) and a linear head on its mean
    feature."""

    def __init__(self, backbone, num_classes: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(backbone.out_channels, num_classes, rngs=rngs)

    def __call__(self, pixels):  # [B, S, S, 3] normalised -> logits [B, K]
        features = self.backbone(pixels, jnp.ones(pixels.shape[:3], bool))  # [B, s, s, C]
        return self.head(features.astype(jnp.float32).mean((1, 2)))


def warm_up(model, records, cfg: Config, log: Callable[[str], None] = lambda line: None) -> dict:
    """Train `model`'s backbone in place for `cfg.train.crop_steps` steps of `BATCH` windows of the objects of
    `records` (AdamW at `train.crop_lr`, the run's weight decay, random horizontal flips, seeded by
    `train.seed`: every host of a multi-host run computes the same). Returns what it did, for the run's record:
    steps, windows, the accuracy over the last 10% of the steps' batches, seconds."""
    tc, t0 = cfg.train, time.time()
    windows, labels = object_crops(records, cfg.data, seed=tc.seed)  # [N, S, S, 3], [N]
    if not len(windows):
        log("backbone warm-up skipped: the training data has no objects")
        return {"steps": 0, "windows": 0}
    net = Classifier(model.backbone, int(cfg.model.num_classes), rngs=nnx.Rngs(tc.seed))  # resolved: a number
    opt = nnx.Optimizer(net, optax.adamw(tc.crop_lr, weight_decay=tc.weight_decay), wrt=nnx.Param)
    mean, std, dtype = cfg.model.pixel_mean, cfg.model.pixel_std, model.dtype
    graphdef, state = nnx.split((net, opt))

    @functools.partial(jax.jit, compiler_options=train_step.compiler_options())  # the train step's CPU level
    def step(state, pixels, labels):  # pixels uint8 [B, S, S, 3], labels [B]
        net, opt = nnx.merge(graphdef, state)
        x = normalize_batch(pixels, jnp.ones(pixels.shape[:3], bool), mean, std).astype(dtype)

        def loss_fn(net):
            logits = net(x)  # [B, K]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
        opt.update(net, grads)
        return nnx.state((net, opt)), loss, (logits.argmax(-1) == labels).sum()

    log(f"backbone warm-up: {tc.crop_steps} steps classifying {len(windows)} windows of the training objects")
    rng = np.random.default_rng(tc.seed)
    tail, hits, loss = max(tc.crop_steps // 10, 1), 0, jnp.nan
    for i in range(tc.crop_steps):
        pick = rng.integers(0, len(windows), BATCH)
        flip = rng.random(BATCH) < 0.5
        batch = np.where(flip[:, None, None, None], windows[pick, :, ::-1], windows[pick])  # [B, S, S, 3]
        state, loss, correct = step(state, jnp.asarray(batch), jnp.asarray(labels[pick]))
        if i >= tc.crop_steps - tail:
            hits += int(correct)
        if (i + 1) % 500 == 0 and i + 1 < tc.crop_steps:
            log(f"  step {i + 1}/{tc.crop_steps}: loss {float(jax.device_get(loss)):.3f} ({time.time() - t0:.0f} s)")
    nnx.update((net, opt), state)  # the backbone's new weights into the detector
    accuracy = hits / (tail * BATCH)
    seconds = time.time() - t0
    log(f"backbone warm-up done: accuracy {accuracy:.2f} on the last {tail} steps' windows (loss "
        f"{float(jax.device_get(loss)):.3f}), {seconds:.0f} s")
    return {"steps": tc.crop_steps, "windows": len(windows), "accuracy": round(accuracy, 4),
            "seconds": round(seconds, 1)}
