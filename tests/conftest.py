"""Test configuration: the user's precision (float32) by default; ``@pytest.mark.float64`` (or a module's
``pytestmark``) runs a test with ``jax_enable_x64`` on, for oracle comparisons at 1e-8 and below.

Compiled programs go to a persistent cache per xdist worker, shared with the subprocesses that worker
starts (tutorials, CLI) for this test session: NumPyro's initialisation runs models op by op, and each
process would otherwise compile the same few hundred small kernels again. One directory per worker
because JAX writes cache entries non-atomically and reads them without a lock: a worker reading an entry
another worker was still writing crashed XLA's deserialiser (a segmentation fault in a CI run under
load, 2026-12-04). A worker waits for its subprocesses, so they never race with it.
"""

import atexit
import os
import shutil
import tempfile

# jaxlib 0.9 logs two C++ ERROR lines per executable it loads from the persistent cache (a CPU-feature
# naming mismatch, harmless); at -s they bury the test output. Set before JAX loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ppl_switch  # noqa: F401  sets single-threaded CPU Eigen (see ppl_switch/__init__.py) before JAX starts
import jax
import pytest

# set once by the controlling process; workers and subprocesses inherit it through the environment
if "PPL_SWITCH_TEST_JAX_CACHE" not in os.environ:
    os.environ["PPL_SWITCH_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="ppl_switch_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["PPL_SWITCH_TEST_JAX_CACHE"], ignore_errors=True)
# this process's directory (xdist sets PYTEST_XDIST_WORKER before conftest loads); inherited by subprocesses
_cache_dir = os.path.join(os.environ["PPL_SWITCH_TEST_JAX_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.makedirs(_cache_dir, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
    """The default (not slow) tests run tiny problems, so their time is mostly XLA compilation (NumPyro's
    initialisation alone compiles hundreds of small kernels). Skipping LLVM's optimisation passes cuts
    compile time by about a third (tests/test_ops_*.py: 155 -> 105 s on 2 cores) and changes no result
    beyond rounding. The slow runs, whose time is execution, keep full optimisation. Runs in the
    controller and in every xdist worker before JAX starts its CPU backend (the first computation);
    the tutorial and CLI subprocesses inherit it."""
    if "not slow" in (config.getoption("markexpr") or "") and "--xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def _wants_float64(node) -> bool:
    return node.get_closest_marker("float64") is not None


@pytest.fixture(scope="module", autouse=True)
def _module_precision(request):
    """The module's precision, set before its module-scoped fixtures build arrays (autouse fixtures of a
    scope run first)."""
    jax.config.update("jax_enable_x64", _wants_float64(request.node))
    yield


@pytest.fixture(autouse=True)
def _test_precision(request):
    """Each test's precision from its markers; reset per test, so a runner called with ``x64=True`` (which
    switches float64 on for the process) does not leak float64 into the next test."""
    jax.config.update("jax_enable_x64", _wants_float64(request.node))
    yield
