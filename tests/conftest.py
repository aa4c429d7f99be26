"""Test configuration: the user's precision (float32) by default; ``@pytest.mark.float64`` (or a module's
``pytestmark``) runs a test with ``jax_enable_x64`` on, for oracle comparisons at 1e-8 and below. Programs
compile as users' do (XLA's default optimisation; no flags beyond those ``import ppl_switch`` sets).

Compiled programs are shared within one test run: the run's first process makes a fresh, empty JAX
compilation cache in a temporary folder (deleted at the end), and the xdist workers and every subprocess
they start (tutorials, CLI, demo) read and write it. A program compiled by one of them, or compiled again
after a module released it (see _module_precision), is then loaded instead of compiled again. The run starts
cold, as a user's first session does; nothing is kept between runs.
"""

import atexit
import os
import shutil
import tempfile

# jaxlib 0.9 logs two C++ ERROR lines per executable it loads from the persistent cache (a CPU-feature
# naming mismatch, harmless); at -s they bury the test output. Set before JAX loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "PYTEST_XDIST_WORKER" not in os.environ:  # the run's first process; workers and subprocesses inherit it
    _RUN_CACHE = tempfile.mkdtemp(prefix="ppl-switch-tests-jax-cache-")
    atexit.register(shutil.rmtree, _RUN_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    # every program, however small: most of a test's time is hundreds of small eager-op compilations
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import ppl_switch  # noqa: F401  sets single-threaded CPU Eigen (see ppl_switch/__init__.py) before JAX starts
import jax
import pytest


#: release compiled programs after a test when the process holds more memory mappings than this (the limit is
#: 65,530; see _module_precision)
_MAPPINGS_HIGH_WATER = 40_000


def _memory_map_count() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


def _wants_float64(node) -> bool:
    return node.get_closest_marker("float64") is not None


@pytest.fixture(scope="module", autouse=True)
def _module_precision(request):
    """The module's precision, set before its module-scoped fixtures build arrays (autouse fixtures of a
    scope run first). At the module's end, every compiled program is released (``jax.clear_caches()``).

    Why: each XLA CPU executable holds about six memory mappings until it is freed, and JAX keeps every
    executable it compiled. A test worker compiles thousands (every model, shape and precision), so it
    reached Linux's limit of 65,530 mappings per process (vm.max_map_count) after ~70% of the run, and
    the next compilation died with a segmentation fault or an abort inside XLA (CI and two local runs,
    2026-12-06: 26,000 mappings after 3.5 min of one worker). Module fixtures that hold fits keep arrays,
    not executables, so nothing a later module uses is lost except compiled code."""
    jax.config.update("jax_enable_x64", _wants_float64(request.node))
    yield
    jax.clear_caches()
    if os.environ.get("PPL_SWITCH_TEST_MAPS_LOG"):  # diagnosis: mappings left after each module
        with open(os.environ["PPL_SWITCH_TEST_MAPS_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {request.node.nodeid} {_memory_map_count()}\n")


@pytest.fixture(autouse=True)
def _test_precision(request):
    """Each test's precision from its markers; reset per test, so a runner called with ``x64=True`` (which
    switches float64 on for the process) does not leak float64 into the next test."""
    jax.config.update("jax_enable_x64", _wants_float64(request.node))
    yield
    if _memory_map_count() > _MAPPINGS_HIGH_WATER:  # a module that compiles very many programs
        jax.clear_caches()
