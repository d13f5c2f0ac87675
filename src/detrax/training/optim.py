"""The official optimizer: AdamW, the backbone at its own learning rate, a step decay, global-norm clipping."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detrax.config import schema


def _group(params):
    """'backbone' for the backbone's parameters, 'rest' for the others."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "backbone" if getattr(path[0], "key", None) == "backbone" else "rest", params)


def lr_factor(total_steps: int, drop_step: int):
    """The learning-rate multiplier at a loop step (0-based): 1, then 0.1 from `drop_step` on (on the host)."""
    return lambda i: np.float32(0.1 if drop_step < total_steps and int(i) >= drop_step else 1.0)


def learning_rates(cfg: schema.TrainConfig, total_steps: int, drop_step: int):
    """Loop step (0-based) -> [lr, lr_backbone] at that step, float32, on the host: an input of the training step,
    not a constant compiled into it, so one compilation serves any learning rate, length and drop."""
    factor = lr_factor(total_steps, drop_step)
    return lambda i: np.asarray([cfg.lr, cfg.lr_backbone], np.float32) * factor(i)


def optimizer(cfg: schema.TrainConfig) -> optax.GradientTransformationExtraArgs:
    """AdamW with the backbone at its own learning rate, after clipping the global gradient norm, as the official
    main.py. The learning rates are given to every update (`tx.update(grads, state, params, lr=[lr,
    lr_backbone])`, from `learning_rates`), a function of the loop's step, not of a count of applied updates: a
    skipped step (see `make_train_step`) leaves the weights and Adam's moments and count as they were, as PyTorch
    does when it skips an optimizer step, while the schedule moves on with the loop, as the official per-epoch
    StepLR does. The same object for equal settings: the optimizer is part of the train step's static structure,
    so runs of one model in one process share their compiled step."""
    return _optimizer(cfg.weight_decay, cfg.clip_max_norm, cfg.ema_decay, cfg.ema_tau)


@functools.lru_cache(maxsize=8)
def _optimizer(weight_decay: float, clip_max_norm: float, ema_decay: float = 0.0,
               ema_tau: int = 0) -> optax.GradientTransformationExtraArgs:
    def adamw(which: int):
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay), _scale_by_lr(which))

    parts = [optax.clip_by_global_norm(clip_max_norm) if clip_max_norm > 0 else optax.identity(),
             optax.multi_transform({"rest": adamw(0), "backbone": adamw(1)}, _group)]
    return optax.chain(*parts, *([weight_ema(ema_decay, ema_tau)] if ema_decay else []))


class WeightEmaState(NamedTuple):
    updates: jax.Array  # how many were applied
    ema: Any  # the average, a tree like the trained weights


def weight_ema(decay: float, tau: int) -> optax.GradientTransformationExtraArgs:
    """The last link of the chain: leaves the updates as they are and keeps an exponential moving average of the
    weights they make (params + updates), at decay `decay * (1 - exp(-updates / tau))` (RF-DETR's ModelEma: the
    early average follows the weights closely; tau 0: `decay` throughout). Part of the optimizer state, so a
    checkpoint holds it, a resume continues it exactly, and a skipped step leaves it as it was.
    `weights.checkpoint.ema_of` finds it in a saved optimizer state."""

    def init(params):
        return WeightEmaState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates, state, params=None, **extra):
        del extra
        count = state.updates + 1
        d = decay * (1 - jnp.exp(-count.astype(jnp.float32) / tau)) if tau else jnp.float32(decay)
        ema = jax.tree.map(lambda e, p, u: (d * e + (1 - d) * (p + u)).astype(e.dtype), state.ema, params, updates)
        return updates, WeightEmaState(count, ema)

    return optax.GradientTransformationExtraArgs(init, update)


def _scale_by_lr(which: int) -> optax.GradientTransformationExtraArgs:
    """Updates times -lr[which], `lr` given to each update."""

    def update(updates, state, params=None, *, lr, **extra):
        del params, extra
        return jax.tree.map(lambda u: (-lr[which]).astype(u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
