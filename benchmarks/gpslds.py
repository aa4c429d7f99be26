"""gpSLDS synthetic benchmarks (Hu et al. 2024, Sec. 4.1 and App. D): fit, then print the target metrics.

    python benchmarks/gpslds.py                      # two rotations: gpSLDS and the RBF GP-SDE baseline
    python benchmarks/gpslds.py --limit-cycle --latent-scales 1.5 3   # App. D limit cycle, quadratic features
    GPSLDS_STEPS=300 python benchmarks/gpslds.py     # a shorter run
    python benchmarks/gpslds.py --weights conjugate --seed 1 --no-baseline
                                                     # A, e integrated out in closed form; data + SVI seed 1
    python benchmarks/gpslds.py --seed 0 --no-baseline --latent-scales 2 --refine-rounds 1
                                                     # SVI, MAP path given the fitted parameters, SVI again
    python benchmarks/gpslds.py --seed 0 --no-baseline --latent-scales 2 --refine-rounds 2 --refine-path-lr 0.002
                                                     # the same with Adam step 0.002 for the mean path
    python benchmarks/gpslds.py --seed 0 --no-baseline --latent-scales 2 --refine-rounds 2 --joint-laplace
                                                     # + fixed points with the path integrated out (Laplace)
    python benchmarks/gpslds.py --seed 0 --no-baseline --latent-scales 2 --refine-rounds 2 --path-gibbs
                                                     # + fixed points from p(x, theta | y), Metropolis-within-Gibbs

Metrics (all after affine alignment of the posterior-mean latents to the true latents):
latent R² (``affine_aligned_r2``); normalised dynamics MSE sum|f_hat - f|^2 / sum|f|^2 on the 20x20 cells
of [-10, 10]^2 the true latents visit >= 20 times; recovered fixed points (clusters of per-draw Newton
roots) vs the true (+-3.003, 0.0005) and whether their 94% credible ellipses contain them, also in the frame
the readouts imply, with per-draw path frames and with weights imputed from each path draw
(``joint_draw_report``) and, with ``--joint-laplace``, from the joint Laplace approximation (``joint_laplace_report``),
with ``--path-gibbs`` from p(x, theta | y) sampled by Metropolis-within-Gibbs (``path_gibbs_report``, in the frame of
the chain's own mean path); posterior variance of f on visited vs unvisited cells; the partition's sharpness in the true frame and
the tau the true and the fitted paths support (``partition_report``); wall time. Nothing is
written to results.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ppl_switch.analysis import gpslds_analysis as ga  # noqa: E402
from ppl_switch.analysis.metrics import affine_aligned_r2  # noqa: E402
from ppl_switch.datasets.gpslds_synthetic import (  # noqa: E402
    limit_cycle_drift,
    simulate_gpslds_limit_cycle,
    simulate_gpslds_synthetic,
    two_rotation_drift,
)
from ppl_switch.infer import fit_svi  # noqa: E402
from ppl_switch.infer.path_refinement import fit_svi_with_path_refinement  # noqa: E402
from ppl_switch.models.gpslds import GPSDE, GPSLDS  # noqa: E402
from ppl_switch.results import credible_interval_convention  # noqa: E402


def fit_model(model, y, steps, lr, seed, num_draws=20, weights=None, latent_scales=(3.0,), global_affine=False,
              refine_rounds=0, refine_steps=500, refine_path_lr=None):
    """Fit from the data-driven path start at each start scale (sd of the start path); keep the lowest
    final loss (mean of the last 100 steps), like the paper's restarts. Parameters start at prior medians
    (see LatentSDEGuide; the full data-driven start measured worse on seed 0: NMSE 0.121 against 0.090).
    ``refine_rounds`` > 0: each start runs ``fit_svi_with_path_refinement`` (joint guide only)."""
    data = model.prepare(y)
    best = None
    t0 = time.perf_counter()
    if refine_rounds and (weights not in (None, "joint") or global_affine):
        raise ValueError("--refine-rounds: supported with the joint guide only (no --weights conjugate, no --global-affine)")
    for scale in latent_scales:
        if refine_rounds:
            fit, guide, history = fit_svi_with_path_refinement(
                model, data, num_steps=steps, refine_steps=refine_steps, num_rounds=refine_rounds, learning_rate=lr,
                path_learning_rate=refine_path_lr,
                latent_scale=scale, seed=seed, num_draws=num_draws)
            for h in history:
                print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items()))
        else:
            guide = model.default_guide(data, latent_scale=scale, global_affine=global_affine,
                                        **({} if weights is None else {"weights": weights}))
            fit = fit_svi(model, data, guide=guide, num_steps=steps, learning_rate=lr, seed=seed, num_draws=num_draws,
                          progress_bar=False)
        loss = float(np.mean(np.asarray(fit.losses)[-100:]))
        if len(latent_scales) > 1:
            print(f"  start scale {scale}: final loss {loss:.1f}")
        if best is None or loss < best[0]:
            best = (loss, fit, guide)
    wall = time.perf_counter() - t0
    _, fit, guide = best
    extra = guide.sample_parameters(jax.random.PRNGKey(seed + 1), fit.params, 200, data=data)
    return fit, extra, wall, guide


def evaluate(name, fit, extra, truth_x, true_drift, lo=-10.0, hi=10.0, alignment=None):
    """Latent R², dynamics NMSE on visited cells and var f, in the true frame: by default the affine map
    regressed from the posterior mean path to the true one; ``alignment=(P, o)`` uses that map instead."""
    model = fit.model
    x_hat = np.asarray(fit.samples["x"])[0].mean(0)  # (B, T, K) posterior mean path
    r2 = affine_aligned_r2(x_hat.reshape(-1, 2), truth_x.reshape(-1, 2))
    P, o = ga.align_latents(x_hat, truth_x) if alignment is None else alignment
    Pinv = np.linalg.inv(P)
    cells, visited = ga.visited_cells(truth_x, lo, hi, 20, 20)
    z = (cells - o) @ Pinv.T  # cell centres in the model's coordinates
    f_draws = ga.drift_draws(model, extra, z) @ P.T  # (S, G, K) in true coordinates
    f_true = np.asarray(true_drift(cells))
    nmse = ga.dynamics_nmse(f_draws.mean(0)[visited], f_true[visited])
    var = f_draws.var(0).sum(-1)
    ll = fit.idata.log_likelihood  # per draw, conditional on the draw's path: E_q log p(y | x, theta)
    expected_ll = sum(float(ll[v].values.reshape(-1, int(np.prod(ll[v].shape[2:]))).sum(-1).mean()) for v in ll.data_vars)
    out = {"name": name, "latent_r2": r2, "dynamics_nmse_visited": nmse, "expected_log_lik": expected_ll,
           "kl": expected_ll + float(fit.losses[-1]),  # ELBO = E_q log p(y | .) - KL, loss = -ELBO
           "var_f_visited": float(var[visited].mean()), "var_f_unvisited": float(var[~visited].mean()),
           "final_loss": float(fit.losses[-1]), "P": P, "o": o, "extra": extra, "mean_path": x_hat}
    return out


def fixed_point_report(model, extra, P, o, truth_points, lo=-8.0, hi=8.0, per_draw=None):
    """Fixed points of every draw in ``extra``, carried to the true frame by (P, o), or by each draw's own
    map when ``per_draw=(P_s (S, K, K), o_s (S, K))`` is given (alignment uncertainty enters the ellipses)."""
    Pinv = np.linalg.inv(P)
    starts_true, _ = ga.grid_points(lo, hi, 6)
    starts = (starts_true - o) @ Pinv.T
    corners = (np.array([[lo, lo], [lo, hi], [hi, lo], [hi, hi]]) - o) @ Pinv.T
    fp = ga.fixed_points(model, extra, starts, region=(corners.min(0), corners.max(0)))
    if per_draw is None:
        pts = fp["points"] @ P.T + o  # true coordinates (NaN stays NaN)
    else:
        pts = np.einsum("skj,smj->smk", per_draw[0], fp["points"]) + per_draw[1][:, None, :]
    inside = np.all((pts >= lo) & (pts <= hi), -1)
    pts = np.where(inside[..., None], pts, np.nan)
    regions = ga.fixed_point_regions(pts)
    rows = []
    for xt in truth_points:
        if not regions:
            rows.append({"true": xt, "found": False})
            continue
        best = min(regions, key=lambda r: np.linalg.norm(r["mean"] - xt))
        rows.append({"true": xt, "found": True, "mean": best["mean"], "distance": float(np.linalg.norm(best["mean"] - xt)),
                     "in_ellipse": ga.in_credible_ellipse(best, xt), "level": ga.credible_level(best, xt),
                     "fraction_of_draws": best["fraction"],
                     "sd": np.sqrt(np.diag(best["cov"]))})
    types = {}
    for s in fp["stability"].ravel():
        if s:
            types[s] = types.get(s, 0) + 1
    return rows, regions, types


def path_offset_near(mean_path, truth_x, P, o, point, radius=1.0, select_by="fitted"):
    """Mean of (aligned posterior-mean path - true path) over the steps within ``radius`` of ``point``, and
    their number. ``select_by="fitted"``: steps where the aligned mean path is near the point -- for a
    calibrated posterior mean this is zero in expectation, so a non-zero value is the path's own local
    error; ``"true"``: steps where the true latent is -- biased towards the prior's pull even for a
    calibrated posterior (regression to the mean: E[x_hat | x] is not x)."""
    x_hat = np.asarray(mean_path).reshape(-1, 2) @ P.T + o
    x_true = np.asarray(truth_x).reshape(-1, 2)
    near = np.linalg.norm((x_hat if select_by == "fitted" else x_true) - point, axis=1) < radius
    if not near.any():
        return None, 0
    return (x_hat[near] - x_true[near]).mean(0), int(near.sum())


def fixed_point_text(r):
    """The common part of every fixed-point line: one found row of :func:`fixed_point_report`."""
    return (f"true fp {np.round(r['true'], 3)} -> recovered {np.round(r['mean'], 3)} (sd {np.round(r['sd'], 3)}), "
            f"distance {r['distance']:.3f}, inside {100 * credible_interval_convention()[0]:.0f}% ellipse {r['in_ellipse']} "
            f"(smallest ellipse holding it: {r['level']:.3f})")


def print_fixed_point_rows(label, rows):
    """One line per found fixed point of :func:`fixed_point_report`, tagged ``[gpslds, label]``."""
    for r in rows:
        if r["found"]:
            print(f"[gpslds, {label}] {fixed_point_text(r)}")


def emission_alignment_report(model, fit, extra, sim, res):
    """The same metrics in the frame fixed by the readouts (P = C_true^+ C_hat, o = C_true^+ (d_hat - d_true)),
    with each draw's fixed points carried by its own readout draw; ``res``: :func:`evaluate`'s result in the
    regression frame, for comparison."""
    truth = sim["truth"]
    if "emission_matrix" not in extra:
        return
    P_s, o_s = ga.align_by_emissions(extra["emission_matrix"], extra["emission_bias"], truth["emission_matrix"], truth["emission_bias"])
    P, o = P_s.mean(0), o_s.mean(0)
    readout = evaluate("gpslds", fit, extra, sim["latents"], two_rotation_drift, alignment=(P, o))
    x_hat, P_r, o_r = res["mean_path"], res["P"], res["o"]
    mse = {name: float(np.mean((x_hat @ A.T + b - sim["latents"]) ** 2)) for name, (A, b) in
           {"readout": (P, o), "regression": (P_r, o_r)}.items()}
    print(f"[gpslds, readout alignment] dynamics NMSE (visited) {readout['dynamics_nmse_visited']:.4f}; latent MSE "
          f"{mse['readout']:.4f} (regression alignment {mse['regression']:.4f}); singular values of P "
          f"{np.round(np.linalg.svd(P, compute_uv=False), 3)} (regression {np.round(np.linalg.svd(P_r, compute_uv=False), 3)})")
    rows, _, _ = fixed_point_report(model, extra, P, o, truth["fixed_points_true"], per_draw=(P_s, o_s))
    print_fixed_point_rows("readout alignment", rows)


def _tau_evidence(linear, data, x, taus):
    """log p(increments of x | tau) - its max over ``taus``, A and e integrated out, W and c the truth's."""
    import jax.numpy as jnp

    from ppl_switch.datasets.gpslds_synthetic import two_rotation_parameters
    from ppl_switch.ops.conjugate_drift import collapsed_log_marginal

    truth = {k: jnp.asarray(v, float) for k, v in two_rotation_parameters().items()}
    x = jnp.asarray(x, float)
    vals = []
    for t in taus:
        theta = {**truth, "temperature": jnp.asarray(t, float)}
        stats = linear.weight_regression_stats(theta, x, data)
        vals.append(float(collapsed_log_marginal(linear.weight_prior_precision(theta), stats, linear.dt)))
    return np.asarray(vals) - max(vals)


def partition_report(model, extra, sim, res, taus=(0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.9), label=None):
    """How sharp the fitted partition is, in the true frame, against the truth (logit (w . [1, x]) / tau with
    w = (0, 1, 0), tau = 0.4: boundary x1 = 0, width 0.4), and which tau the Euler increments of a path
    support (weights A, e integrated out in closed form, W and c at the truth, M = I, sigma0 = 1): the true
    path against the aligned posterior-mean path. A smoothed path blurs the boundary (errors in variables)."""
    P, o = res["P"], res["o"]
    Pinv = np.linalg.inv(P)
    W, tau = np.asarray(extra["partition_weights"])[..., 0], np.asarray(extra["temperature"])
    slope = (W[:, 1:] @ Pinv) / tau[:, None]  # logit = intercept + slope . x_true, per draw
    intercept = (W[:, 0] - W[:, 1:] @ Pinv @ o) / tau
    width, offset = 1.0 / np.linalg.norm(slope, axis=1), -intercept / slope[:, 0]
    linear = GPSLDS(num_states=2, latent_dim=2, obs_dim=model.obs_dim, dt=model.dt, kernel="linear")
    data = linear.prepare(sim["y"])
    paths = {"true": sim["latents"], "aligned mean": res["mean_path"] @ P.T + o}
    with jax.enable_x64(True):  # sums over 75,000 increments; local, so the later reports stay in float32
        evidence = {name: _tau_evidence(linear, data, x, taus) for name, x in paths.items()}
    tag = "partition" if label is None else f"{label}, partition"
    print(f"[gpslds, {tag}] boundary width in the true frame {width.mean():.3f} (sd {width.std():.3f}; true 0.4), "
          f"boundary x1 at x2 = 0 {offset.mean():.3f} (sd {offset.std():.3f}; true 0)")
    for name, e in evidence.items():
        print(f"[gpslds, {tag}] tau the {name} path's increments support: {taus[int(e.argmax())]} "
              f"(log evidence - max at tau {list(taus)}: {np.round(e, 1).tolist()})")


def joint_draw_report(model, fit, guide, sim, seed, res, num_draws=100):
    """Two ways of letting the path's uncertainty reach the fixed points, from joint draws (x, theta) of the
    guide: (1) each draw's fixed points carried to the true frame by the affine map regressed from that
    draw's path; (2) "imputed weights": each draw's A, e replaced by a draw from their exact conditional
    p(A, e | x, theta) given that draw's path (as the conjugate-weights guide does), in the main report's frame."""
    import jax.numpy as jnp

    from ppl_switch.guides.conjugate_weights import ConjugateWeightsGuide

    data = model.prepare(sim["y"])
    draws = guide.sample_posterior(jax.random.PRNGKey(seed + 2), fit.params, data, sample_shape=(num_draws,))
    x = np.asarray(draws.pop("x"))  # (S, B, T, K)
    conditional = ConjugateWeightsGuide(model).weight_conditional
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)

    @jax.jit
    def imputed(theta, x_s, key):
        return model.weights_to_sites(conditional(theta, x_s, jdata).sample(key))

    extra = {k: np.asarray(v) for k, v in draws.items()}  # theta draws, joint with the paths x
    keys = jax.random.split(jax.random.PRNGKey(seed + 3), num_draws)
    per_draw = [imputed({k: jnp.asarray(v[s]) for k, v in extra.items()}, jnp.asarray(x[s]), keys[s]) for s in range(num_draws)]
    extra_imputed = {**extra, **{k: np.stack([np.asarray(d[k]) for d in per_draw]) for k in per_draw[0]}}
    rows, _, _ = fixed_point_report(model, extra_imputed, res["P"], res["o"], sim["truth"]["fixed_points_true"])
    print_fixed_point_rows("imputed weights", rows)
    maps = [ga.align_latents(x_s, sim["latents"]) for x_s in x]
    P_s, o_s = np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps])
    rows, _, _ = fixed_point_report(model, extra, P_s.mean(0), o_s.mean(0), sim["truth"]["fixed_points_true"],
                                    per_draw=(P_s, o_s))
    print(f"[gpslds, per-draw path alignment] {num_draws} joint draws; sd of the frame offset o over draws "
          f"{np.round(o_s.std(0), 3)}")
    print_fixed_point_rows("per-draw path alignment", rows)


#: sites the joint Laplace report holds at the guide's means: the readout (it fixes the frame), the prior
#: scales and the partition (W / tau is a ridge on which the joint Hessian at the means is indefinite, seed 3)
LAPLACE_HOLD = ("emission_matrix", "emission_bias", "slope_scales", "offset_scale", "partition_weights", "temperature")


def joint_laplace_report(model, fit, guide, sim, seed, res, num_draws=200):
    """Fixed points with the path integrated out: draws of A, e, c from the Laplace approximation of
    p(x, theta | y) at the guide's means (``infer.joint_laplace``; the sites in ``LAPLACE_HOLD`` held), in the
    main report's frame. Runs in float64 (switched on here, after every fit)."""
    from ppl_switch.infer.joint_laplace import laplace_parameter_posterior

    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    try:
        lap = laplace_parameter_posterior(model, sim["y"], guide, fit.params, hold=LAPLACE_HOLD)
    except FloatingPointError as err:
        print(f"[gpslds, joint laplace] not available: {err}")
        return
    ratios = {k: float(np.median(v)) for k, v in lap.sd_ratio().items()}
    print(f"[gpslds, joint laplace] {time.perf_counter() - t0:.1f}s; |gradient| at the means {lap.gradient_norm:.3g}; "
          f"median sd ratio to the guide's (given the held sites): {ratios}")
    extra = lap.sample(jax.random.PRNGKey(seed + 4), num_draws)
    rows, _, _ = fixed_point_report(model, extra, res["P"], res["o"], sim["truth"]["fixed_points_true"])
    print_fixed_point_rows("joint laplace", rows)


def path_gibbs_report(model, fit, guide, sim, seed, num_draws=150, burn_in=100, thin=2, save=None):
    """Fixed points and flow from p(x, theta | y) sampled by Metropolis-within-Gibbs (``infer.path_gibbs``),
    started at the fit, the readout held. The frame is the affine map regressed from the chain's mean path:
    the guide's mean path is shrunk (too smooth), so the same readout puts the sampled paths on a larger
    scale and the fit's frame would stretch the draws (seed 0: by 11% in x1). Runs in float64; ``save``:
    pickle the draws and the mean path there."""
    from ppl_switch.infer.path_gibbs import guide_means, sample_path_gibbs

    jax.config.update("jax_enable_x64", True)
    data = model.prepare(sim["y"])
    start, path = guide_means(model, guide, fit.params, data)
    gibbs = sample_path_gibbs(model, data, start, path, num_draws=num_draws, burn_in=burn_in, thin=thin,
                              seed=seed, progress=50)
    extra = gibbs.samples
    if save:
        with open(save, "wb") as f:
            pickle.dump({"samples": extra, "path_mean": gibbs.path_mean, "trace": gibbs.trace,
                         "path_acceptance": gibbs.path_acceptance}, f)
    P, o = ga.align_latents(gibbs.path_mean, sim["latents"])
    r2 = affine_aligned_r2(gibbs.path_mean.reshape(-1, 2), sim["latents"].reshape(-1, 2))
    cells, visited = ga.visited_cells(sim["latents"], -10.0, 10.0, 20, 20)
    f_draws = ga.drift_draws(model, extra, (cells - o) @ np.linalg.inv(P).T) @ P.T
    nmse = ga.dynamics_nmse(f_draws.mean(0)[visited], np.asarray(two_rotation_drift(cells))[visited])
    var = f_draws.var(0).sum(-1)
    print(f"[gpslds, path gibbs] {burn_in} + {num_draws} x {thin} sweeps in {gibbs.wall:.0f}s; path acceptance "
          f"{gibbs.path_acceptance.mean():.2f} (lowest trial {gibbs.path_acceptance.mean(0).min():.2f}); partition "
          f"acceptance {gibbs.partition_acceptance.mean():.2f}; Newton steps per sweep {gibbs.newton_steps.mean():.1f}; "
          f"path-mean latent R2 {r2:.3f}; dynamics NMSE (visited) {nmse:.4f}; var f visited {var[visited].mean():.3g} "
          f"vs unvisited {var[~visited].mean():.3g}")
    rows, _, _ = fixed_point_report(model, extra, P, o, sim["truth"]["fixed_points_true"])
    print_fixed_point_rows("path gibbs", rows)
    partition_report(model, extra, sim, {"P": P, "o": o, "mean_path": gibbs.path_mean}, label="path gibbs")


def oracle_path_report(sim, seed, num_draws=200):
    """Diagnostic: the weights' exact conditional p(A, e | true path, true W, tau, c) (prior M = I, sigma0 = 1)
    -- the drift and fixed-point posterior the data allow when the path is known. No fitting."""
    import jax.numpy as jnp

    from ppl_switch.datasets.gpslds_synthetic import two_rotation_parameters
    from ppl_switch.guides.conjugate_weights import ConjugateWeightsGuide

    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=sim["truth"]["dt"], kernel="linear")
    data = model.prepare(sim["y"])
    theta = {k: jnp.asarray(v, float) for k, v in two_rotation_parameters().items()}
    q = ConjugateWeightsGuide(model).weight_conditional(theta, jnp.asarray(sim["latents"], float), data)
    w = q.sample(jax.random.PRNGKey(seed), (num_draws,))
    extra = {k: np.asarray(v) for k, v in theta.items() if k not in ("regime_matrix", "regime_offset")}
    extra = {k: np.broadcast_to(v, (num_draws,) + v.shape) for k, v in extra.items()}
    extra.update({k: np.asarray(v) for k, v in model.weights_to_sites(w).items()})
    cells, visited = ga.visited_cells(sim["latents"], -10.0, 10.0, 20, 20)
    f = ga.drift_draws(model, extra, cells)
    nmse = ga.dynamics_nmse(f.mean(0)[visited], np.asarray(two_rotation_drift(cells))[visited])
    rows, _, _ = fixed_point_report(model, extra, np.eye(2), np.zeros(2), sim["truth"]["fixed_points_true"])
    print(f"[oracle path] p(A, e | true x, true W, tau, c): dynamics NMSE (visited) {nmse:.4f}")
    for r in rows:
        if r["found"]:
            print(f"[oracle path] {fixed_point_text(r)}")


def limit_cycle_evidence(latents, drift, dt):
    """How strongly the true path alone identifies the limit cycle: the Euler-increment log-likelihood
    (Sigma = I) of the true drift minus that of the best single affine drift (least squares)."""
    x0 = latents[:, :-1].reshape(-1, 2)
    dx = (latents[:, 1:] - latents[:, :-1]).reshape(-1, 2)
    design = np.concatenate([x0, np.ones((len(x0), 1))], 1)
    coef, *_ = np.linalg.lstsq(design * dt, dx, rcond=None)

    def loglik(f):
        return -np.sum((dx - f * dt) ** 2) / (2 * dt)

    return float(loglik(np.asarray(drift(x0))) - loglik(design @ coef))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-cycle", action="store_true")
    parser.add_argument("--global-affine", action="store_true",
                        help="q(x) mapped by one learned affine x -> S x + m (LatentSDEGuide(global_affine=True))")
    parser.add_argument("--latent-scales", type=float, nargs="+", default=[3.0],
                        help="sd of the data-driven start path; several = one fit each, the best final loss kept")
    parser.add_argument("--alpha", type=float, default=4.0,
                        help="limit cycle: radial growth / decay rate (1/s) of the reconstructed generator")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--weights", choices=["joint", "conjugate"], default="joint",
                        help="gpSLDS guide for A, e: in the joint normal, or their exact conditional given the path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated data and of SVI")
    parser.add_argument("--refine-rounds", type=int, default=0,
                        help="gpSLDS: after SVI, this many rounds of (MAP path given the posterior-mean parameters, "
                             "SVI from there); infer.path_refinement")
    parser.add_argument("--refine-steps", type=int, default=500, help="SVI steps of each refinement round")
    parser.add_argument("--refine-path-lr", type=float, default=None,
                        help="Adam step size of the mean path in the refinement rounds (default: the learning rate)")
    parser.add_argument("--joint-laplace", action="store_true",
                        help="also the fixed points from the Laplace approximation of p(x, theta | y) (infer.joint_laplace)")
    parser.add_argument("--path-gibbs", action="store_true",
                        help="also the fixed points from p(x, theta | y) sampled by Metropolis-within-Gibbs (infer.path_gibbs)")
    parser.add_argument("--save-params", default=None, help="pickle the fitted guide's parameters and the frame here")
    parser.add_argument("--oracle-path", action="store_true",
                        help="only the diagnostic: weights' exact conditional given the true path and partition")
    args = parser.parse_args()
    steps = int(os.environ.get("GPSLDS_STEPS", "1500"))
    lr = float(os.environ.get("GPSLDS_LR", "0.02"))
    t_all = time.perf_counter()
    if args.limit_cycle:
        sim = simulate_gpslds_limit_cycle(seed=0, num_trials=args.trials, alpha=args.alpha)
        drift = functools.partial(limit_cycle_drift, alpha=args.alpha)
        evidence = limit_cycle_evidence(sim["latents"], drift, sim["truth"]["dt"])
        print(f"[limit cycle, alpha={args.alpha}] on the true path, Euler log-likelihood of the true drift minus "
              f"the best single linear drift: {evidence:.1f} nats")
        model = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=sim["truth"]["dt"], features="quadratic")
        fit, extra, wall, _ = fit_model(model, sim["y"], steps, lr, 0, weights=args.weights, latent_scales=args.latent_scales,
                                 global_affine=args.global_affine)
        print(f"final loss (mean of the last 100 steps) {np.mean(np.asarray(fit.losses)[-100:]):.1f}")
        res = evaluate("gpslds-limit-cycle", fit, extra, sim["latents"], drift, -5, 5)
        P, o = res["P"], res["o"]
        print(f"[{res['name']}] alignment x_true = P x_model + o: singular values of P "
              f"{np.round(np.linalg.svd(P, compute_uv=False), 3).tolist()} (1 = the model's latent scale is the truth's)")
        grid, _ = ga.grid_points(-4, 4, 81)
        pi = ga.partition_map(model, extra, (grid - o) @ np.linalg.inv(P).T)["mean"][:, 0].reshape(81, 81)
        # boundary cells: where the aligned pi crosses 0.5 between neighbours
        cross = np.zeros_like(pi, bool)
        cross[:, :-1] |= (pi[:, :-1] - 0.5) * (pi[:, 1:] - 0.5) < 0
        cross[:-1, :] |= (pi[:-1, :] - 0.5) * (pi[1:, :] - 0.5) < 0
        radii = np.linalg.norm(grid.reshape(81, 81, 2)[cross], axis=-1)
        W = np.asarray(extra["partition_weights"])[..., 0] / np.asarray(extra["temperature"])[:, None]
        print(f"[{res['name']}] W/tau posterior mean (model coords, on [1, z1^2, z2^2]): {np.round(W.mean(0), 2).tolist()}; "
              f"pi_0 on the aligned grid in [{pi.min():.3f}, {pi.max():.3f}]")
        print(f"[{res['name']}] steps={steps} lr={lr} fit wall {wall:.1f}s; latent R2 {res['latent_r2']:.3f}; "
              f"dynamics NMSE (visited) {res['dynamics_nmse_visited']:.4f}; var f visited {res['var_f_visited']:.3g} "
              f"vs unvisited {res['var_f_unvisited']:.3g}")
        if radii.size:
            print(f"[{res['name']}] learned boundary radius (aligned): median {np.median(radii):.3f}, "
                  f"IQR {np.percentile(radii, 25):.3f}-{np.percentile(radii, 75):.3f}, points {radii.size} (true 2)")
        else:
            print(f"[{res['name']}] no pi = 0.5 boundary inside [-4, 4]^2")
        print(f"total wall {time.perf_counter() - t_all:.1f}s")
        return

    sim = simulate_gpslds_synthetic(seed=args.seed, num_trials=args.trials)
    dt = sim["truth"]["dt"]
    if args.oracle_path:
        oracle_path_report(sim, args.seed)
        return
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=dt)
    fit, extra, wall, guide = fit_model(model, sim["y"], steps, lr, args.seed, weights=args.weights, latent_scales=args.latent_scales,
                                 global_affine=args.global_affine, refine_rounds=args.refine_rounds,
                                 refine_steps=args.refine_steps, refine_path_lr=args.refine_path_lr)
    res = evaluate("gpslds", fit, extra, sim["latents"], two_rotation_drift)
    if args.save_params:  # the fitted guide's parameters and the frame, to rerun the later reports without refitting
        with open(args.save_params, "wb") as f:
            pickle.dump({"params": {k: np.asarray(v) for k, v in fit.params.items()}, "P": res["P"], "o": res["o"]}, f)
    rows, regions, types = fixed_point_report(model, extra, res["P"], res["o"], sim["truth"]["fixed_points_true"])
    print(f"[gpslds] weights={args.weights} seed={args.seed} trials={args.trials} steps={steps} lr={lr} fit wall {wall:.1f}s; latent R2 {res['latent_r2']:.3f}; "
          f"dynamics NMSE (visited) {res['dynamics_nmse_visited']:.4f}; var f visited {res['var_f_visited']:.3g} vs "
          f"unvisited {res['var_f_unvisited']:.3g}; final loss {res['final_loss']:.1f} (E_q log p(y | x) {res['expected_log_lik']:.1f}, "
          f"KL {res['kl']:.1f}); mean-path sd {np.round(res['mean_path'].reshape(-1, 2).std(0), 3)}")
    marks = np.linspace(0, len(fit.losses) - 1, 6).astype(int)  # the last stage's steps
    print(f"[gpslds] loss at steps {marks.tolist()}: {np.round(fit.losses[marks], 1).tolist()}")
    for r in rows:
        if r["found"]:
            near = {by: path_offset_near(res["mean_path"], sim["latents"], res["P"], res["o"], r["true"], select_by=by)
                    for by in ("fitted", "true")}
            near = "; ".join(f"{None if v is None else np.round(v, 3)} ({n} steps, selected by the {by} path)"
                             for by, (v, n) in near.items())
            print(f"[gpslds] {fixed_point_text(r)}, in {r['fraction_of_draws']:.2f} of draws; "
                  f"aligned path - true path within 1.0 of it: {near}")
        else:
            print(f"[gpslds] true fp {r['true']}: no root found")
    print(f"[gpslds] root clusters (mean, share of draws): {[(np.round(c['mean'], 2).tolist(), round(c['fraction'], 2)) for c in regions]}")
    print(f"[gpslds] stability types of roots: {types}")
    partition_report(model, extra, sim, res)
    emission_alignment_report(model, fit, extra, sim, res)
    joint_draw_report(model, fit, guide, sim, args.seed, res)
    if not args.no_baseline:
        rbf = GPSDE(latent_dim=2, obs_dim=50, dt=dt)
        fit_b, extra_b, wall_b, _ = fit_model(rbf, sim["y"], steps, lr, args.seed, latent_scales=args.latent_scales,
                                 global_affine=args.global_affine)
        res_b = evaluate("gpsde-rbf", fit_b, extra_b, sim["latents"], two_rotation_drift)
        print(f"[gpsde-rbf] fit wall {wall_b:.1f}s; latent R2 {res_b['latent_r2']:.3f}; dynamics NMSE (visited) "
              f"{res_b['dynamics_nmse_visited']:.4f}; var f visited {res_b['var_f_visited']:.3g} vs unvisited "
              f"{res_b['var_f_unvisited']:.3g}")
    if args.joint_laplace:
        joint_laplace_report(model, fit, guide, sim, args.seed, res)
    if args.path_gibbs:
        path_gibbs_report(model, fit, guide, sim, args.seed,
                          save=None if args.save_params is None else args.save_params + ".gibbs")
    print(f"total wall {time.perf_counter() - t_all:.1f}s")


if __name__ == "__main__":
    main()
