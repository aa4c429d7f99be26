"""The summary figure of a fit over time: observations with the posterior predictive band and the inferred
state probabilities (:func:`plot_fit`), plus the conventions the other figures share (credible intervals,
state colours). Works on both InferenceData generations. Flow fields: :mod:`ppl_switch.plots.dynamics`,
:mod:`ppl_switch.plots.gpslds`."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ppl_switch.analysis.metrics import match_states
from ppl_switch.results import credible_interval_convention


def _group(idata, name: str):
    """The xarray.Dataset of group ``name``, or None if the fit has no such group."""
    from ppl_switch.results import get_group

    try:
        return get_group(idata, name)
    except KeyError:
        return None


def interval_label(prob: float, kind: str) -> str:
    """'89% ETI', '94% HDI': how figures name an interval."""
    return f"{100 * prob:.0f}% {kind.upper()}"


def credible_interval(draws, *, axis: int = 0, prob: Optional[float] = None, kind: Optional[str] = None):
    """(lower, upper) of the ``prob`` credible interval of ``draws`` along ``axis``; the other axes are kept.

    kind "eti": equal-tailed, the (1 - prob)/2 and (1 + prob)/2 quantiles. kind "hdi": the narrowest interval
    [x_(i), x_(i + floor(prob n))] between sorted draws, as ArviZ computes it. Defaults: the convention
    (:func:`credible_interval_convention`).
    """
    default_prob, default_kind = credible_interval_convention()
    prob = default_prob if prob is None else float(prob)
    kind = default_kind if kind is None else kind
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob: {prob} is not in (0, 1); pass e.g. 0.89")
    x = np.moveaxis(np.asarray(draws, dtype=float), axis, 0)
    if kind == "eti":
        lo, hi = np.quantile(x, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
        return lo, hi
    if kind != "hdi":
        raise ValueError(f"kind: {kind!r} is not 'eti' or 'hdi'")
    x = np.sort(x, axis=0)
    n = x.shape[0]
    span = int(np.floor(prob * n))
    if span >= n:
        return x[0], x[-1]
    widths = x[span:] - x[: n - span]  # (n - span, ...): width of each candidate interval
    start = np.argmin(widths, axis=0)[None]
    return np.take_along_axis(x, start, 0)[0], np.take_along_axis(x, start + span, 0)[0]


STATE_COLOURS = np.array(
    [[0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16], [0.58, 0.4, 0.74],
     [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.5, 0.5, 0.5], [0.74, 0.74, 0.13], [0.09, 0.75, 0.81]]
)


def state_colours(num_states: int) -> np.ndarray:
    """(K, 3) RGB colours, cycling through ten distinct ones."""
    return STATE_COLOURS[np.arange(num_states) % len(STATE_COLOURS)]


def plot_states(state_probs: np.ndarray, ax, *, true_states: Optional[np.ndarray] = None, length: Optional[int] = None):
    """Stacked posterior state probabilities (time, K) on ``ax``; true states as a strip above if given."""
    length = state_probs.shape[0] if length is None else length
    probs = np.asarray(state_probs)[:length]
    t = np.arange(length)
    colours = state_colours(probs.shape[1])
    ax.stackplot(t, probs.T, colors=colours, linewidth=0)
    if true_states is not None:
        ax.scatter(t, np.full(length, 1.04), c=colours[np.asarray(true_states)[:length]], marker="s", s=4, clip_on=False)
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(length - 1, 1))
    ax.set_ylabel("p(state)")
    return ax


def plot_fit(idata, out: Optional[str] = None, *, trial: int = 0, max_obs_dims: int = 3, true_states=None):
    """One figure summarising a fit for trial ``trial``: observations with the posterior predictive band (the
    library's credible interval, :func:`credible_interval_convention`; its legend names it, e.g. "89% ETI
    predictive"), its median, and the posterior state probabilities (for models with states). Saved to
    ``out`` if given."""
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observed = _group(idata, "observed_data")
    if observed is None:
        raise ValueError("idata: has no observed_data group to plot")
    constant = _group(idata, "constant_data")
    predictive = _group(idata, "posterior_predictive")
    states = _group(idata, "posterior_states")
    y = np.asarray(observed["y"].isel(trial=trial))
    length = int(constant["lengths"].values[trial]) if constant is not None and "lengths" in constant else y.shape[0]
    mask = np.asarray(constant["mask"].isel(trial=trial)) if constant is not None and "mask" in constant else None
    dims = list(range(min(max_obs_dims, y.shape[1])))

    has_states = states is not None and "state_probs" in states
    fig, axes = plt.subplots(len(dims) + int(has_states), 1, figsize=(9, 1.7 * (len(dims) + has_states)), sharex=True)
    axes = np.atleast_1d(axes)
    t = np.arange(length)
    for row, d in enumerate(dims):
        ax = axes[row]
        obs = np.where(mask[:length, d], y[:length, d], np.nan) if mask is not None else y[:length, d]
        if predictive is not None and "y" in predictive:
            draws = np.asarray(predictive["y"].isel(trial=trial, obs=d)).reshape(-1, y.shape[0])[:, :length]
            prob, kind = credible_interval_convention()
            lo, hi = credible_interval(draws, axis=0, prob=prob, kind=kind)
            mid = np.median(draws, axis=0)
            ax.fill_between(t, lo, hi, color="0.8", label=f"{interval_label(prob, kind)} predictive")
            ax.plot(t, mid, color="0.4", lw=0.8)
        ax.plot(t, obs, ".", ms=2.5, color="k", label="observed")
        ax.set_ylabel(f"y[{d}]")
    if has_states:
        probs = np.asarray(states["state_probs"].isel(trial=trial))
        truth = None
        if true_states is not None:  # the truth in the fit's labels, so that colours agree
            truth = np.asarray(true_states)[trial]
            truth = match_states(truth[:length], probs[:length].argmax(-1), probs.shape[-1])[truth]
        plot_states(probs, axes[-1], true_states=truth, length=length)
    axes[0].legend(loc="upper right", fontsize=7, frameon=False)
    axes[-1].set_xlabel("time step")
    model_name = idata.attrs.get("model", "") if hasattr(idata, "attrs") else ""
    fig.suptitle(f"{model_name} fit, trial {trial}".strip())
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=120)
        plt.close(fig)
    return fig
