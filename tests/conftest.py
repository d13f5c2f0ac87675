import importlib
import os

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


def require(module: str, extra: str = "dev"):
    """Import a reference package or fail (never skip) with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the reference package {module!r} is missing: pip install -e '.[{extra}]'", pytrace=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
