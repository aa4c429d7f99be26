"""Reproduce the GDM column of paper Table 1 (NASCAR inferred-state accuracy) with ppl-switch.

For each seed: generate the training trial (generator seed 0) and test trials with the same emission
matrix C, fit GDM (K=4, D=2) by GS-BBVI with the released code's settings (10 particles, AdamW 1e-2 ->
1e-3, clip 1, tau = 0.99, <= 4000 steps, early stopping), encode the test trial with the amortised guide
(no optimisation), and report k-NN (k=10) inferred-state accuracy, train/test R², the one-step ±3 std
envelope width and coverage (dimension 0), and wall time (compilation included).

Test trials: ``new-path`` = generator seed 1 (a new latent path); ``same-path`` = generator seed 0 with
fresh observation noise (the released code's standard-NASCAR protocol, whose test trial shares the
training path). Soft-sticky always uses generator seed 1 for the test trial, as the paper does.

``--model mixture`` runs the 3-level mixture model (``GDMMixture``, eq. 2.2 / App. C, with its
``MixtureGuide``; float64) instead, reporting the new-path test accuracy and wall time (the paper gives no
numbers for it).

Usage: python benchmarks/gdm.py [--model gdm|mixture] [--variants standard soft] [--seeds 0 1 2] [--num-steps 4000]
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

from ppl_switch.analysis.gdm_metrics import (  # noqa: E402
    envelope_coverage,
    inferred_state_accuracy,
    one_step_envelope,
    smoothed_r2,
)
from ppl_switch.analysis.metrics import knn_classify  # noqa: E402
from ppl_switch.datasets.nascar import nascar  # noqa: E402
from ppl_switch.guides.gdm_guides import MixtureGuide  # noqa: E402
from ppl_switch.models.gdm import GDM, fit_gdm_svi  # noqa: E402
from ppl_switch.models.gdm_mixture import GDMMixture  # noqa: E402


def run_seed(variant: str, seed: int, num_steps: int, num_timesteps: int = 1000) -> dict:
    soft = variant == "soft"
    start = time.perf_counter()
    train = nascar(0, num_timesteps, soft_sticky=soft)
    C = train.params["emission_matrix"]
    tests = {"new-path": nascar(1, num_timesteps, soft_sticky=soft, emission_matrix=C)}
    if not soft:
        tests["same-path"] = nascar(0, num_timesteps, emission_matrix=C, noise_seed=1000 + seed)
    model = GDM(num_states=4, latent_dim=2, obs_dim=C.shape[0], projection_seed=seed)
    fit = fit_gdm_svi(model, train.y, seed=seed, num_steps=num_steps)
    z_train = fit.encode(num_samples=20, seed=seed)
    out = dict(variant=variant, seed=seed, steps=fit.num_steps, fit_time=fit.wall_time,
               train_r2=smoothed_r2(model, fit.params, z_train, fit.data))
    mean, lo, hi = one_step_envelope(model, fit.params, z_train[:10], fit.data, jax.random.PRNGKey(seed), num_branches=10)
    out["envelope_width"] = float(np.nanmean(np.asarray(hi - lo)[:, 1:, 0]))
    out["envelope_coverage"] = envelope_coverage(lo, hi, fit.data.y, dim=0)
    for name, test in tests.items():
        data = model.prepare(test.y)
        z_test = fit.encode(data, num_samples=20, seed=seed + 1)
        out[f"acc_{name}"] = inferred_state_accuracy(z_train.mean(0)[0], train.states, z_test.mean(0)[0], test.states)
        out[f"test_r2_{name}"] = smoothed_r2(model, fit.params, z_test, data)
        # supervised ceiling: k-NN from the true latent positions (what location alone supports)
        out[f"ceiling_{name}"] = float(np.mean(knn_classify(train.latents, train.states, test.latents, 10) == test.states))
    out["total_time"] = time.perf_counter() - start
    return out


def run_mixture_seed(variant: str, seed: int, num_steps: int, num_timesteps: int = 1000) -> dict:
    """The 3-level mixture model on the same train/new-path test pair: accuracy and wall time."""
    soft = variant == "soft"
    start = time.perf_counter()
    train = nascar(0, num_timesteps, soft_sticky=soft)
    C = train.params["emission_matrix"]
    test = nascar(1, num_timesteps, soft_sticky=soft, emission_matrix=C)
    model = GDMMixture(num_states=4, latent_dim=2, obs_dim=C.shape[0])
    fit = fit_gdm_svi(model, train.y, guide=MixtureGuide(model, seed=seed), seed=seed, num_steps=num_steps)
    accuracy = inferred_state_accuracy(
        fit.soft_states()[0], train.states, fit.soft_states(model.prepare(test.y))[0], test.states
    )
    return {"variant": variant, "seed": seed, "steps": fit.num_steps, "fit_time": fit.wall_time,
            "acc_new-path": accuracy, "total_time": time.perf_counter() - start}


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("variant", "seed")]
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0) for k in keys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gdm", "mixture"], default="gdm")
    parser.add_argument("--variants", nargs="+", default=["standard", "soft"], choices=["standard", "soft"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-steps", type=int, default=4000)
    parser.add_argument("--num-timesteps", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write the per-seed rows and summaries as JSON")
    args = parser.parse_args(argv)
    if args.model == "mixture":
        jax.config.update("jax_enable_x64", True)
    run = run_mixture_seed if args.model == "mixture" else run_seed
    results = {}
    for variant in args.variants:
        rows = []
        for seed in args.seeds:
            row = run(variant, seed, args.num_steps, args.num_timesteps)
            print(json.dumps(row), flush=True)
            rows.append(row)
        results[variant] = {"rows": rows, "summary": summarise(rows)}
        print(f"== {variant}: " + ", ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in results[variant]["summary"].items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
