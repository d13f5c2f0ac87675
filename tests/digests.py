"""What tests compare runs by."""

import hashlib

import jax
import numpy as np


def params_digest(params) -> str:
    """sha256 over the parameter values, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()
