"""Figures people expect from a fit: observations with the posterior predictive band, the inferred states
over time, and (for models with fixed points) flow fields. Works on both InferenceData generations."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ppl_switch.analysis.metrics import match_states


def _group(idata, name: str):
    """The xarray.Dataset of group ``name``, or None if the fit has no such group."""
    from ppl_switch.results import get_group

    try:
        return get_group(idata, name)
    except KeyError:
        return None


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
    """One figure summarising a fit for trial ``trial``: observations with the 94% posterior predictive band,
    and the posterior state probabilities (for models with states). Saved to ``out`` if given."""
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
            lo, mid, hi = np.percentile(draws, [3, 50, 97], axis=0)
            ax.fill_between(t, lo, hi, color="0.8", label="94% predictive")
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
