"""Does this jaxlib deadlock when independent batched LAPACK calls run at once on CPU?

jaxlib 0.10.x splits a batched LAPACK call (here a Cholesky over many small matrices) into chunks on
XLA's intra-op thread pool and blocks the calling pool thread until they finish. When XLA runs as many
such calls concurrently as the pool has threads, every thread waits and nothing runs the chunks. The pool
is sized from the CPU count, so a 2-core machine needs only two concurrent calls. This is why
pyproject.toml pins jaxlib < 0.10.

    python benchmarks/lapack_hang.py [--trials 3] [--timeout 60]

Each trial runs 500 calls of one jitted function holding eight independent batched Choleskys (4096 x 8 x 8)
in a fresh subprocess and reports `ok (seconds)` or `hang` when the subprocess exceeds the time-out.
"""

import argparse
import subprocess
import sys
import time

WORKER = r"""
import jax, jax.numpy as jnp
import ppl_switch  # noqa: F401  the library's own XLA settings

@jax.jit
def eight_independent_choleskys(a):
    return sum(jnp.linalg.cholesky(a[i] + 8.0 * jnp.eye(8)).sum() for i in range(8))

a = jax.random.normal(jax.random.PRNGKey(0), (8, 4096, 8, 8))
a = a @ jnp.swapaxes(a, -1, -2)
for i in range(500):
    eight_independent_choleskys(a + i * 1e-6).block_until_ready()
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as a hang")
    args = parser.parse_args()
    import jax
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}")
    for trial in range(args.trials):
        start = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-c", WORKER], check=True, timeout=args.timeout)
            print(f"trial {trial}: ok ({time.perf_counter() - start:.1f} s)")
        except subprocess.TimeoutExpired:
            print(f"trial {trial}: hang (no result after {args.timeout:.0f} s)")


if __name__ == "__main__":
    main()
