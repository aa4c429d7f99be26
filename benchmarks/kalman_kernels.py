"""Time ppl_switch's Kalman filter / RTS smoother against dynamax's on the same data.

Usage (CPU, float32):  JAX_PLATFORMS=cpu python -m benchmarks.kalman_kernels [--quick]

Each timing is a jit-compiled call (compilation excluded: one warm-up call first), synchronised with
``block_until_ready``, and the median of ``repeats`` calls. The model is a random stable LGSSM with a
full (N, N) emission covariance, given identically to both libraries.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.ops import kalman


def _model(D: int, N: int, seed: int = 0) -> kalman.LGSSMParams:
    rng = np.random.default_rng(seed)
    A = 0.95 * np.linalg.qr(rng.normal(size=(D, D)))[0]
    X = rng.normal(size=(N, N))
    R = 0.1 * (X @ X.T / N + np.eye(N))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return kalman.lgssm_params(
        f32(np.zeros(D)),
        f32(np.eye(D)),
        f32(A),
        f32(0.1 * np.eye(D)),
        f32(rng.normal(size=(N, D))),
        f32(R),
        dynamics_bias=f32(np.zeros(D)),
        emission_bias=f32(np.zeros(N)),
    )


def _dynamax_params(p: kalman.LGSSMParams):
    from dynamax.linear_gaussian_ssm.inference import (
        ParamsLGSSM,
        ParamsLGSSMDynamics,
        ParamsLGSSMEmissions,
        ParamsLGSSMInitial,
    )

    D, N = p.initial_mean.shape[0], p.emission_matrix.shape[0]
    zeros = jnp.zeros((D, 0), jnp.float32), jnp.zeros((N, 0), jnp.float32)
    return ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=p.initial_mean, cov=p.initial_cov),
        dynamics=ParamsLGSSMDynamics(p.dynamics_matrix, p.dynamics_bias, zeros[0], p.dynamics_cov),
        emissions=ParamsLGSSMEmissions(p.emission_matrix, p.emission_bias, zeros[1], p.emission_cov),
    )


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(median, min) seconds per call; min is the better estimate on a shared, loaded machine."""
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def _kernels(skip_parallel_above: int, T: int):
    """(kernel, impl, function(params, dynamax_params, y)) triples to time."""
    out = [
        ("filter", "ours_seq", lambda p, q, y: kalman.lgssm_filter(p, y).log_likelihood),
        ("smoother", "ours_seq", lambda p, q, y: kalman.lgssm_smoother(p, y).smoothed_means),
    ]
    try:
        from dynamax.linear_gaussian_ssm import inference as dx
    except ImportError:  # dynamax optional
        dx = None
    if dx is not None:
        out += [
            ("filter", "dynamax_seq", lambda p, q, y: dx.lgssm_filter(q, y).marginal_loglik),
            ("smoother", "dynamax_seq", lambda p, q, y: dx.lgssm_smoother(q, y).smoothed_means),
        ]
    if T <= skip_parallel_above:
        out += [
            ("filter", "ours_par", lambda p, q, y: kalman.lgssm_filter(p, y, parallel=True).log_likelihood),
            ("smoother", "ours_par", lambda p, q, y: kalman.lgssm_smoother(p, y, parallel=True).smoothed_means),
        ]
        try:
            from dynamax.linear_gaussian_ssm import parallel_inference as dxp
        except ImportError:
            dxp = None
        if dxp is not None:
            out += [
                ("filter", "dynamax_par", lambda p, q, y: dxp.lgssm_filter(q, y).marginal_loglik),
                ("smoother", "dynamax_par", lambda p, q, y: dxp.lgssm_smoother(q, y).smoothed_means),
            ]
    return out


def run(lengths=(100, 1000, 10000, 100000), sizes=((4, 2), (10, 50)), repeats=5, skip_parallel_above=10**9):
    """Time every kernel for every (D, N) and T. Returns a list of
    {"kernel", "impl", "D", "N", "T", "seconds", "min_seconds"} dicts (median and fastest call)."""
    rows = []
    for D, N in sizes:
        p = _model(D, N)
        q = _dynamax_params(p)
        for T in lengths:
            _, y = jax.jit(kalman.lgssm_simulate, static_argnums=2)(jax.random.PRNGKey(T), p, T)
            for kernel, impl, fn in _kernels(skip_parallel_above, T):
                sec, fastest = _time(jax.jit(fn), p, q, y, repeats=repeats)
                rows.append(dict(kernel=kernel, impl=impl, D=D, N=N, T=T, seconds=sec, min_seconds=fastest))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows, field: str = "seconds") -> str:
    """Markdown table: one line per (kernel, D, N, T) with ``field`` per impl and ours/dynamax ratios."""
    keys = sorted({(r["kernel"], r["D"], r["N"], r["T"]) for r in rows}, key=lambda k: (k[0], k[1], k[3]))
    impls = ["ours_seq", "dynamax_seq", "ours_par", "dynamax_par"]
    lines = [
        "| kernel | D | N | T | " + " | ".join(impls) + " | seq ratio | par ratio |",
        "|" + "---|" * (4 + len(impls) + 2),
    ]
    for k in keys:
        s = {r["impl"]: r[field] for r in rows if (r["kernel"], r["D"], r["N"], r["T"]) == k}
        cell = lambda i: f"{s[i]:.2e}" if i in s else "-"  # noqa: E731
        ratio = lambda a, b: f"{s[a] / s[b]:.2f}" if a in s and b in s else "-"  # noqa: E731
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | "
            + " | ".join(cell(i) for i in impls)
            + f" | {ratio('ours_seq', 'dynamax_seq')} | {ratio('ours_par', 'dynamax_par')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T up to 1e4, 3 repeats")
    ap.add_argument("--skip-parallel-above", type=int, default=10**9)
    args = ap.parse_args()
    kw = dict(lengths=(100, 1000, 10000), repeats=3) if args.quick else {}
    rows = run(skip_parallel_above=args.skip_parallel_above, **kw)
    print("median seconds\n" + table(rows) + "\n\nmin seconds\n" + table(rows, "min_seconds"))
