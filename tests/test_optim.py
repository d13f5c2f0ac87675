"""The official optimizer: a skipped step leaves no trace, and the learning rate follows the loop's step."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import ONE_LAYER
from flax import nnx

from detrax.config import presets
from detrax.config.overrides import override
from detrax.criterion.loss import set_loss
from detrax.models.detr import DETR
from detrax.training.optim import learning_rates, lr_factor, optimizer
from detrax.training.step import make_train_step


def test_lr_factor_drops_tenfold_at_the_drop_step():
    f = lr_factor(10, 3)
    assert [float(f(i)) for i in range(5)] == [1.0, 1.0, 1.0, np.float32(0.1), np.float32(0.1)]
    assert lr_factor(10, 10)(9) == 1.0  # a drop at or after the end never happens


def test_a_skipped_step_leaves_no_trace_and_the_learning_rate_follows_the_loop_step():
    cfg = override(presets.tiny(), ONE_LAYER)  # a cheaper step to compile
    rs = np.random.default_rng(0)
    b, m = 2, 8
    good = {"pixels": rs.integers(0, 256, (b, 64, 64, 3)).astype(np.uint8), "mask": np.ones((b, 64, 64), bool),
            "labels": rs.integers(0, cfg.model.num_classes, (b, m)).astype(np.int32),
            "boxes": np.tile(np.array([0.4, 0.5, 0.3, 0.2], np.float32), (b, m, 1)),
            "valid": np.arange(m)[None].repeat(b, 0) < 3}
    bad = {**good, "boxes": np.full_like(good["boxes"], np.nan)}
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    model.train()
    graphdef, initial = nnx.split((model, nnx.Optimizer(model, optimizer(cfg.train), wrt=nnx.Param)))
    step = make_train_step(graphdef, lambda o, t: set_loss(o, t, cfg.loss), learning_rates(cfg.train, 10, 3))

    def values(state):
        is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        return [np.asarray(jax.random.key_data(x) if is_key(x) else x) for x in jax.tree.leaves(state)]

    def trained(state):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))]

    def run(*steps):
        state = jax.tree.map(jnp.copy, initial)  # a copy: the step donates its state
        for batch, i in steps:
            state, terms = step(state, batch, i)
        return values(state), trained(state), int(terms["skipped"])

    skipped, _, flag = run((bad, 0))
    assert flag == 1
    for a, b_ in zip(skipped, values(initial)):
        np.testing.assert_array_equal(a, b_)  # nothing moved: weights, Adam's moments and count, RNG streams
    after_skip, _, _ = run((bad, 0), (good, 5))
    alone, late, _ = run((good, 5))
    for a, b_ in zip(after_skip, alone):
        np.testing.assert_array_equal(a, b_)  # the skipped step left no trace
    _, early, _ = run((good, 1))
    moved = lambda params: sum(float(np.abs(x - p).sum()) for x, p in zip(params, trained(initial)))
    # the first update at loop step 5 (after the drop at 3) is a tenth of the first update at loop step 1
    assert abs(moved(late) / moved(early) - 0.1) < 1e-3
