"""The official optimizer: AdamW, the backbone at its own learning rate, a step decay, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from detrax.config import schema


def _group(params):
    """'backbone' for the backbone's parameters, 'rest' for the others."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "backbone" if getattr(path[0], "key", None) == "backbone" else "rest", params)


def lr_factor(total_steps: int, drop_step: int):
    """The learning-rate multiplier at a loop step (0-based): 1, then 0.1 from `drop_step` on."""
    return optax.piecewise_constant_schedule(1.0, {drop_step: 0.1}) if drop_step < total_steps else lambda i: 1.0


def optimizer(cfg: schema.TrainConfig, total_steps: int, drop_step: int) -> optax.GradientTransformationExtraArgs:
    """AdamW with the backbone at its own learning rate, both x0.1 at `drop_step`, after clipping the global
    gradient norm, as the official main.py. The learning rate is a function of the loop's step, passed to every
    update (`tx.update(grads, state, params, step=i)`), not of a count of applied updates: a skipped step (see
    `make_train_step`) leaves the weights and Adam's moments and count as they were, as PyTorch does when it skips
    an optimizer step, while the schedule moves on with the loop, as the official per-epoch StepLR does."""
    factor = lr_factor(total_steps, drop_step)

    def adamw(lr):
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay),
                           _scale_by_loop_step(lambda i: -lr * factor(i)))

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_max_norm) if cfg.clip_max_norm > 0 else optax.identity(),
        optax.multi_transform({"rest": adamw(cfg.lr), "backbone": adamw(cfg.lr_backbone)}, _group))


def _scale_by_loop_step(schedule) -> optax.GradientTransformationExtraArgs:
    """Updates times `schedule(step)`, `step` given to each update: optax's scale_by_schedule without a count."""

    def update(updates, state, params=None, *, step, **extra):
        del params, extra
        return jax.tree.map(lambda u: jnp.asarray(schedule(step), u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
