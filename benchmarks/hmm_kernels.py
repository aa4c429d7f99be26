"""Time the HMM message-passing kernels of ppl_switch against dynamax (when importable).

Each kernel is jit-compiled and called once (compile time excluded), then timed as the median of
``repeats`` calls, each blocked until ready. Inputs: a random sticky K-state HMM with float32
(the JAX default unless x64 is enabled) Gaussian-like log-likelihoods.

    python -m benchmarks.hmm_kernels            # prints a table
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

try:
    from ppl_switch.ops import hmm as ops_hmm
except ImportError:  # run as a script from benchmarks/: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ppl_switch.ops import hmm as ops_hmm


def _problem(T: int, K: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    transition = 0.9 * np.eye(K) + 0.1 * rng.dirichlet(np.ones(K), size=K)
    initial = rng.dirichlet(np.ones(K))
    log_likelihoods = -0.5 * rng.normal(size=(T, K)) ** 2 * 4.0
    dtype = jnp.zeros(()).dtype if jax.config.jax_enable_x64 else jnp.float32
    return tuple(jnp.asarray(x, dtype) for x in (initial, transition, log_likelihoods))


def _time(fn: Callable, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(result):
    return result.log_normalizer, result.smoothed_probs


def _theirs(posterior):
    return posterior.marginal_loglik, posterior.smoothed_probs


def _kernels() -> dict[tuple[str, str], Callable]:
    """{(kernel, impl): jitted fn(initial, transition, log_likelihoods)} -> log normaliser/marginals."""
    kernels = {
        ("hmm_filter", "ppl_switch_sequential"): jax.jit(lambda p, A, ll: ops_hmm.hmm_filter(p, A, ll)),
        ("hmm_filter", "ppl_switch_parallel"): jax.jit(lambda p, A, ll: ops_hmm.hmm_filter(p, A, ll, parallel=True)),
        # smoothers return (log normaliser, smoothed marginals) on both sides so that neither pays for
        # outputs the other skips (dynamax's smoother has no pairwise probabilities; XLA drops ours)
        ("hmm_smoother", "ppl_switch_sequential"): jax.jit(lambda p, A, ll: _ours(ops_hmm.hmm_smoother(p, A, ll))),
        ("hmm_smoother", "ppl_switch_parallel"): jax.jit(
            lambda p, A, ll: _ours(ops_hmm.hmm_smoother(p, A, ll, parallel=True))
        ),
    }
    try:
        from dynamax.hidden_markov_model import inference as dx
        from dynamax.hidden_markov_model import parallel_inference as dxp
    except ImportError:
        return kernels
    kernels.update(
        {
            ("hmm_filter", "dynamax_sequential"): jax.jit(lambda p, A, ll: dx.hmm_filter(p, A, ll)),
            ("hmm_filter", "dynamax_parallel"): jax.jit(lambda p, A, ll: dxp.hmm_filter(p, A, ll)),
            ("hmm_smoother", "dynamax_sequential"): jax.jit(lambda p, A, ll: _theirs(dx.hmm_smoother(p, A, ll))),
            ("hmm_smoother", "dynamax_parallel"): jax.jit(lambda p, A, ll: _theirs(dxp.hmm_smoother(p, A, ll))),
        }
    )
    return kernels


def run(lengths=(100, 1000, 10000, 100000), num_states: int = 25, repeats: int = 5) -> list[dict]:
    """Time every kernel at every length.

    Returns:
        list of {"kernel", "impl", "T", "seconds"} (median wall-clock seconds per call).
    """
    kernels = _kernels()
    rows = []
    for T in lengths:
        args = _problem(int(T), num_states)
        for (kernel, impl), fn in kernels.items():
            rows.append({"kernel": kernel, "impl": impl, "T": int(T), "seconds": _time(fn, args, repeats)})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table with ours/dynamax ratios (sequential vs sequential, parallel vs parallel)."""
    seconds = {(r["kernel"], r["impl"], r["T"]): r["seconds"] for r in rows}
    lines = ["| kernel | impl | T | seconds | ratio vs dynamax |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = ""
        if r["impl"].startswith("ppl_switch"):
            peer = seconds.get((r["kernel"], r["impl"].replace("ppl_switch", "dynamax"), r["T"]))
            ratio = f"{r['seconds'] / peer:.2f}" if peer else ""
        lines.append(f"| {r['kernel']} | {r['impl']} | {r['T']} | {r['seconds']:.3e} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--num-states", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, dtype: {'float64' if jax.config.jax_enable_x64 else 'float32'}")
    print(format_table(run(tuple(args.lengths), args.num_states, args.repeats)))
