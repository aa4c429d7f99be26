"""ppl-switch: switching and latent dynamical systems in NumPyro."""

import os as _os

from ppl_switch.version import __version__  # noqa: F401 - public

# XLA's multithreaded Eigen pool on CPU can wedge: every thread idles and the program never returns
# (seen here in compiled EM loops and parallel-in-time Kalman scans at T = 1e4). Single-threaded Eigen
# avoids it at a small cost on CPU and changes nothing on GPU. This only takes effect if JAX has not
# started its CPU backend yet; set XLA_FLAGS yourself (any value of the flag) to choose otherwise.
if "--xla_cpu_multi_thread_eigen" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def _jaxlib_0_10() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib").startswith("0.10.")
    except PackageNotFoundError:
        return False


# jaxlib 0.10.0-0.10.2 (only those: 0.11 removed it) splits a large batched LAPACK call (Cholesky, triangular
# solve, LU, eigh over many matrices) into chunks on XLA's CPU pool and blocks its pool thread until they
# finish; when XLA runs as many such calls concurrently as the pool has threads, nothing runs the chunks and
# the program idles forever (benchmarks/lapack_hang.py). XLA's default CPU scheduler orders independent ops
# to run concurrently; the memory-oriented one (this flag) reuses their buffers, which makes XLA run them one
# after another. Set only for jaxlib 0.10.x and only if XLA_FLAGS does not name the flag already.
if _jaxlib_0_10() and "--xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"


def __getattr__(name):
    # lazy: ``import ppl_switch`` stays cheap (no JAX/NumPyro) until ``ppl_switch.fit`` is used
    if name == "fit":
        from ppl_switch.infer import fit

        return fit
    raise AttributeError(f"module 'ppl_switch' has no attribute {name!r}")
