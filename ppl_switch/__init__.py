"""ppl-switch: switching and latent dynamical systems in NumPyro."""

import os as _os

__version__ = "0.1.0"

# XLA's multithreaded Eigen pool on CPU can wedge: every thread idles and the program never returns
# (seen here in compiled EM loops and parallel-in-time Kalman scans at T = 1e4). Single-threaded Eigen
# avoids it at a small cost on CPU and changes nothing on GPU. This only takes effect if JAX has not
# started its CPU backend yet; set XLA_FLAGS yourself (any value of the flag) to choose otherwise.
if "--xla_cpu_multi_thread_eigen" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def __getattr__(name):
    # lazy: ``import ppl_switch`` stays cheap (no JAX/NumPyro) until ``ppl_switch.fit`` is used
    if name == "fit":
        from ppl_switch.infer import fit

        return fit
    raise AttributeError(f"module 'ppl_switch' has no attribute {name!r}")
