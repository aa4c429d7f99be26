"""Parameter recovery with NUTS on data simulated from known parameters (slow; run with -m slow).

Criterion (issue 3: "true values inside 94% intervals for >= 90% of scalar parameters; R-hat < 1.01"):
each model is fitted to ``len(SEEDS)`` independently simulated datasets; after aligning labels to the
truth, the true value of at least 90% of all scalar parameters, pooled over the datasets, lies inside its
central 94% posterior interval, and the split R-hat of every scalar of every fit is < 1.01. Pooling over
replications is what makes the 90% threshold a fair test: for one dataset of P = 26 scalars a calibrated
posterior falls below 90% about 20% of the time, for three datasets (P = 78) about 5% of the time. Each
dataset must also reach the 1% quantile of Binomial(P, 0.94) on its own.
For the LDS only quantities invariant to the orthogonal change of latent basis are identified, so the
check runs on :meth:`LDS.invariants`.

    /work/venv/bin/python -m pytest tests/test_recovery.py -m slow -q -s
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np
import pytest
from numpyro.diagnostics import split_gelman_rubin
from scipy.optimize import linear_sum_assignment
from scipy.stats import binom

from ppl_switch.infer import fit_nuts
from ppl_switch.models import HMM, LDS

pytestmark = [pytest.mark.slow, pytest.mark.float64]

NUM_CHAINS, NUM_WARMUP, NUM_SAMPLES = 2, 500, 500
SEEDS = (11, 12, 13)


def _scalars(samples: dict, truth: dict, names) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (chain, draw, ...) draws and the matching truth into (chain, draw, P) and (P,),
    dropping entries that are constant by construction (e.g. the unit diagonal of a correlation
    factor, the zeros above a Cholesky diagonal)."""
    draws, values = [], []
    for name in names:
        s = np.asarray(samples[name])
        draws.append(s.reshape(s.shape[:2] + (-1,)))
        values.append(np.asarray(truth[name]).reshape(-1))
    draws, values = np.concatenate(draws, -1), np.concatenate(values)
    varying = draws.reshape(-1, draws.shape[-1]).std(0) > 1e-12
    return draws[..., varying], values[varying]


def _check(draws: np.ndarray, values: np.ndarray, label: str) -> tuple[float, float]:
    lo, hi = np.quantile(draws.reshape(-1, draws.shape[-1]), [0.03, 0.97], axis=0)
    coverage = float(np.mean((values >= lo) & (values <= hi)))
    r_hat = float(np.max(split_gelman_rubin(draws)))
    print(f"\n{label}: {draws.shape[-1]} scalars, coverage of 94% intervals {coverage:.3f}, max split R-hat {r_hat:.4f}")
    return coverage, r_hat


def _assert_calibrated(coverage: float, num_scalars: int) -> None:
    """Fail when fewer true values fall inside their 94% intervals than a calibrated posterior allows."""
    inside = round(coverage * num_scalars)
    minimum = int(binom.ppf(0.01, num_scalars, 0.94))
    assert inside >= minimum, f"{inside}/{num_scalars} inside their 94% intervals; calibrated: >= {minimum} (99%)"


def _fit(model, data):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_nuts(
            model, data, num_warmup=NUM_WARMUP, num_samples=NUM_SAMPLES, num_chains=NUM_CHAINS, seed=1, progress_bar=False
        )
    print(f"\n{model.name}: NUTS {NUM_CHAINS}x({NUM_WARMUP}+{NUM_SAMPLES}) took {time.perf_counter() - start:.0f} s; "
          f"divergences {fit.diagnostics.get('num_divergences')}")
    return fit


def _hmm_replication(seed: int) -> tuple[int, int]:
    model = HMM(num_states=2, obs_dim=2)
    data, truth = model.simulate(jax.random.PRNGKey(seed), 4, 100)
    fit = _fit(model, data)
    samples = {k: np.asarray(v) for k, v in fit.samples.items()}
    # align the (already draw-consistent) labels with the truth by the posterior-mean means
    post_means = samples["means"].mean((0, 1))
    true_means = np.asarray(truth["params"]["means"])
    cost = ((post_means[:, None, :] - true_means[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    perm = rows[np.argsort(cols)]  # new label k = fitted label perm[k], matching true state k
    samples = model.permute_states(samples, perm)
    names = ["initial_probs", "transition_matrix", "means", "scales", "corr_cholesky"]
    draws, values = _scalars(samples, truth["params"], names)
    return _checked_replication(draws, values, f"hmm seed {seed}")


def _lds_replication(seed: int) -> tuple[int, int]:
    model = LDS(latent_dim=2, obs_dim=3)
    data, truth = model.simulate(jax.random.PRNGKey(seed), 3, 100)
    fit = _fit(model, data)
    samples = {k: np.asarray(v) for k, v in fit.samples.items()}
    post = {k: np.asarray(v) for k, v in model.invariants(samples).items()}
    true = {k: np.asarray(v) for k, v in model.invariants(truth["params"]).items()}
    # symmetric Gram matrices: keep the upper triangle only
    iu = np.triu_indices(3)
    post["emission_gram"] = post["emission_gram"][..., iu[0], iu[1]]
    true["emission_gram"] = true["emission_gram"][iu]
    draws, values = _scalars(post, true, list(post))
    return _checked_replication(draws, values, f"lds invariants seed {seed}")


def _checked_replication(draws: np.ndarray, values: np.ndarray, label: str) -> tuple[int, int]:
    """Per-dataset checks (R-hat, binomial floor); returns (number inside, number of scalars)."""
    coverage, r_hat = _check(draws, values, label)
    _assert_calibrated(coverage, values.size)
    assert r_hat < 1.01, f"{label}: max split R-hat {r_hat:.4f}"
    return round(coverage * values.size), values.size


@pytest.mark.parametrize("replication", [_hmm_replication, _lds_replication], ids=["hmm", "lds"])
def test_recovers_parameters_pooled_over_datasets(replication):
    counts = np.array([replication(seed) for seed in SEEDS])
    inside, total = counts.sum(0)
    print(f"\npooled over seeds {SEEDS}: {inside}/{total} = {inside / total:.3f} inside their 94% intervals")
    assert inside >= 0.9 * total, f"{inside}/{total} inside their 94% intervals; the issue asks for >= 90%"
