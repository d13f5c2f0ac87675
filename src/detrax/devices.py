"""Arrays over devices and hosts: the 1-D data-parallel mesh, replication, sharded batches, a host's copy."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh() -> jax.sharding.Mesh:
    """Every device of every host on one axis, 'data'."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shardings(mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, sharded over 'data' on the first axis)."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def local_copy(x):
    """This host's copy of a replicated array, as NumPy."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def replicate(tree, sharding):
    """Host values identical on every host -> arrays replicated over the whole mesh."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def global_batch(local: dict, sharding, keys) -> dict:
    """This host's part of a batch -> global arrays sharded over the mesh (each host gives its own rows)."""
    return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in keys}
