"""CLDS benchmarks on the synthetic head-direction ring attractor (Geadah et al. 2025, §3.2).

    python benchmarks/clds.py ring          # EM fit: co-smoothing R^2, A/b/fixed-point/eigenvalue recovery
    python benchmarks/clds.py speed         # 200 EM iterations, wall time after compilation (float32, float64)
    python benchmarks/clds.py bands         # NUTS posterior: credible bands of fixed points and eigenvalues
    python benchmarks/clds.py efficiency    # co-smoothing vs trials per condition, CLDS vs LDS + B u

Each prints one JSON object (also written to --out if given). Paper numbers: co-smoothing R^2 = 0.86
(one held-out neuron); authors' code: 200 EM iterations in 7 s on their CPU (no runtimes in the paper).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _x64(enable: bool):
    import jax

    jax.config.update("jax_enable_x64", enable)


def ring_split(seed: int = 1, num_trials: int = 100, num_train: int = 80):
    from ppl_switch.datasets.head_direction import simulate_head_direction

    d = simulate_head_direction(seed=seed, num_trials=num_trials)
    return d, slice(0, num_train), slice(num_train, num_trials)


def ring_model(C):
    from ppl_switch.models.clds import CLDS
    from ppl_switch.ops.basis import FourierBasis

    # notes §4.2: L = 9 (N = 5 frequencies), sigma = 0.5, kappa = 0.1; C fixed to its true value
    return CLDS(latent_dim=2, obs_dim=C.shape[0], basis=FourierBasis(5, 0.5, 0.1), fixed={"C": C})


def recovery(model, params, theta_grid):
    """Max errors of A, b against the truth, fixed-point radius/angle, eigenvalue ranges."""
    from ppl_switch.analysis.clds_analysis import fixed_points
    from ppl_switch.datasets.head_direction import ring_dynamics

    fp = fixed_points(model, params, theta_grid[:, None])
    A, b = ring_dynamics(theta_grid)
    x = np.asarray(fp["fixed_points"])
    eig = np.sort(np.asarray(fp["eigenvalues"]).real, -1)
    ang = np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - theta_grid)))
    return {
        "max_abs_A_error": float(np.abs(np.asarray(fp["A"]) - A).max()),
        "max_abs_b_error": float(np.abs(np.asarray(fp["b"]) - b).max()),
        "fixed_point_radius_range": [float(np.linalg.norm(x, axis=-1).min()), float(np.linalg.norm(x, axis=-1).max())],
        "fixed_point_max_angle_error": float(np.abs(ang).max()),
        "eigenvalue_low_range": [float(eig[:, 0].min()), float(eig[:, 0].max())],
        "eigenvalue_high_range": [float(eig[:, 1].min()), float(eig[:, 1].max())],
    }


def bench_ring(args):
    _x64(True)
    from ppl_switch.analysis.clds_analysis import co_smoothing

    d, tr, te = ring_split(args.seed)
    model = ring_model(d["truth"]["emission_matrix"])
    train = model.prepare(d["y"][tr], inputs=d["inputs"][tr])
    test = model.prepare(d["y"][te], inputs=d["inputs"][te])
    out = model.em_params(train, num_iters=args.iters, seed=args.seed)
    J = out["objective"]
    cs = co_smoothing(model, out["params"], test)
    res = {
        "benchmark": "ring",
        "iters": args.iters,
        "objective_first_last": [float(J[0]), float(J[-1])],
        "min_objective_increase": float(np.diff(J).min()),
        "co_smoothing_r2_per_neuron": [round(float(r), 4) for r in cs["r2"]],
        "co_smoothing_mean_r2": cs["mean_r2"],
        "dynamics_cov_diag": np.diag(np.asarray(model.covariances(out["params"])["dynamics_cov"])).tolist(),
        **recovery(model, out["params"], np.linspace(0, 2 * math.pi, 100)),
    }
    return res


def bench_speed(args):
    res = {"benchmark": "speed", "iters": args.iters, "cpu_count": os.cpu_count()}
    for x64 in (False, True):
        _x64(x64)
        d, tr, _ = ring_split(args.seed)
        model = ring_model(d["truth"]["emission_matrix"])
        train = model.prepare(d["y"][tr], inputs=d["inputs"][tr])
        cpu0 = time.process_time()
        out = model.em_params(train, num_iters=args.iters, seed=args.seed)
        key = "float64" if x64 else "float32"
        res[key] = {
            "seconds_after_compile": out["seconds"],
            "compile_seconds": out["compile_seconds"],
            "process_cpu_seconds_total": time.process_time() - cpu0,
            "final_objective": float(out["objective"][-1]),
        }
    try:
        res["load_average"] = os.getloadavg()
    except OSError:
        pass
    return res


def bench_bands(args):
    """NUTS on a small ring (K = 20 trials, T = 50, C fixed), started at the EM estimate."""
    _x64(True)
    import jax

    from ppl_switch.analysis.clds_analysis import band_coverage, credible_band, fixed_points, over_draws
    from ppl_switch.datasets.head_direction import ring_dynamics, ring_fixed_points, simulate_head_direction
    from ppl_switch.infer import fit_nuts

    d = simulate_head_direction(seed=args.seed, num_trials=args.trials, num_timesteps=args.timesteps)
    model = ring_model(d["truth"]["emission_matrix"])
    data = model.prepare(d["y"], inputs=d["inputs"])
    em = model.em_params(data, num_iters=100, seed=args.seed)
    t0 = time.perf_counter()
    fit = fit_nuts(model, data, num_warmup=args.warmup, num_samples=args.samples, num_chains=args.chains,
                   seed=args.seed, x64=True, progress_bar=False,
                   init_params={k: np.asarray(v) for k, v in em["params"].items()})
    seconds = time.perf_counter() - t0
    grid = np.linspace(0, 2 * math.pi, 60)
    draws = over_draws(lambda p: fixed_points(model, p, grid[:, None]), fit.samples)
    flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])  # noqa: E731
    fp = flat(draws["fixed_points"])
    eig = np.sort(flat(draws["eigenvalues"]).real, -1)
    A = flat(draws["A"])
    b = flat(draws["b"])
    A_true, b_true = ring_dynamics(grid)
    lo, hi = credible_band(fp, 0.9)
    elo, ehi = credible_band(eig, 0.9)
    alo, ahi = credible_band(A, 0.9)
    blo, bhi = credible_band(b, 0.9)
    truth_eig = np.tile([0.0, 0.9], (len(grid), 1))
    return {
        "benchmark": "bands",
        "trials": args.trials,
        "timesteps": args.timesteps,
        "chains": args.chains,
        "warmup": args.warmup,
        "samples": args.samples,
        "nuts_seconds": seconds,
        "num_divergences": fit.diagnostics.get("num_divergences"),
        "max_r_hat": fit.diagnostics.get("max_r_hat"),
        "min_ess": fit.diagnostics.get("min_ess"),
        "fixed_point_band_coverage_90": band_coverage(lo, hi, ring_fixed_points(grid)),
        "eigenvalue_band_coverage_90": band_coverage(elo, ehi, truth_eig),
        "A_band_coverage_90": band_coverage(alo, ahi, A_true),
        "b_band_coverage_90": band_coverage(blo, bhi, b_true),
        "fixed_point_band_mean_width": float(np.mean(hi - lo)),
        "eigenvalue_band_mean_width": float(np.mean(ehi - elo)),
    }


def condition_data(seed: int, trials_per_condition: int, num_conditions: int = 16, num_timesteps: int = 100,
                   num_test_per_condition: int = 4):
    """Head-direction trials grouped by condition: condition c is one fixed theta path (a random walk
    from angle 2 pi c / num_conditions) repeated over its trials with fresh latent and observation noise."""
    from ppl_switch.datasets.head_direction import head_direction_paths, simulate_head_direction

    rng = np.random.default_rng(1000 + seed)
    paths = head_direction_paths(rng, num_conditions, num_timesteps)
    paths = np.mod(paths - paths[:, :1] + 2 * math.pi * np.arange(num_conditions)[:, None] / num_conditions, 2 * math.pi)
    C = rng.standard_normal((10, 2))

    def make(n, s):
        theta = np.repeat(paths, n, axis=0)
        d = simulate_head_direction(seed=s, num_trials=len(theta), num_timesteps=num_timesteps, theta=theta,
                                    emission_matrix=C)
        return d["y"], np.concatenate([d["inputs"], np.cos(d["inputs"]), np.sin(d["inputs"])], -1)

    return make(trials_per_condition, 2 * seed), make(num_test_per_condition, 2 * seed + 1)


def bench_efficiency(args):
    """Co-smoothing R^2 on held-out trials vs training trials per condition (both models learn C)."""
    _x64(True)
    from ppl_switch.analysis.clds_analysis import co_smoothing
    from ppl_switch.models.clds import CLDS
    from ppl_switch.ops.basis import FourierBasis, LinearBasis

    # inputs columns: [theta, cos theta, sin theta]
    models = {
        "clds": CLDS(latent_dim=2, obs_dim=10, input_dim=3, basis=FourierBasis(5, 0.5, 0.1, columns=(0,))),
        # LDS with additive inputs: constant A, C, m; b(u) = b0 + B [cos theta, sin theta] (linear kernel)
        "lds_additive_inputs": CLDS(latent_dim=2, obs_dim=10, input_dim=3, varying=(),
                                    bases={"b": LinearBasis(columns=(1, 2))}),
    }
    rows = []
    for n in args.trials_per_condition:
        for seed in range(args.seeds):
            (ytr, utr), (yte, ute) = condition_data(seed, n)
            for name, model in models.items():
                train = model.prepare(ytr, inputs=utr)
                test = model.prepare(yte, inputs=ute)
                out = model.em_params(train, num_iters=args.iters, seed=seed)
                r2 = co_smoothing(model, out["params"], test)["mean_r2"]
                rows.append({"model": name, "trials_per_condition": n, "seed": seed, "co_smoothing_r2": r2})
                print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {}
    for name in models:
        for n in args.trials_per_condition:
            vals = [r["co_smoothing_r2"] for r in rows if r["model"] == name and r["trials_per_condition"] == n]
            summary[f"{name}@{n}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return {"benchmark": "efficiency", "iters": args.iters, "seeds": args.seeds, "summary": summary, "runs": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["ring", "speed", "bands", "efficiency"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials-per-condition", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    res = {"ring": bench_ring, "speed": bench_speed, "bands": bench_bands, "efficiency": bench_efficiency}[args.which](args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return res


if __name__ == "__main__":
    main()
