"""Figures for latent-SDE fits (gpSLDS, GP-SDE): flow field coloured by most likely regime, posterior
variance of the dynamics, slow-point probability, fixed points with credible ellipses, latent paths.

Every function takes the ``flow_field`` / ``fixed_points`` groups written by
:func:`ppl_switch.analysis.gpslds_analysis.add_gpslds_summaries` (or the same arrays) and an ``ax``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ppl_switch.plots.fit import state_colours
from ppl_switch.results import credible_interval_convention

__all__ = ["plot_flow_field", "plot_drift_variance", "plot_slow_points", "plot_fixed_point_regions", "plot_latents",
           "plot_gpslds_summary"]


def _grid(flow):
    return np.asarray(flow["x1"]), np.asarray(flow["x2"])


def plot_flow_field(flow, ax, *, stride: int = 2, show_regimes: bool = True):
    """Quiver of the posterior mean drift; background = most likely regime (GPSLDS)."""
    a, b = _grid(flow)
    mean = np.asarray(flow["drift_mean"])
    if show_regimes and "most_likely_regime" in flow:
        regime = np.asarray(flow["most_likely_regime"])
        colours = state_colours(int(regime.max()) + 1)
        ax.imshow(colours[regime], origin="lower", extent=(a[0], a[-1], b[0], b[-1]), alpha=0.25, aspect="auto")
    X, Y = np.meshgrid(a, b)
    s = slice(None, None, stride)
    ax.quiver(X[s, s], Y[s, s], mean[s, s, 0], mean[s, s, 1], color="k", angles="xy")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title("posterior mean drift")
    return ax


def plot_drift_variance(flow, ax, *, log: bool = True):
    """Posterior variance of f summed over latent dims (low where the data are)."""
    a, b = _grid(flow)
    v = np.asarray(flow["drift_var"]).sum(-1)
    im = ax.pcolormesh(a, b, np.log10(v) if log else v, cmap="Purples", shading="auto")
    ax.figure.colorbar(im, ax=ax, label="log10 var f" if log else "var f")
    ax.set_title("posterior variance of f")
    return ax


def plot_slow_points(flow, ax):
    """prod_k P(|f_k(x)| < eps) (the paper's fixed/slow-point probability)."""
    a, b = _grid(flow)
    im = ax.pcolormesh(a, b, np.asarray(flow["slow_point_probability"]), cmap="Purples", vmin=0, vmax=1, shading="auto")
    ax.figure.colorbar(im, ax=ax, label="P(|f| < eps)")
    ax.set_title(f"slow-point probability (eps = {flow.attrs.get('eps', '?')})")
    return ax


def plot_fixed_point_regions(regions: Sequence[dict], ax, *, true_points=None, colour="C3"):
    """Mean and credible ellipse of each root cluster (from ``fixed_point_regions``); true points as stars.

    The ellipse {(x - m)' S^-1 (x - m) <= -2 log(1 - p)} holds probability p of the cluster's Gaussian, with p
    the library's credible probability (:func:`ppl_switch.results.credible_interval_convention`: 0.89 under
    arviz >= 1, 0.94 under arviz < 1); for a Gaussian it is also the highest-density region."""
    prob, _ = credible_interval_convention()
    chi2 = -2.0 * np.log1p(-prob)  # chi-square(2) quantile at prob
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    for r in regions:
        L = np.linalg.cholesky(r["cov"] + 1e-12 * np.eye(2))
        ell = r["mean"][:, None] + np.sqrt(chi2) * L @ circle
        ax.plot(ell[0], ell[1], color=colour)
        ax.plot(*r["mean"], "o", color=colour, ms=4)
    if true_points is not None:
        tp = np.atleast_2d(true_points)
        ax.plot(tp[:, 0], tp[:, 1], "*", color="gold", mec="k", ms=12, label="true")
    return ax


def plot_latents(x, ax, *, true_x=None, trials: Optional[Sequence[int]] = None):
    """Latent paths (trials, T, 2) in the plane; dashed = truth if given."""
    x = np.asarray(x)
    trials = range(min(3, x.shape[0])) if trials is None else trials
    for i, n in enumerate(trials):
        ax.plot(x[n, :, 0], x[n, :, 1], color=f"C{i}", lw=1)
        if true_x is not None:
            ax.plot(true_x[n, :, 0], true_x[n, :, 1], color=f"C{i}", lw=1, ls="--")
    ax.set_title("latent paths")
    return ax


def plot_gpslds_summary(flow, regions=None, *, true_points=None, path=None):
    """A 1x3 figure: flow field (+ ellipses), variance of f, slow-point probability."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    plot_flow_field(flow, axes[0])
    if regions is not None:
        plot_fixed_point_regions(regions, axes[0], true_points=true_points)
    plot_drift_variance(flow, axes[1])
    plot_slow_points(flow, axes[2])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
