"""Extension points: a toy matcher registered from outside the package is validated by the configs and trains."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from detrax import configs, matching
from detrax.data.synthetic import write_dataset
from detrax.train import Run, fit


def in_order(cost, valid):
    """A toy matcher: target slot j gets query j (valid targets only): [..., N, M], [..., M] -> [..., M]."""
    m = cost.shape[-1]
    return jnp.where(valid, jnp.arange(m, dtype=jnp.int32), -1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=8, seed=5)
    return str(root)


def test_a_registered_matcher_is_validated_and_trains(synth, tmp_path):
    with pytest.raises(ValueError, match="matcher must be one of"):
        configs.override(configs.get("tiny"), ["loss.matcher=in_order"])
    matching.register_matcher("in_order", in_order)
    try:
        cfg = configs.override(configs.get("demo"), ["loss.matcher=in_order", "train.steps=2", "train.batch_size=2",
                                                     "train.log_every=1", "train.eval_every=0",
                                                     "data.val_split=none", "data.bucket_step=192"])
        fit(cfg, Run(synth, str(tmp_path / "run"), quiet=True))
    finally:
        del matching.MATCHERS["in_order"]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert rows[0]["record"]["config"]["loss"]["matcher"] == "in_order"
