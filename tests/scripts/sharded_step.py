"""Loss and gradients of one training step on 4 forced CPU devices and on 1, same global batch (run by
tests/test_distributed.py with XLA_FLAGS=--xla_force_host_platform_device_count=4). Prints one JSON line."""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from detrax.config import presets, schema
from detrax.config.overrides import override
from detrax.criterion.loss import set_loss
from detrax.data.coco import read_coco
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.transforms import normalize_batch
from detrax.models.detr import DETR


def main(data_dir):
    assert jax.device_count() == 4, jax.devices()
    cfg = override(presets.get("demo"), ["model.dropout=0.0", "model.num_classes=4", "model.query_groups=1",
                                         "model.dn_groups=0", "model.encoder_head=false"])  # the aids: not tested here
    records = read_coco(data_dir, "train").records
    augment = Augment(True, schema.DataConfig(scales=(128,), max_size=160))
    with Loader(dataset(records, augment, 4, max_targets=16, step=64, seed=0)) as loader:
        batch = next(loader)
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    loss_fn = lambda out, t, **kw: set_loss(out, t, cfg.loss, **kw)

    def run(devices):
        mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))

        @jax.jit
        def f(state, b):
            def objective(m):
                out = m(normalize_batch(b["pixels"], b["mask"], m.config.pixel_mean, m.config.pixel_std), b["mask"])
                return loss_fn(out, {k: b[k] for k in ("labels", "boxes", "valid")}, mesh=mesh)["loss"]

            return nnx.value_and_grad(objective)(nnx.merge(graphdef, state))

        b = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()
             if k in ("pixels", "mask", "labels", "boxes", "valid")}
        loss, grads = f(jax.device_put(state, NamedSharding(mesh, P())), b)
        return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)], b["pixels"].sharding

    loss4, grads4, sharding4 = run(jax.devices())
    loss1, grads1, _ = run(jax.devices()[:1])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(grads4, grads1))
    scale = max(float(np.abs(b).max()) for b in grads1)
    print(json.dumps({"loss4": loss4, "loss1": loss1, "grad_max_abs_diff": diff, "grad_max_abs": scale,
                      "shards": len(sharding4.device_set), "leaves": len(grads1)}))


if __name__ == "__main__":
    main(sys.argv[1])
