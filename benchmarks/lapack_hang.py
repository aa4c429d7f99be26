"""Does this jaxlib deadlock when independent batched LAPACK calls run at once on CPU?

jaxlib 0.10.0-0.10.2 split a large batched LAPACK call (here a Cholesky over many small matrices) into
chunks on XLA's intra-op thread pool and block the calling pool thread until they finish. When XLA runs as
many such calls concurrently as the pool has threads, every thread waits and nothing runs the chunks. The
pool is sized from the CPU count, so a 2-core machine needs only two concurrent calls. jaxlib 0.11.0
stopped splitting LAPACK calls in its public builds; older ones never did.

Importing ppl_switch works around it on jaxlib 0.10.x (ppl_switch/__init__.py: XLA's memory-oriented CPU
scheduler, which does not run the independent calls concurrently). `--bare` runs the same program without
importing ppl_switch, as the control.

    python benchmarks/lapack_hang.py [--trials 3] [--timeout 60] [--calls 500] [--bare]

Each trial runs 500 calls (--calls) of one jitted function holding eight independent batched Choleskys
(4096 x 8 x 8) in a fresh subprocess and reports `ok (seconds)` or `hang` when the subprocess exceeds the time-out. The
exit status is 1 if any trial hung.
"""

import argparse
import os
import subprocess
import sys
import time

WORKER = r"""
import os, sys
if sys.argv[1] == "library":
    import ppl_switch  # noqa: F401  the library's own XLA settings
print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""), flush=True)
import jax, jax.numpy as jnp

@jax.jit
def eight_independent_choleskys(a):
    return sum(jnp.linalg.cholesky(a[i] + 8.0 * jnp.eye(8)).sum() for i in range(8))

a = jax.random.normal(jax.random.PRNGKey(0), (8, 4096, 8, 8))
a = a @ jnp.swapaxes(a, -1, -2)
for i in range(int(sys.argv[2])):
    eight_independent_choleskys(a + i * 1e-6).block_until_ready()
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as a hang")
    parser.add_argument("--calls", type=int, default=500, help="calls of the jitted function per trial")
    parser.add_argument("--bare", action="store_true", help="do not import ppl_switch (the control)")
    args = parser.parse_args()
    import jax
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, {os.cpu_count()} CPUs")
    hangs = 0
    for trial in range(args.trials):
        start = time.perf_counter()
        try:
            worker = [sys.executable, "-c", WORKER, "bare" if args.bare else "library", str(args.calls)]
            subprocess.run(worker, check=True, timeout=args.timeout)
            print(f"trial {trial}: ok ({time.perf_counter() - start:.1f} s)", flush=True)
        except subprocess.TimeoutExpired:
            hangs += 1
            print(f"trial {trial}: hang (no result after {args.timeout:.0f} s)", flush=True)
    return 1 if hangs else 0


if __name__ == "__main__":
    sys.exit(main())
