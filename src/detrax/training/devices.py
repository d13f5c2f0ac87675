"""Arrays over devices and hosts: the 1-D data-parallel mesh, replication, sharded batches, a host's copy; the CPU
backend's convolution library (XLA_FLAGS, set before JAX starts)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# XLA:CPU (jaxlib 0.10) runs convolutions through YNNPACK, whose kernel gradient was several times slower than
# Eigen's on an AVX2 CPU (benchmarks/history.md): the CLI runs CPU convolutions through Eigen (matrix products stay
# on YNNPACK). It touches nothing but the CPU backend.
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def prefer_eigen_convolutions() -> bool:
    """Add `EIGEN_CONVOLUTIONS` to XLA_FLAGS, unless XLA_FLAGS already sets YNNPACK's fusion types or jaxlib is
    older than 0.10 (which does not know the flag). Call it before JAX's first computation: a started backend
    keeps its flags. Returns whether the flag was added."""
    import jaxlib

    flags = os.environ.get("XLA_FLAGS", "")
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())
    if "xla_cpu_experimental_ynn_fusion_type" in flags or version < (0, 10):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
    return True


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
