"""CLDS benchmarks on the synthetic head-direction ring attractor (Geadah et al. 2025, §3.2).

    python benchmarks/clds.py ring          # EM fit: co-smoothing R^2, A/b/fixed-point/eigenvalue recovery
    python benchmarks/clds.py speed         # 200 EM iterations, wall time after compilation (float32, float64)
    python benchmarks/clds.py bands         # NUTS posterior: credible bands of fixed points and eigenvalues
    python benchmarks/clds.py efficiency    # co-smoothing and forecasting vs trials per condition, CLDS vs LDS + B u
    python benchmarks/clds.py efficiency --regimes short --baselines lds_additive_inputs clds_flexible
    python benchmarks/clds.py poisson --trials 20 --timesteps 50 --seeds 2   # spike counts, SVI + path guide

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
    from ppl_switch.infer.clds_em import run_clds_em

    d, tr, te = ring_split(args.seed)
    model = ring_model(d["truth"]["emission_matrix"])
    train = model.prepare(d["y"][tr], inputs=d["inputs"][tr])
    test = model.prepare(d["y"][te], inputs=d["inputs"][te])
    out = run_clds_em(model, train, num_iters=args.iters, seed=args.seed)
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
    from ppl_switch.infer.clds_em import run_clds_em

    res = {"benchmark": "speed", "iters": args.iters, "cpu_count": os.cpu_count()}
    for x64 in (False, True):
        _x64(x64)
        d, tr, _ = ring_split(args.seed)
        model = ring_model(d["truth"]["emission_matrix"])
        train = model.prepare(d["y"][tr], inputs=d["inputs"][tr])
        cpu0 = time.process_time()
        out = run_clds_em(model, train, num_iters=args.iters, seed=args.seed)
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
    from ppl_switch.analysis.clds_analysis import band_coverage, credible_band, fixed_points, over_draws
    from ppl_switch.datasets.head_direction import ring_dynamics, ring_fixed_points, simulate_head_direction
    from ppl_switch.infer import fit_nuts
    from ppl_switch.infer.clds_em import run_clds_em

    d = simulate_head_direction(seed=args.seed, num_trials=args.trials, num_timesteps=args.timesteps)
    model = ring_model(d["truth"]["emission_matrix"])
    data = model.prepare(d["y"], inputs=d["inputs"])
    em = run_clds_em(model, data, num_iters=100, seed=args.seed)
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


#: data regimes of the efficiency benchmark. "paper": the notes' synthetic recipe (T = 100, observation
#: noise sd 0.2), where the 9 held-in neurons pin the 2-D latent down almost exactly. "weak": short trials
#: (T = 30) and noisy neurons (sd 1.0), so that inferring x_t needs the dynamics prior and 1 trial per
#: condition is little data. "short": the paper's noise with T = 10, so that 1 trial per condition is
#: 144 transitions for ~70 dynamics weights (added after the first two showed flat curves, to probe
#: genuinely scarce data; all three are reported).
REGIMES = {
    "paper": {"num_timesteps": 100, "emission_noise_scale": 0.2},
    "weak": {"num_timesteps": 30, "emission_noise_scale": 1.0},
    "short": {"num_timesteps": 10, "emission_noise_scale": 0.2},
}


def condition_data(seed: int, trials_per_condition: int, num_conditions: int = 16, num_timesteps: int = 100,
                   num_test_per_condition: int = 4, emission_noise_scale: float = 0.2):
    """Head-direction trials grouped by condition: condition c is one fixed theta path (a random walk
    from angle 2 pi c / num_conditions) repeated over its trials with fresh latent and observation noise.
    Returns ((y, u) train, (y, u) test, C) with u = [theta, cos theta, sin theta]."""
    from ppl_switch.datasets.head_direction import head_direction_paths, simulate_head_direction

    rng = np.random.default_rng(1000 + seed)
    paths = head_direction_paths(rng, num_conditions, num_timesteps)
    paths = np.mod(paths - paths[:, :1] + 2 * math.pi * np.arange(num_conditions)[:, None] / num_conditions, 2 * math.pi)
    C = rng.standard_normal((10, 2))

    def make(n, s):
        theta = np.repeat(paths, n, axis=0)
        d = simulate_head_direction(seed=s, num_trials=len(theta), num_timesteps=num_timesteps, theta=theta,
                                    emission_matrix=C, emission_noise_scale=emission_noise_scale)
        return d["y"], np.concatenate([d["inputs"], np.cos(d["inputs"]), np.sin(d["inputs"])], -1)

    return make(trials_per_condition, 2 * seed), make(num_test_per_condition, 2 * seed + 1), C


def ring_truth_params(model, C, emission_noise_scale: float, noise_scale: float = 0.2, initial_var: float = 0.2):
    """The true ring attractor as parameters of ``model`` (a CLDS whose A, b, m use one Fourier basis on
    input column 0 and whose C is fixed to the truth): weights by least squares on a dense theta grid
    (exact: A(theta) has frequencies 0 and 2, b and m frequency 1, all inside the basis)."""
    import jax.numpy as jnp

    from ppl_switch.datasets.head_direction import ring_dynamics

    grid = np.linspace(0, 2 * math.pi, 200, endpoint=False)
    u = np.zeros((len(grid), model.input_dim))
    u[:, 0] = grid
    A, b = ring_dynamics(grid)
    params = {}
    for name, target in (("A", A), ("b", b), ("m", b)):
        phi = np.asarray(model.bases[name](jnp.asarray(u)))
        W, *_ = np.linalg.lstsq(phi, target.reshape(len(grid), -1), rcond=None)
        if np.abs(phi @ W - target.reshape(len(grid), -1)).max() > 1e-6:
            raise ValueError(f"the basis of {name} cannot represent the ring's {name}(theta)")
        params[f"W_{name}"] = W.reshape((-1,) + target.shape[1:])
    D, N = 2, C.shape[0]
    params.update(dynamics_scale=np.full(D, noise_scale), dynamics_corr_chol=np.eye(D),
                  initial_scale=np.full(D, math.sqrt(initial_var)), initial_corr_chol=np.eye(D),
                  emission_scale=np.full(N, emission_noise_scale))
    return params


def bench_efficiency(args):
    """Co-smoothing and causal (forecast) co-smoothing on held-out trials vs training trials per
    condition: CLDS vs an LDS with additive inputs, both fitted by the same EM and both learning C; plus
    the true parameters as a ceiling."""
    _x64(True)
    from ppl_switch.analysis.clds_analysis import co_smoothing, forecast_co_smoothing
    from ppl_switch.infer.clds_em import run_clds_em
    from ppl_switch.models.clds import CLDS
    from ppl_switch.ops.basis import FourierBasis, LinearBasis

    basis = FourierBasis(5, 0.5, 0.1, columns=(0,))
    # inputs columns: [theta, cos theta, sin theta]
    candidates = {
        "clds": CLDS(latent_dim=2, obs_dim=10, input_dim=3, basis=basis),
        # LDS with additive inputs: constant A, C, m; b(u) = b0 + B [cos theta, sin theta] (linear kernel)
        "lds_additive_inputs": CLDS(latent_dim=2, obs_dim=10, input_dim=3, varying=(),
                                    bases={"b": LinearBasis(columns=(1, 2))}),
        # the same conditionally linear model with the smoothness prior taken away: 23 Fourier features
        # (frequencies 0..11) with a nearly flat, weak prior (length-scale 0.01 of the circle, sd 5), so
        # nearby conditions share almost nothing -- the flexible end that the GP prior regularises
        "clds_flexible": CLDS(latent_dim=2, obs_dim=10, input_dim=3,
                              basis=FourierBasis(12, 5.0, 0.01, columns=(0,))),
    }
    models = {name: candidates[name] for name in ["clds", *args.baselines]}
    horizons = (0, 1, 5)
    rows = []

    def evaluate(name, model, params, test, regime, n, seed):
        cs = co_smoothing(model, params, test)
        fc = forecast_co_smoothing(model, params, test, horizons=horizons, held_out=cs["held_out"])
        ll = float(np.asarray(model.trial_log_likelihoods(params, test)).sum() / np.asarray(test.mask).sum())
        row = {"regime": regime, "model": name, "trials_per_condition": n, "seed": seed,
               "co_smoothing_r2": cs["mean_r2"], **{f"forecast_r2_k{k}": fc["mean_r2"][k] for k in horizons},
               "test_loglik_per_entry": ll}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    for regime in args.regimes:
        cfg = REGIMES[regime]
        for seed in range(args.seeds):
            for n in args.trials_per_condition:
                (ytr, utr), (yte, ute), C = condition_data(seed, n, **cfg)
                for name, model in models.items():
                    train = model.prepare(ytr, inputs=utr)
                    test = model.prepare(yte, inputs=ute)
                    out = run_clds_em(model, train, num_iters=args.iters, seed=seed)
                    evaluate(name, model, out["params"], test, regime, n, seed)
            # the truth does not depend on the training set: one ceiling row per seed
            oracle = CLDS(latent_dim=2, obs_dim=10, input_dim=3, basis=basis, fixed={"C": C})
            truth = ring_truth_params(oracle, C, cfg["emission_noise_scale"])
            evaluate("true_parameters", oracle, truth, oracle.prepare(yte, inputs=ute), regime, 0, seed)

    return {"benchmark": "efficiency", "iters": args.iters, "seeds": args.seeds,
            "regimes": {r: REGIMES[r] for r in args.regimes}, "summary": summarise_efficiency(rows), "runs": rows}


def summarise_efficiency(rows):
    """Mean and sd over seeds of every metric per (regime, model, trials per condition), and the paired
    difference CLDS - baseline (same data, same seed) -- the comparison that the seed-to-seed spread of the
    data does not blur."""
    metrics = [k for k in rows[0] if k.startswith(("co_smoothing", "forecast", "test_loglik"))]
    stat = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v))}  # noqa: E731
    summary = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        for name in dict.fromkeys(r["model"] for r in rows):
            for n in sorted({r["trials_per_condition"] for r in rows if r["model"] == name}):
                sel = [r for r in rows
                       if r["regime"] == regime and r["model"] == name and r["trials_per_condition"] == n]
                if sel:
                    summary[f"{regime}/{name}@{n}"] = {m: stat([r[m] for r in sel]) for m in metrics}
        baselines = [m for m in dict.fromkeys(r["model"] for r in rows) if m not in ("clds", "true_parameters")]
        for baseline in baselines:
            for n in sorted({r["trials_per_condition"] for r in rows if r["model"] == "clds"}):
                pair = {r["seed"]: r for r in rows if r["regime"] == regime and r["model"] == baseline
                        and r["trials_per_condition"] == n}
                diffs = [(r, pair[r["seed"]]) for r in rows if r["regime"] == regime and r["model"] == "clds"
                         and r["trials_per_condition"] == n and r["seed"] in pair]
                if diffs:
                    summary[f"{regime}/clds_minus_{baseline}@{n}"] = {
                        m: stat([a[m] - b[m] for a, b in diffs]) for m in metrics}
    return summary


def bench_poisson(args):
    """Poisson CLDS on spike counts from the ring attractor: SVI with the Gauss–Markov path guide."""
    from ppl_switch.analysis.clds_analysis import co_smoothing, fixed_points, r2_score
    from ppl_switch.datasets.head_direction import simulate_head_direction
    from ppl_switch.infer import fit_svi
    from ppl_switch.infer.starts import data_driven_guide
    from ppl_switch.guides.path_guide import CLDSPathGuide
    from ppl_switch.models.clds import CLDS
    from ppl_switch.ops.basis import FourierBasis

    def affine_r2(x_hat, x):
        X = np.concatenate([x_hat.reshape(-1, x_hat.shape[-1]), np.ones((x_hat[..., 0].size, 1))], 1)
        Y = x.reshape(-1, x.shape[-1])
        W = np.linalg.lstsq(X, Y, rcond=None)[0]
        return float(1 - ((Y - X @ W) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())

    K, T, K_test = args.trials, args.timesteps, 10
    runs = []
    for seed in range(args.seeds):
        d = simulate_head_direction(seed=seed, num_trials=K + K_test, num_timesteps=T, emission="poisson")
        model = CLDS(latent_dim=2, obs_dim=10, input_dim=1, basis=FourierBasis(5, 0.5, 0.1), emission="poisson")
        data = model.prepare(d["y"][:K], inputs=d["inputs"][:K])
        test = model.prepare(d["y"][K:], inputs=d["inputs"][K:])
        truth_x = d["latents"][:K]
        z = np.log(d["y"][:K] + 0.5).reshape(-1, 10)
        z = z - z.mean(0)
        pca = (z @ np.linalg.svd(z, full_matrices=False)[2][:2].T).reshape(K, T, 2)
        t0 = time.perf_counter()
        guide = data_driven_guide(model, data)  # ppl_switch.fit's start: Gaussian EM on log counts + Laplace
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit = fit_svi(model, data, guide=guide, num_steps=args.steps, learning_rate=0.01, num_draws=50, seed=seed,
                      progress_bar=False)
        t_svi = time.perf_counter() - t0
        x_q = np.asarray(CLDSPathGuide.path_means(fit.params, data))
        post = {k: np.asarray(v).mean((0, 1)) for k, v in fit.samples.items() if k != "x"}
        grid = np.linspace(0, 2 * math.pi, 100)
        eig = np.sort(np.asarray(fixed_points(model, post, grid[:, None])["eigenvalues"]).real, -1)
        cs = co_smoothing(model, post, test)
        true_rate = 2.0 * np.exp(d["latents"][K:] @ d["truth"]["emission_matrix"].T)
        ceiling = r2_score(d["y"][K:][..., cs["held_out"]], true_rate[..., cs["held_out"]], axis=(0, 1))
        runs.append({
            "seed": seed,
            "mean_count": float(d["y"][:K].mean()),
            "latent_affine_r2_pca_log_counts": affine_r2(pca, truth_x),
            "latent_affine_r2_start": affine_r2(guide.init_values["x"], truth_x),
            "latent_affine_r2_svi": affine_r2(x_q, truth_x),
            "eigenvalue_low_range": [float(eig[:, 0].min()), float(eig[:, 0].max())],
            "eigenvalue_high_range": [float(eig[:, 1].min()), float(eig[:, 1].max())],
            "co_smoothing_r2_counts": cs["mean_r2"],
            "co_smoothing_r2_true_rates_ceiling": float(np.mean(ceiling)),
            "start_seconds": t_init,
            "svi_seconds": t_svi,
        })
        print(json.dumps(runs[-1]), file=sys.stderr)
    return {"benchmark": "poisson", "trials": K, "test_trials": K_test, "timesteps": T, "steps": args.steps,
            "runs": runs, "load_average": os.getloadavg()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["ring", "speed", "bands", "efficiency", "poisson"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials-per-condition", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--baselines", nargs="+", choices=["lds_additive_inputs", "clds_flexible"],
                        default=["lds_additive_inputs"], help="models compared with the CLDS (efficiency)")
    parser.add_argument("--steps", type=int, default=1000, help="SVI steps (poisson)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    res = {"ring": bench_ring, "speed": bench_speed, "bands": bench_bands, "efficiency": bench_efficiency,
           "poisson": bench_poisson}[args.which](args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return res


if __name__ == "__main__":
    main()
