"""Test configuration: the user's precision (float32) by default; ``@pytest.mark.float64`` (or a module's
``pytestmark``) runs a test with ``jax_enable_x64`` on, for oracle comparisons at 1e-8 and below.

Compilation is not cached on disk between processes (see below).
"""

import os

# jaxlib 0.9 logs two C++ ERROR lines per executable it loads from the persistent cache (a CPU-feature
# naming mismatch, harmless); at -s they bury the test output. Set before JAX loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ppl_switch  # noqa: F401  sets single-threaded CPU Eigen (see ppl_switch/__init__.py) before JAX starts
import jax
import pytest

# No persistent compilation cache (users have none): with one per xdist worker, two full runs on 2026-12-06
# each lost two workers to crashes inside JAX's compile-and-write-cache path (an abort in
# backend_compile_and_load, a segmentation fault in put_executable_and_time), under jaxlib 0.9.2 and 0.10.2.


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
