"""The checks every runner applies to its result, so that no fit is silently wrong.

Each ``*_warnings`` function returns a list of one-line messages (empty = nothing to report); the runner
stores them in ``fit.warnings`` and emits them with :func:`emit` as :class:`FitWarning`. Non-finite
results are refused instead: :func:`require_finite` raises a :class:`FitError` naming the stage and sites.

Thresholds (module constants, stated in every message that uses them):

* data scale (:func:`data_scale_warnings`, Gaussian emissions only): the priors of every model in the
  zoo are on the unit scale (emission / bias means N(0, 3-5^2), noise scales HalfNormal(1-2)), so a
  coordinate of y whose standard deviation is above ``SCALE_LIMIT`` = 100 or below 1 / ``SCALE_LIMIT``,
  or whose mean is beyond ``SCALE_LIMIT`` in absolute value, is two orders of magnitude off the priors;
* objective still moving (:func:`moving_objective_warnings`): with ``w`` = 10% of the trace (at least 5
  steps), compare the mean of the last ``w`` values with the mean of the ``w`` before them. The change
  counts as movement when it exceeds both ``OBJECTIVE_RTOL`` = 1e-3 of the objective's magnitude (at
  least 1) and ``NOISE_Z`` = 4 standard errors of that difference, where the per-step noise is
  estimated from the first differences of the last window (sd / sqrt 2: trend-free for white noise);
* restarts (:func:`restart_warnings`): final objectives more than ``max(1 nat, 1e-5 |best|)`` below
  the best mean different optima;
* NUTS (:func:`mcmc_warnings`): max split R-hat > 1.01, min bulk ESS < 100 per chain, any divergence,
  any draw at the maximum tree depth, chains whose mean log density differs by more than
  ``LP_GAP_SDS`` = 3 within-chain standard deviations (a chain stuck in another mode).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ppl_switch.errors import FitError, FitWarning

SCALE_LIMIT = 100.0
OBJECTIVE_WINDOW = 0.1
MIN_WINDOW = 5
OBJECTIVE_RTOL = 1e-3
NOISE_Z = 4.0
RESTART_ATOL = 1.0
RESTART_RTOL = 1e-5
R_HAT_LIMIT = 1.01
ESS_PER_CHAIN = 100
LP_GAP_SDS = 3.0


def emit(messages: Sequence[str], stacklevel: int = 3) -> None:
    """``warnings.warn`` each message as a :class:`FitWarning`."""
    for message in messages:
        warnings.warn(message, FitWarning, stacklevel=stacklevel)


def nonfinite_entries(arrays: Mapping[str, Any]) -> list[str]:
    """Names of the float arrays in ``arrays`` with a NaN or inf entry."""
    bad = []
    for name, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad.append(name)
    return bad


def require_finite(stage: str, arrays: Mapping[str, Any], *, hint: str = "", losses=None) -> None:
    """FitError naming ``stage`` and every site of ``arrays`` with a non-finite entry (and how many)."""
    bad = nonfinite_entries(arrays)
    if not bad:
        return
    counts = ", ".join(f"{name!r} ({int(np.sum(~np.isfinite(np.asarray(arrays[name]))))} of {np.size(arrays[name])})" for name in bad)
    raise FitError(
        f"{stage}: non-finite values at site(s) {counts}. {hint}".strip(),
        sites={"value": [f"site {name!r}" for name in bad]},
        losses=losses,
    )


# ----- data ----------------------------------------------------------------------------------------
def data_scale_warnings(model, data) -> list[str]:
    """Coordinates of Gaussian ``y`` two orders of magnitude off the priors' unit scale (see module doc)."""
    if getattr(model, "emission", "gaussian") != "gaussian":
        return []
    y = np.asarray(data.y, dtype=float)
    mask = np.asarray(data.mask, dtype=bool)
    count = mask.sum(axis=(0, 1))
    seen = count > 1
    if not seen.any():
        return []
    yz = np.where(mask, y, 0.0)
    mean = yz.sum(axis=(0, 1)) / np.maximum(count, 1)
    var = (np.where(mask, y - mean, 0.0) ** 2).sum(axis=(0, 1)) / np.maximum(count - 1, 1)
    sd = np.sqrt(var)
    large = seen & ((sd > SCALE_LIMIT) | (np.abs(mean) > SCALE_LIMIT))
    small = seen & (sd < 1.0 / SCALE_LIMIT) & (sd > 0)
    out = []
    if large.any() or small.any():
        dims = np.flatnonzero(large | small)
        shown = ", ".join(f"dim {d}: mean {mean[d]:.3g}, sd {sd[d]:.3g}" for d in dims[:4])
        more = f" (and {len(dims) - 4} more)" if len(dims) > 4 else ""
        out.append(
            f"data scale: y is far from the priors' unit scale ({shown}{more}; threshold: sd or |mean| above "
            f"{SCALE_LIMIT:g}, or sd below {1 / SCALE_LIMIT:g}). The priors then dominate or are ignored and "
            "fits can fail; standardise each coordinate first, e.g. y = (y - y.mean((0, 1))) / y.std((0, 1)), "
            "and map the results back."
        )
    return out


# ----- optimisation traces -------------------------------------------------------------------------
def objective_movement(values) -> Optional[dict[str, float]]:
    """Mean change of a trace between its last 10% and the 10% before, and the threshold it is held to.

    Returns None for traces too short to judge (fewer than ``2 * MIN_WINDOW`` finite values), else
    ``{"change", "threshold", "window", "noise"}``; ``change > threshold`` means still moving.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    window = max(int(round(OBJECTIVE_WINDOW * len(values))), MIN_WINDOW)
    if len(values) < 2 * window:
        return None
    last, previous = values[-window:], values[-2 * window : -window]
    change = float(abs(last.mean() - previous.mean()))
    noise = float(np.std(np.diff(last)) / np.sqrt(2.0))
    # the difference of two window means of white noise with sd `noise` has sd noise * sqrt(2 / window)
    threshold = max(OBJECTIVE_RTOL * max(abs(float(last.mean())), 1.0), NOISE_Z * noise * np.sqrt(2.0 / window))
    return {"change": change, "threshold": float(threshold), "window": window, "noise": noise}


def moving_objective_warnings(values, *, what: str, advice: str) -> list[str]:
    """One message if the trace ``values`` is still moving over its last window (module doc)."""
    m = objective_movement(values)
    if m is None or m["change"] <= m["threshold"]:
        return []
    return [
        f"{what} still moving: its mean over the last {m['window']} steps differs from the {m['window']} before "
        f"by {m['change']:.4g} (threshold {m['threshold']:.3g}: the larger of {OBJECTIVE_RTOL:g} x |objective| "
        f"and {NOISE_Z:g} standard errors of the step noise {m['noise']:.3g}); {advice}"
    ]


def restart_warnings(objectives, *, what: str = "EM restarts") -> list[str]:
    """A message when the starts ended in different optima (final objectives, higher = better)."""
    objectives = np.asarray(objectives, dtype=float).ravel()
    if objectives.size < 2:
        return []
    out = []
    finite = objectives[np.isfinite(objectives)]
    if finite.size < objectives.size:
        out.append(f"{what}: {objectives.size - finite.size} of {objectives.size} ended with a non-finite objective "
                   "and were discarded")
    if finite.size >= 2:
        best = float(finite.max())
        tol = max(RESTART_ATOL, RESTART_RTOL * abs(best))
        worse = finite < best - tol
        if worse.any():
            reached = finite.size - int(worse.sum())
            advice = ("only one start found it: run more restarts (num_restarts) before trusting it"
                      if reached == 1 else "the best was kept")
            out.append(
                f"{what} ended in different optima: {reached} of {finite.size} reached the best objective {best:.6g} "
                f"(within {tol:.3g}), the others ended up to {best - finite.min():.4g} nats lower (spread "
                f"{best - finite.min():.4g}); {advice}"
            )
    return out


# ----- MCMC ----------------------------------------------------------------------------------------
def chain_log_density_gap(lp) -> Optional[dict[str, float]]:
    """(chain, draw) log densities -> the largest gap between chain means and the pooled within-chain sd."""
    lp = np.asarray(lp, dtype=float)
    if lp.ndim != 2 or lp.shape[0] < 2 or lp.shape[1] < 2:
        return None
    means = lp.mean(axis=1)
    within = float(np.sqrt(np.mean(lp.var(axis=1, ddof=1))))
    return {"gap": float(means.max() - means.min()), "within_sd": within, "chain_means": means.tolist()}


def mcmc_warnings(diagnostics: Mapping[str, Any], num_chains: int, max_tree_depth: int) -> list[str]:
    """Messages for the NUTS diagnostics (``fit_nuts``'s ``diagnostics`` dict; thresholds in module doc)."""
    out = []
    if num_chains < 2:
        out.append("NUTS: R-hat is not available with 1 chain (it compares chains); run num_chains >= 2 to "
                   "check convergence")
    r_hat = diagnostics.get("max_r_hat")
    if r_hat is not None and not r_hat <= R_HAT_LIMIT:
        out.append(f"NUTS: max split R-hat {r_hat:.3g} > {R_HAT_LIMIT} (at {diagnostics.get('max_r_hat_site')!r}): the "
                   "chains disagree; run longer, start from a point estimate (init='svi'), or reparameterise")
    ess = diagnostics.get("min_ess")
    if ess is not None and ess < ESS_PER_CHAIN * num_chains:
        out.append(f"NUTS: min bulk ESS {ess:.1f} < {ESS_PER_CHAIN} per chain ({ESS_PER_CHAIN * num_chains} for "
                   f"{num_chains} chain(s), at {diagnostics.get('min_ess_site')!r}); draw more samples")
    divergences = int(diagnostics.get("num_divergences") or 0)
    if divergences:
        out.append(f"NUTS: {divergences} divergent transitions after warmup (per chain "
                   f"{diagnostics.get('divergences_per_chain')}); try a higher target_accept or a reparameterised model")
    saturated = int(diagnostics.get("num_max_tree_depth") or 0)
    if saturated:
        out.append(f"NUTS: {saturated} draws hit the maximum tree depth {max_tree_depth}; the sampler is "
                   "inefficient there (raise max_tree_depth, or dense_mass for correlated sites)")
    gap = diagnostics.get("chain_lp_gap")
    if gap is not None and gap > LP_GAP_SDS * diagnostics.get("chain_lp_within_sd", np.inf):
        out.append(f"NUTS: the chains' mean log densities differ by {gap:.1f} nats, {LP_GAP_SDS:g}+ times their "
                   f"within-chain sd {diagnostics['chain_lp_within_sd']:.2g} (chain means "
                   f"{np.round(diagnostics.get('chain_lp_means', []), 1).tolist()}): a chain is stuck in another mode")
    return out


__all__ = [
    "emit",
    "nonfinite_entries",
    "require_finite",
    "data_scale_warnings",
    "objective_movement",
    "moving_objective_warnings",
    "restart_warnings",
    "chain_log_density_gap",
    "mcmc_warnings",
]
