"""SLDS on the tutorial's two-regime rotation system: state accuracy and wall time of each inference path.

Paths: structured mean-field EM with the true parameters ("smf-known"), structured mean-field EM
learning every parameter but C = I ("smf-learned", 4 restarts after a single-LDS fit), SVI with the
default guide (mean-field parameters + Gauss–Markov chain over x, learned parameters; started at a
PCA/AR(1) fit of the data, or with ``--svi-init em`` at the structured mean-field EM estimate),
NUTS (learned parameters, path and parameters sampled, z summed out). State accuracy is the fraction of
steps whose most probable regime matches the truth after the best permutation of labels. Wall times
include compilation ("first call"); for the EM paths the time of a second, compiled call is also given.

NUTS defaults (the documented path): the model with ``path_parameterisation="whitened"`` (the path's
innovations under the regime-averaged dynamics are sampled, which removes the path-translation ridge of
the centred path), every chain started at the structured mean-field EM estimate (best of 8 restarts,
path = q(x) mean), target acceptance 0.9. R-hat, ESS and the 94% intervals of the A_k eigenvalues are
computed on the relabelled draws.

Usage:
    python benchmarks/slds.py                                # EM paths at T in {150, 1000, 10000}, SVI at 150, 1000
    python benchmarks/slds.py --paths nuts --T 150           # NUTS (2 chains) with R-hat, ESS/s, divergences
    python benchmarks/slds.py --paths nuts --T 150 --nuts-param centred --nuts-init pca   # the earlier NUTS set-up
    python benchmarks/slds.py --paths smf-known smf-learned svi --T 150 1000 10000 --seed 0
    python benchmarks/slds.py --paths svi --T 150 1000 --svi-init em   # SVI started at the EM estimate
    python benchmarks/slds.py --paths nuts --T 1000 --nuts-param anchored --nuts-relative-scales \
        --nuts-dense-params --nuts-scale-prior 4 16      # anchored path, path-relative scales (model card)
    python benchmarks/slds.py --paths nuts --T 1000 --nuts-chains 4 --nuts-chain-method parallel ...
                                                     # chains side by side, one XLA CPU device each
Prints one JSON line per (path, T) and a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _cpu_devices_for_parallel_chains(argv: list[str]) -> None:
    """One XLA CPU device per chain when ``--nuts-chain-method parallel`` (the device count is fixed when
    JAX starts, so this runs before the import; chains then share the machine's cores)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--nuts-chain-method", default="sequential")
    pre.add_argument("--nuts-chains", type=int, default=2)
    known, _ = pre.parse_known_args(argv)
    if known.nuts_chain_method == "parallel":
        import numpyro

        numpyro.set_host_device_count(known.nuts_chains)


if __name__ == "__main__":
    _cpu_devices_for_parallel_chains(sys.argv[1:])

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from ppl_switch.datasets.slds_tutorial import simulate_slds_tutorial, tutorial_params  # noqa: E402
from ppl_switch.infer.slds_em import slds_em  # noqa: E402
from ppl_switch.models.slds import PATH_SITES, RELATIVE_PATH_SITE, SLDS  # noqa: E402

#: the path and its coordinate sites: diagnosed apart from the parameters, kept off a dense mass block
PATH_VALUE_SITES = (*PATH_SITES.values(), RELATIVE_PATH_SITE)  # "x" first


def state_accuracy(z_true: np.ndarray, probs: np.ndarray) -> float:
    """Accuracy of argmax regimes after the best label permutation (K small: all permutations)."""
    K = probs.shape[-1]
    z_hat = probs.argmax(-1)
    return float(max(np.mean(np.asarray(p)[z_hat] == z_true) for p in itertools.permutations(range(K))))


def model_for_tutorial(path_parameterisation: str = "centred", dynamics_scale_prior="half_normal",
                       dynamics_scale_coordinates: str = "direct") -> SLDS:
    return SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2), path_parameterisation=path_parameterisation,
                dynamics_scale_prior=dynamics_scale_prior, dynamics_scale_coordinates=dynamics_scale_coordinates)


def true_site_params(model: SLDS) -> dict:
    return model.params_from_em({**tutorial_params(), "input_matrices": np.zeros((2, 2, 0))})


def run_em(T: int, seed: int, known: bool) -> dict:
    sim = simulate_slds_tutorial(seed=seed, num_timesteps=T)
    model = model_for_tutorial()
    data = model.prepare(sim["y"])
    kw = dict(params=true_site_params(model), num_iters=50) if known else dict(key=jax.random.PRNGKey(seed), num_iters=100, num_restarts=4)
    t0 = time.perf_counter()
    out, hist = slds_em(model, data, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, hist = slds_em(model, data, **kw)
    second = time.perf_counter() - t0
    trace = hist["log_likelihoods"]
    return {
        "path": "smf-known" if known else "smf-learned", "T": T, "seed": seed,
        "accuracy": state_accuracy(sim["states"][0], out["q_state_probs"][0]),
        "seconds_first_call": first, "seconds_compiled": second,
        "objective_monotone": bool(np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1]))),
        "iterations": int(len(trace) - 1),
    }


def run_svi(T: int, seed: int, num_steps: int, init_from: str = "pca") -> dict:
    from ppl_switch.infer import fit_svi

    sim = simulate_slds_tutorial(seed=seed, num_timesteps=T)
    model = model_for_tutorial()
    t0 = time.perf_counter()
    if init_from == "em":  # guide centred on the structured mean-field estimate (path = q(x) mean)
        data = model.prepare(sim["y"])
        est, _ = slds_em(model, data, key=jax.random.PRNGKey(seed), num_iters=100, num_restarts=4)
        guide = model.default_guide(init_values=model.latent_site_values(est, data))
    else:
        guide = model.default_guide(sim["y"])
    fit = fit_svi(model, sim["y"], guide=guide, num_steps=num_steps, learning_rate=0.01, num_draws=100, seed=seed,
                  x64=True, progress_bar=False)
    seconds = time.perf_counter() - t0
    probs = _state_probs(fit)
    return {"path": f"svi (start: {init_from})", "T": T, "seed": seed, "accuracy": state_accuracy(sim["states"][0], probs),
            "seconds_first_call": seconds, "num_steps": num_steps, "final_loss": float(fit.losses[-1])}


def _posterior_states(*args, **kwargs):
    from ppl_switch.infer import posterior_states

    return posterior_states(*args, **kwargs)


def _state_probs(fit) -> np.ndarray:
    return np.asarray(_posterior_states(fit.model, fit.samples, fit.data, sample_paths=False)["state_probs"])[0]


def run_nuts(T: int, seed: int, num_warmup: int, num_samples: int, num_chains: int, init_from: str = "em",
             target_accept: float = 0.9, path_parameterisation: str = "whitened", em_restarts: int = 8,
             save_draws: str = "", dynamics_scale_prior="half_normal", dense_params: bool = False,
             dynamics_scale_coordinates: str = "direct", chain_method: str = "sequential") -> dict:
    import arviz as az

    from ppl_switch.infer import fit_nuts
    from ppl_switch.infer.prepare import model_sites

    sim = simulate_slds_tutorial(seed=seed, num_timesteps=T)
    model = model_for_tutorial(path_parameterisation, dynamics_scale_prior, dynamics_scale_coordinates)
    data = model.prepare(sim["y"])
    t0 = time.perf_counter()
    em_info = {}
    if init_from == "em":  # start every chain at the structured mean-field estimate (path = q(x) mean)
        est, hist = slds_em(model, data, key=jax.random.PRNGKey(seed), num_iters=100, num_restarts=em_restarts)
        em_info = {"em_restarts": em_restarts, "em_objective": float(hist["log_likelihoods"][-1]),
                   "em_accuracy": state_accuracy(sim["states"][0], est["q_state_probs"][0])}
        # probabilities moved off 0, EM-only outputs dropped, the whitened path's innovations added
        init = model.latent_site_values(est, data)
    else:
        init = model.init_values(data)
    sites = model_sites(model.program, data)
    parameter_sites = tuple(k for k, v in sites.items()
                            if v["type"] == "sample" and not v["observed"] and k not in PATH_VALUE_SITES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_nuts(model, sim["y"], num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                       seed=seed, init_params={k: v for k, v in init.items()}, target_accept=target_accept,
                       x64=True, progress_bar=False, chain_method=chain_method,
                       # one dense block over the parameters, the long path diagonal
                       dense_mass=[parameter_sites] if dense_params else False)
    seconds = time.perf_counter() - t0
    probs = _state_probs(fit)
    # eigenvalues of A_k (invariant to the latent basis); label-aligned draws
    A = fit.samples["dynamics_matrix"]  # (chain, draw, K, D, D)
    eig = np.linalg.eigvals(A)
    order = np.argsort(eig.imag, -1)
    eig = np.take_along_axis(eig, order, -1)
    true_eig = np.linalg.eigvals(tutorial_params()["dynamics_matrices"])
    true_eig = np.take_along_axis(true_eig, np.argsort(true_eig.imag, -1), -1)
    # match the learned regimes to the true ones by the imaginary parts of the eigenvalues
    mean_im = eig.imag.mean((0, 1))[:, -1]
    perm = np.argsort(mean_im) if np.argsort(true_eig.imag[:, -1])[0] == 0 else np.argsort(-mean_im)
    inside = []
    for k_true, k_fit in enumerate(perm):
        for part in ("real", "imag"):
            v = getattr(eig[:, :, k_fit, -1], part)
            lo, hi = np.quantile(v, [0.03, 0.97])
            inside.append(bool(lo <= getattr(true_eig[k_true, -1], part) <= hi))
    # diagnostics of the relabelled draws (fit.samples are aligned across chains and draws); the path's
    # coordinates (x, or its whitened innovations) separately from the parameters
    params = {k: v for k, v in fit.samples.items() if k not in PATH_VALUE_SITES}
    # unrounded: R-hat is judged against 1.01, which az.summary's default two decimals cannot show
    summary = az.summary(az.from_dict(posterior=params), kind="diagnostics", round_to="none")
    rhat_params = float(summary["r_hat"].max())
    ess_bulk = float(summary["ess_bulk"].min())
    x_summary = az.summary(az.from_dict(posterior={"x": fit.samples["x"]}), kind="diagnostics", round_to="none")
    n_div = int(fit.diagnostics.get("num_divergences", 0))
    stats = fit.idata.sample_stats
    if save_draws:
        np.savez(save_draws, **{k: v for k, v in fit.samples.items() if k not in PATH_VALUE_SITES[1:]},
                 **{f"stat_{k}": np.asarray(stats[k]) for k in ("step_size", "n_steps", "diverging", "lp")})
    per_chain_accuracy = [
        state_accuracy(sim["states"][0], np.asarray(_posterior_states(fit.model, {k: v[c : c + 1] for k, v in fit.samples.items()},
                                                                         fit.data, sample_paths=False)["state_probs"])[0])
        for c in range(num_chains)
    ]
    return {
        "path": f"nuts ({path_parameterisation}, start: {init_from}, scale prior: {dynamics_scale_prior}"
                f"{', path-relative scales' if dynamics_scale_coordinates == 'path_relative' else ''}"
                f"{', dense parameter mass' if dense_params else ''})", "T": T, "seed": seed, "target_accept": target_accept,
        "accuracy": state_accuracy(sim["states"][0], probs), "accuracy_per_chain": per_chain_accuracy,
        "seconds_first_call": seconds, "chain_method": chain_method, "num_chains": num_chains, "num_warmup": num_warmup, "num_samples": num_samples,
        "max_rhat_params": rhat_params, "worst_rhat_sites": summary["r_hat"].dropna().sort_values().index[-3:].tolist(),
        "worst_rhat_values": summary["r_hat"].dropna().sort_values().values[-3:].round(4).tolist(),
        "max_rhat_x": float(x_summary["r_hat"].max()),
        "min_ess_bulk_params": ess_bulk, "min_ess_bulk_x": float(x_summary["ess_bulk"].min()), "ess_per_second": ess_bulk / seconds,
        "divergence_fraction": n_div / (num_chains * num_samples),
        "step_size_per_chain": [float(v) for v in np.asarray(stats["step_size"])[:, -1]],
        "mean_leapfrog_steps_per_chain": [float(v) for v in np.asarray(stats["n_steps"]).mean(1)],
        "true_eigenvalues_inside_94pct": inside, **em_info,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=["smf-known", "smf-learned", "svi"])
    parser.add_argument("--T", nargs="+", type=int, default=[150, 1000, 10000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--svi-steps", type=int, default=3000)
    parser.add_argument("--svi-max-T", type=int, default=1000, help="skip SVI above this T")
    parser.add_argument("--svi-init", choices=["pca", "em"], default="pca",
                        help="SVI guide start: PCA/AR(1) of the data, or the structured mean-field EM estimate")
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--nuts-init", choices=["pca", "em"], default="em",
                        help="where NUTS chains start: the structured mean-field EM estimate (best of --nuts-em-restarts) or PCA/AR(1)")
    parser.add_argument("--nuts-em-restarts", type=int, default=8)
    parser.add_argument("--nuts-param", choices=sorted(PATH_SITES), default="whitened",
                        help="path_parameterisation of the model NUTS samples")
    parser.add_argument("--nuts-chain-method", choices=["sequential", "parallel", "vectorized"], default="sequential",
                        help="parallel: one XLA CPU device per chain, chains run side by side on the cores")
    parser.add_argument("--nuts-target-accept", type=float, default=0.9)
    parser.add_argument("--nuts-save-draws", default="", help="write the relabelled NUTS draws and sample stats to this .npz")
    parser.add_argument("--nuts-scale-prior", nargs=2, type=float, metavar=("SHAPE", "RATE"), default=None,
                        help="Gamma(SHAPE, RATE) prior on the dynamics noise scales (boundary-avoiding) instead of HalfNormal(0.5)")
    parser.add_argument("--nuts-relative-scales", action="store_true",
                        help="dynamics_scale_coordinates='path_relative': the scales sampled relative to the path")
    parser.add_argument("--nuts-dense-params", action="store_true",
                        help="adapt one dense mass matrix over the parameter sites (the path stays diagonal)")
    args = parser.parse_args(argv)
    rows = []
    for T in args.T:
        for path in args.paths:
            if path in ("smf-known", "smf-learned"):
                row = run_em(T, args.seed, path == "smf-known")
            elif path == "svi":
                if T > args.svi_max_T:
                    continue
                row = run_svi(T, args.seed, args.svi_steps, args.svi_init)
            elif path == "nuts":
                row = run_nuts(T, args.seed, args.nuts_warmup, args.nuts_samples, args.nuts_chains, args.nuts_init,
                               args.nuts_target_accept, args.nuts_param, args.nuts_em_restarts, args.nuts_save_draws,
                               ("gamma", *args.nuts_scale_prior) if args.nuts_scale_prior else "half_normal",
                               args.nuts_dense_params, "path_relative" if args.nuts_relative_scales else "direct",
                               args.nuts_chain_method)
            else:
                raise SystemExit(f"--paths: unknown path {path!r}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| path | T | state accuracy | wall time (s, incl. compile) | compiled (s) |\n|---|---|---|---|---|")
    for r in rows:
        compiled = f"{r['seconds_compiled']:.2f}" if "seconds_compiled" in r else "-"
        print(f"| {r['path']} | {r['T']} | {r['accuracy']:.3f} | {r['seconds_first_call']:.1f} | {compiled} |")
    return rows


if __name__ == "__main__":
    main()
