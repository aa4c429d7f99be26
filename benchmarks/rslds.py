"""rSLDS benchmarks: NASCAR (T = 10,000) and Lorenz with Bernoulli neurons, by the fast path (Laplace EM).

NASCAR (:mod:`ppl_switch.datasets.rslds_nascar`): state accuracy after permutation matching, latent R²
after affine alignment, the rotation regimes' fixed points mapped to the true latent space by that
alignment (distance to (+-2, 0)), wall time including compilation.
Lorenz (:mod:`ppl_switch.datasets.lorenz`, K = 2, D = 3, 100 neurons, t in [750, 850) hidden):
correlation of the fitted firing probabilities sigmoid(C x + d) with the true ones inside the hidden
block and elsewhere, and the two-regime segmentation against the lobes.

Usage:
    python benchmarks/rslds.py                       # both, T = 10000
    python benchmarks/rslds.py --which nascar --T 2000 --iters 50 --restarts 3
Prints one JSON line per benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from ppl_switch.analysis.fixed_points import fixed_points  # noqa: E402
from ppl_switch.analysis.metrics import affine_align, affine_aligned_r2, matched_state_accuracy  # noqa: E402
from ppl_switch.datasets.lorenz import simulate_lorenz_bernoulli  # noqa: E402
from ppl_switch.datasets.rslds_nascar import simulate_rslds_nascar  # noqa: E402
from ppl_switch.models.rslds import RSLDS  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402


def _matching(true_states, inferred, K):
    confusion = np.zeros((K, K))
    np.add.at(confusion, (inferred, true_states), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return dict(zip(rows, cols))  # inferred -> true


def nascar(T: int, iters: int, restarts: int, seed: int) -> dict:
    d = simulate_rslds_nascar(seed=seed, num_timesteps=T)
    model = RSLDS(4, 2, obs_dim=10, transitions="recurrent_only")
    data = model.prepare(d["y"])
    t0 = time.perf_counter()
    out, hist = model.em(data, key=jax.random.PRNGKey(seed), num_iters=iters, num_restarts=restarts)
    wall = time.perf_counter() - t0
    z_true, x_true = d["states"][0], d["latents"][0]
    z_hat = out["q_state_probs"][0].argmax(-1)
    acc = matched_state_accuracy(z_true, z_hat, 4)
    r2 = affine_aligned_r2(out["x"][0], x_true)
    _, coef = affine_align(out["x"][0], x_true)  # x_true ~ [x_hat, 1] @ coef
    fp, eig = fixed_points(out["dynamics_matrix"], out["dynamics_bias"])
    fp_true_space = np.concatenate([fp, np.ones((4, 1))], 1) @ coef
    match = _matching(z_true, z_hat, 4)
    errors = {}
    for k_hat, k_true in match.items():
        if k_true in (0, 1):
            errors[f"regime {k_true} (centre {d['params']['fixed_points'][k_true].tolist()})"] = float(
                np.linalg.norm(fp_true_space[k_hat] - d["params"]["fixed_points"][k_true]))
    trace = hist["log_likelihoods"]
    return {"benchmark": "nascar", "T": T, "iters": iters, "restarts": restarts, "state_accuracy": acc, "latent_r2": r2,
            "fixed_point_errors": errors, "wall_s_incl_compile": wall,
            "objective_non_decreasing": bool(np.all(np.diff(trace) >= -1e-8 * np.abs(trace).max()))}


def lorenz(T: int, iters: int, restarts: int, seed: int) -> dict:
    d = simulate_lorenz_bernoulli(seed=seed, num_timesteps=T)
    model = RSLDS(2, 3, obs_dim=100, emission="bernoulli", transitions="recurrent")
    data = model.prepare(d["y"], mask=d["mask"])
    t0 = time.perf_counter()
    out, hist = model.em(data, key=jax.random.PRNGKey(seed), num_iters=iters, num_restarts=restarts)
    wall = time.perf_counter() - t0
    prob_hat = np.asarray(model.firing_probabilities(out))[0]
    prob = d["params"]["firing_probs"]
    hidden = ~d["mask"][0].any(-1)
    corr = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    trace = hist["log_likelihoods"]
    return {"benchmark": "lorenz", "T": T, "iters": iters, "restarts": restarts,
            "firing_prob_corr_hidden_block": corr(prob_hat[hidden], prob[hidden]) if hidden.any() else None,
            "firing_prob_corr_observed": corr(prob_hat[~hidden], prob[~hidden]),
            "lobe_segmentation_accuracy": matched_state_accuracy(d["states"][0], out["q_state_probs"][0].argmax(-1), 2),
            "latent_r2": affine_aligned_r2(out["x"][0], d["latents"][0]), "wall_s_incl_compile": wall,
            "objective_non_decreasing": bool(np.all(np.diff(trace) >= -1e-8 * np.abs(trace).max()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", nargs="+", default=["nascar", "lorenz"], choices=["nascar", "lorenz"])
    ap.add_argument("--T", type=int, default=10000)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in args.which:
        result = (nascar if name == "nascar" else lorenz)(args.T, args.iters, args.restarts, args.seed)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
