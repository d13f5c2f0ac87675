import functools
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest


def _write_bytecode():
    """Python's compiled modules written and read again, in this process, the workers and every process a test
    starts, also where the environment says not to (PYTHONDONTWRITEBYTECODE=1, as on CI beside `pip install
    --no-compile`): otherwise each process compiles the source of jax, flax, orbax and detrax again on import
    (`import detrax.cli`: 6.0 s, 2.5 s read from __pycache__; the suite starts about 20 processes beside its
    workers)."""
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


_write_bytecode()

LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _compile_flags() -> str:
    """LLVM's level-0 optimisation, and the loop emitters where this jaxlib has the choice (XLA aborts on a flag it
    does not know): asked once, of a child process, and kept in the environment for the workers and the
    processes they start."""
    if "DETRAX_SUITE_XLA_FLAGS" not in os.environ:
        flags = f"--xla_backend_optimization_level=0 {LOOP_EMITTERS}"
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                               env={**os.environ, "XLA_FLAGS": flags})
        os.environ["DETRAX_SUITE_XLA_FLAGS"] = flags if probe.returncode == 0 else "--xla_backend_optimization_level=0"
    return os.environ["DETRAX_SUITE_XLA_FLAGS"].strip()


def xla_flags(devices: int = 1) -> str:
    """The suite's XLA_FLAGS, for its own process and the ones it starts: `devices` CPU devices, LLVM's level-0
    optimisation and XLA:CPU's loop emitters in place of its fusion emitters. The suite compiles thousands of
    programs and runs most of them a few times: level 0 halves their compile time (most of the suite's), the loop
    emitters take 60% more off a train step's (7.2 -> 2.7 s of CPU, the demo's step at level 0; it runs 18%
    slower). Both give the numbers of XLA's default within float32 rounding (`test_cpu_compiler_options...`), not
    bitwise: a test compares runs of one setting. A level in XLA_FLAGS wins over the train step's own level 1
    (`training.step.compiler_options`), so the suite's steps compile at level 0 too."""
    return f"--xla_force_host_platform_device_count={devices} {_compile_flags()}"


os.environ.setdefault("XLA_FLAGS", xla_flags())


def _share_of_the_cpus():
    """Under pytest-xdist, each worker (and the processes it starts) on its own share of the CPUs, set before JAX
    starts: XLA:CPU sizes its thread pools by the CPUs a process may use, and two workers whose pools each span
    every core wait on each other's threads (on 2 cores, 2 workers: 1050 s of CPU for the suite, 1255 s
    unpinned). The CPUs of the whole run stay in DETRAX_SUITE_CPUS for a test whose processes need them all
    (`scripts/two_process.py`)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 0))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("DETRAX_SUITE_CPUS", ",".join(map(str, cpus)))
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])


_share_of_the_cpus()

# for a program a test runs long (a while loop over many iterations), the train step's own CPU level
# (`training.step.compiler_options`) in place of the suite's level 0: level 0 runs a loop's scalar code about 10x
# slower (the on-device Hungarian on 1200 matrices: 12.7 s at level 0, 1.2 s at level 1; its compile 0.4 -> 0.6 s)
RUNS_LONG = {"xla_backend_optimization_level": 1}

# the demo preset without its training-only aids (query groups, denoising, encoder head), DC5 or its batch of 8: for
# the tests that are not about them (a smaller step to compile and run: the step of test_train's tests 40% faster)
PLAIN = ["model.query_groups=1", "model.dn_groups=0", "model.encoder_head=false", "model.dilation=false",
         "train.batch_size=4"]
# one encoder and one decoder layer (every kind of op): a cheaper step to compile and trace, for the tests that
# check training's machinery (resuming, skipping, compile options), not the model (tests/scripts/two_process.py too)
ONE_LAYER = ["model.enc_layers=1", "model.dec_layers=1"]


def require(module: str, extra: str = "dev"):
    """Import a reference package or fail (never skip) with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the reference package {module!r} is missing: pip install -e '.[{extra}]'", pytrace=False)


# the longest files first (pyproject runs each file on one worker, `--dist loadfile`: its runs share their compiled
# programs in memory), so that neither worker is left with a long one at the end
LONGEST = ("test_train.py", "test_reliability.py", "test_distributed.py", "test_bit.py", "test_flax_detr.py",
           "test_extensions.py", "test_segmentation.py", "test_export.py", "test_convert.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: the rest in their order


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the whole run, its workers and the processes they start: the
    tests build the same tiny programs many times (a cached executable is the same machine code, so bitwise
    checks hold). Under xdist the workers' temporary folders share a parent."""
    import jax

    base = tmp_path_factory.getbasetemp()
    cache = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache")
    settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    yield cache


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@functools.cache
def _jitted_call():
    from flax import nnx

    return nnx.jit(lambda m, *a: m(*a))  # one jitted function: a second call of the same shapes traces nothing


@functools.cache
def _jitted_loss():
    import jax

    from detrax.criterion.loss import set_loss

    return jax.jit(set_loss, static_argnums=2)


def compiled_loss(outputs, targets, cfg=None):
    """`detrax.set_loss(outputs, targets, cfg)` compiled as one program (run eagerly: each of its operations
    compiled on its own)."""
    from detrax.config.schema import LossConfig

    return _jitted_loss()(outputs, targets, LossConfig() if cfg is None else cfg)


def compiled(module, *args):
    """`module(*args)` compiled as one program: run eagerly, a model compiles each of its hundreds of operations
    on its own, several times slower than the whole."""
    return _jitted_call()(module, *args)
