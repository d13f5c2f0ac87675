"""The training step: forward, set loss, backward, clip, AdamW; one jitted function of (state, batch, step)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from detrax.data.transforms import normalize_batch
from detrax.models.denoising import noise_targets

BATCH_KEYS = ("pixels", "mask", "labels", "boxes", "valid")  # what the step reads of a loader batch
MASK_KEYS = ("masks",)  # and with segmentation targets


def trainable(freeze_detector: bool = False):
    """What the optimizer trains: every parameter, or with `freeze_detector` the mask head's alone (the official
    second stage, `--frozen_weights`)."""
    if not freeze_detector:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("mask_head"), nnx.PathContains("bbox_attention")))


def compiler_options() -> dict | None:
    """On the CPU, LLVM's level-1 optimisation for the training steps (this one and the backbone's warm-up,
    `crop_warmup`): their heavy work runs in library kernels (convolutions, matrix products) that it does not
    touch, and they compile faster (figures: benchmarks/history.md). A level given in XLA_FLAGS wins (the test
    suite compiles at level 0: most of its steps run a few times)."""
    if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_backend_optimization_level": 1}


def make_train_step(graphdef, loss_fn, learning_rates, wrt=nnx.Param, seed: int = 0):
    """(state, batch, i) -> (state, metrics): forward, set loss, backward, clip, AdamW at `learning_rates(i)`
    ([lr, lr_backbone] of loop step `i`, 0-based: `optim.learning_rates`), one jitted call whose inputs they are.
    A step whose loss or gradient is not finite changes nothing (the state passes through) and reports `skipped`
    = 1. `graphdef` and the state are `nnx.split((model, optimizer))`'s; `wrt` is the optimizer's (`trainable`):
    only those weights get gradients. A model with `dn_groups` gets the targets noised afresh each step
    (`denoising.noise_targets`, from `seed` and `i`). The jitted step is kept for equal arguments (the same
    `loss_fn` object, as `loop.setup` gives): a second run of the same model in one process compiles nothing."""
    options = compiler_options()
    step = _jitted_step(graphdef, loss_fn, wrt, seed, tuple(sorted(options.items())) if options else None)
    return lambda state, batch, i: step(state, batch, i, learning_rates(i))


@functools.lru_cache(maxsize=4)
def _jitted_step(graphdef, loss_fn, wrt, seed: int, options: tuple | None):
    @functools.partial(jax.jit, donate_argnums=0, compiler_options=dict(options) if options else None)
    def step(state, batch, i, lr):
        old = jax.tree.leaves(state)  # the arrays themselves: merge's variables are updated in place below
        model, opt = nnx.merge(graphdef, state)
        c = model.config
        pixels = normalize_batch(batch["pixels"], batch["mask"], c.pixel_mean, c.pixel_std)  # [B, H, W, 3] float32
        targets = {k: batch[k] for k in ("labels", "boxes", "valid", *MASK_KEYS) if k in batch}

        denoise = None
        if c.dn_groups > 0:
            denoise = noise_targets(jax.random.fold_in(jax.random.key(seed), i), jnp.asarray(targets["labels"]),
                                    jnp.asarray(targets["boxes"], jnp.float32), jnp.asarray(targets["valid"], bool),
                                    c.dn_groups, c.num_classes, c.dn_box_noise, c.dn_label_noise)

        def objective(model):
            terms = loss_fn(model(pixels, batch["mask"], denoise), targets)
            return terms["loss"], terms

        (loss, terms), grads = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        terms["grad_norm"] = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(terms["grad_norm"])
        opt.update(model, grads, lr=lr)
        leaves, treedef = jax.tree.flatten(nnx.state((model, opt)))
        terms["skipped"] = (~ok).astype(jnp.int32)
        return jax.tree.unflatten(treedef, [jnp.where(ok, n, o) for n, o in zip(leaves, old, strict=True)]), terms

    return step
