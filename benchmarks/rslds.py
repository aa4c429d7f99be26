"""rSLDS benchmarks: NASCAR (T = 10,000) and Lorenz with Bernoulli neurons, by the fast path (Laplace EM).

NASCAR (:mod:`ppl_switch.datasets.rslds_nascar`): state accuracy after permutation matching, latent R²
after affine alignment, the rotation regimes' fixed points mapped to the true latent space by that
alignment (distance to (+-2, 0)), wall time including compilation.
Lorenz (:mod:`ppl_switch.datasets.lorenz`, K = 2, D = 3, 100 neurons, t in [750, 850) hidden):
correlation of the fitted firing probabilities sigmoid(C x + d) with the true ones inside the hidden
block and elsewhere, and the two-regime segmentation against the lobes.

The NASCAR fit is the user's default path, ``fit_em(model, y, seed=seed)`` (the model's default
iterations and starts unless ``--iters`` / ``--restarts`` are given), float32 unless ``--x64``; the
tutorial (tutorials/rslds_nascar.py) runs the same call on the same data, so the two print the same numbers.

Usage:
    python benchmarks/rslds.py --which nascar                  # the default path, float32, T = 10000
    python benchmarks/rslds.py --which nascar --noise 0.01 0.1 1 --seeds 0 1 2 --T 3000 --x64
    python benchmarks/rslds.py --which lorenz --T 10000 --iters 50 --restarts 2
Prints one JSON line per fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ppl_switch.analysis.fixed_points import fixed_points  # noqa: E402
from ppl_switch.analysis.metrics import affine_align, affine_aligned_r2, matched_state_accuracy  # noqa: E402
from ppl_switch.datasets.lorenz import simulate_lorenz_bernoulli  # noqa: E402
from ppl_switch.datasets.nascar import nascar as relaxed_nascar  # noqa: E402
from ppl_switch.datasets.rslds_nascar import simulate_reference_nascar, simulate_rslds_nascar  # noqa: E402
from ppl_switch.infer import fit_em  # noqa: E402
from ppl_switch.infer.rslds_em import rslds_em  # noqa: E402
from ppl_switch.models.rslds import RSLDS  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402


def _matching(true_states, inferred, K):
    confusion = np.zeros((K, K))
    np.add.at(confusion, (inferred, true_states), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return dict(zip(rows, cols))  # inferred -> true


def _simulate(track: str, seed: int, T: int, noise):
    """(y (1, T, N), states (T,), latents (T, 2), true fixed points of the turns (2, 2)) of one track."""
    if track == "lane":
        d = simulate_rslds_nascar(seed=seed, num_timesteps=T, **({} if noise is None else {"emission_noise": noise}))
    elif track == "reference":
        d = simulate_reference_nascar(seed=seed, num_timesteps=T, **({} if noise is None else {"emission_noise": noise}))
    else:  # the relaxed-state track of the GDM paper, observation noise sd 0.01 by default
        r = relaxed_nascar(seed, num_timesteps=T, obs_dim=10, **({} if noise is None else {"noise_std": noise}))
        d = {"y": r.y[None], "states": r.states[None], "latents": r.latents[None], "params": r.params}
    return d["y"], d["states"][0], d["latents"][0], np.asarray(d["params"]["fixed_points"])[:2]


def nascar(T: int, iters, restarts, seed: int, track: str = "lane", noise=None, x64: bool = False) -> dict:
    y, z_true, x_true, centres = _simulate(track, seed, T, noise)
    transitions = "recurrent" if track == "relaxed" else "recurrent_only"  # relaxed: the CLI's default form
    model = RSLDS(4, 2, obs_dim=y.shape[-1], transitions=transitions)
    kw = {k: v for k, v in (("num_iters", iters), ("num_restarts", restarts)) if v is not None}
    t0, c0 = time.perf_counter(), time.process_time()
    fit = fit_em(model, y, seed=seed, x64=x64, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out, hist = fit.params, fit.diagnostics
    finite = all(np.all(np.isfinite(v)) for v in out.values())
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
            errors[f"regime {k_true} (centre {centres[k_true].tolist()})"] = float(np.linalg.norm(fp_true_space[k_hat] - centres[k_true]))
    trace = hist["log_likelihoods"]
    return {"benchmark": "nascar", "track": track, "noise": noise, "x64": x64, "T": T, "seed": seed, "iters": iters or "default",
            "restarts": restarts or "default", "finite": finite, "state_accuracy": acc, "latent_r2": r2,
            "fixed_point_errors": errors, "iterations_run": int(hist.get("num_iterations", len(trace) - 1)),
            "failed_starts": len(hist.get("failed_starts", [])), "wall_s_incl_compile": round(wall, 1), "cpu_s": round(cpu, 1),
            "objective_non_decreasing": bool(np.all(np.diff(trace) >= -1e-5 * np.abs(trace).max()))}


def lorenz(T: int, iters: int, restarts: int, seed: int) -> dict:
    d = simulate_lorenz_bernoulli(seed=seed, num_timesteps=T)
    model = RSLDS(2, 3, obs_dim=100, emission="bernoulli", transitions="recurrent")
    data = model.prepare(d["y"], mask=d["mask"])
    t0 = time.perf_counter()
    out, hist = rslds_em(model, data, key=jax.random.PRNGKey(seed), num_iters=iters, num_restarts=restarts)
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
    ap.add_argument("--iters", type=int, default=None, help="default: the model's (NASCAR); 50 for Lorenz")
    ap.add_argument("--restarts", type=int, default=None, help="default: the model's (NASCAR); 2 for Lorenz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--track", default="lane", choices=["lane", "reference", "relaxed"],
                    help="NASCAR generator: lane (datasets.rslds_nascar), reference (the rSLDS authors' recipe), "
                         "relaxed (datasets.nascar, the GDM paper's track, observation sd 0.01)")
    ap.add_argument("--noise", type=float, nargs="+", default=[None], help="observation noise sd (default: the track's)")
    ap.add_argument("--x64", action="store_true", help="fit in float64 (default float32, as users run)")
    args = ap.parse_args(argv)
    for name in args.which:
        for seed in args.seeds:
            if name == "lorenz":
                jax.config.update("jax_enable_x64", True)
                result = lorenz(args.T, args.iters or 50, args.restarts or 2, seed)
                print(json.dumps(result), flush=True)
                continue
            for noise in args.noise:
                print(json.dumps(nascar(args.T, args.iters, args.restarts, seed, args.track, noise, args.x64)), flush=True)


if __name__ == "__main__":
    main()
