"""rSLDS baseline on the gpSLDS two-rotation data (Hu et al. 2024, Sec. 4.1, Fig. 2H): the same metrics as
``benchmarks/gpslds.py`` for a discrete-time recurrent SLDS fitted by Laplace EM to the binned spikes.

Protocol (the paper's, as far as it is stated): the 1 ms binary events are summed into ``--bin-ms`` bins
(20 ms in the paper) and kept as events (count > 0: the library's Laplace EM has Bernoulli, not Poisson,
emissions; at 20 ms this drops the extra spikes of the 18% of non-empty bins with more than one); K = 2
regimes with logits W x + r ("recurrent_only", the paper's eq. 4; ``--transitions recurrent`` adds the
previous-regime term); 5 restarts x 100 iterations, best objective kept.

The fitted discrete-time map x_{t+1} = A_k x_t + b_k over a bin of length h becomes a continuous-time drift
per regime, f_k(x) = M_k (x - x*_k) with M_k = logm(A_k) / h and x*_k = (I - A_k)^{-1} b_k
(``analysis.fixed_points.continuous_time_dynamics``: exact for a linear regime; ``(A_k - I) / h`` finite
differences printed alongside), blended by the partition,
f(x) = sum_k softmax(W x + r)_k f_k(x) (row-averaged logits for "recurrent"). The drift is carried to the
true frame by the affine map regressing the q(x) means onto the bin-averaged true latents, and scored by
the same normalised MSE on the same visited cells as the gpSLDS.

    python benchmarks/gpslds_rslds.py --seeds 0 1 2 3 4
    python benchmarks/gpslds_rslds.py --seeds 0 --bin-ms 10
Prints one line per seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from ppl_switch.analysis import gpslds_analysis as ga  # noqa: E402
from ppl_switch.analysis.fixed_points import continuous_time_dynamics  # noqa: E402
from ppl_switch.analysis.metrics import affine_aligned_r2  # noqa: E402
from ppl_switch.datasets.gpslds_synthetic import simulate_gpslds_synthetic, two_rotation_drift  # noqa: E402
from ppl_switch.infer.rslds_em import rslds_em  # noqa: E402
from ppl_switch.models.rslds_transitions import transition_logits, transition_site_names  # noqa: E402
from ppl_switch.models.rslds import RSLDS  # noqa: E402


def bin_events(y, steps_per_bin):
    """(B, T, N) 1 ms events -> (B, T // steps_per_bin, N) events (any spike in the bin); T must divide."""
    B, T, N = y.shape
    return (y.reshape(B, T // steps_per_bin, steps_per_bin, N).sum(2) > 0).astype(float)


def continuous_drift(params, kind, bin_s, matrix_log=True):
    """f(x) (..., 2) of a fitted rSLDS, the blended per-regime continuous-time drifts (module docstring)."""
    A = np.asarray(params["dynamics_matrix"])  # (K, D, D)
    M, centres = continuous_time_dynamics(A, params["dynamics_bias"], bin_s)
    if not matrix_log:
        M = (A - np.eye(A.shape[-1])) / bin_s
    transitions = {k: np.asarray(params[k]) for k in transition_site_names(kind, 0)}

    def f(x):
        x = np.asarray(x, float)
        logits = np.asarray(transition_logits(kind, transitions, x)).mean(-2)  # (..., K)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        per_regime = np.einsum("kij,...kj->...ki", M, x[..., None, :] - centres)
        return np.einsum("...k,...ki->...i", weights, per_regime)

    return f, centres


def run_seed(seed, bin_ms, kind, iters, restarts, trials):
    sim = simulate_gpslds_synthetic(seed=seed, num_trials=trials)
    dt = sim["truth"]["dt"]
    steps_per_bin = int(round(bin_ms * 1e-3 / dt))
    y = bin_events(sim["y"], steps_per_bin)
    B, Tb, N = y.shape
    x_true_binned = sim["latents"].reshape(B, Tb, steps_per_bin, 2).mean(2)
    model = RSLDS(2, 2, obs_dim=N, emission="bernoulli", transitions=kind)
    data = model.prepare(y)
    t0 = time.perf_counter()
    params, history = rslds_em(model, data, key=jax.random.PRNGKey(seed), num_iters=iters, num_restarts=restarts)
    wall = time.perf_counter() - t0
    x_hat = np.asarray(params["x"])
    P, o = ga.align_latents(x_hat, x_true_binned)
    cells, visited = ga.visited_cells(sim["latents"], -10.0, 10.0, 20, 20)
    f_true = np.asarray(two_rotation_drift(cells))
    out = {"seed": seed, "bin_ms": bin_ms, "transitions": kind, "latent_r2": affine_aligned_r2(
        x_hat.reshape(-1, 2), x_true_binned.reshape(-1, 2)), "wall_s": wall,
        "objective": float(np.asarray(history["log_likelihoods"])[-1])}
    for label, matrix_log in (("logm", True), ("finite_difference", False)):
        f_hat, centres = continuous_drift(params, kind, bin_ms * 1e-3, matrix_log)
        f = ga.aligned_drift(f_hat, P, o)(cells)
        out[f"dynamics_nmse_visited_{label}"] = ga.dynamics_nmse(f[visited], f_true[visited])
    centres_true = centres @ P.T + o
    truth = np.asarray(sim["truth"]["fixed_points_true"])
    out["regime_fixed_points_true_frame"] = np.round(centres_true, 3).tolist()
    out["fixed_point_distances"] = [float(np.min(np.linalg.norm(centres_true - t, axis=-1))) for t in truth]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--bin-ms", type=float, default=20.0)
    parser.add_argument("--transitions", choices=["recurrent_only", "recurrent"], default="recurrent_only")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    for seed in args.seeds:
        r = run_seed(seed, args.bin_ms, args.transitions, args.iters, args.restarts, args.trials)
        print(f"[rslds] seed {seed} bin {r['bin_ms']:g} ms {r['transitions']}: latent R2 {r['latent_r2']:.3f}; dynamics NMSE "
              f"(visited) {r['dynamics_nmse_visited_logm']:.4f} (finite differences "
              f"{r['dynamics_nmse_visited_finite_difference']:.4f}); regime fixed points {r['regime_fixed_points_true_frame']}, "
              f"distance to the true ones {np.round(r['fixed_point_distances'], 3).tolist()}; objective {r['objective']:.1f}; "
              f"EM wall {r['wall_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
