"""Figures of switching dynamics in a 2-D latent space: the flow field of each regime over the regime
partition, fixed points with credible ellipses, and a latent trajectory coloured by regime."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ppl_switch.analysis.fixed_points import credible_ellipse, summarise_fixed_points

__all__ = ["plot_dynamics"]


def plot_dynamics(samples, ax=None, *, model=None, latents=None, states=None, grid_size: int = 25, limits=None,
                  level: Optional[float] = None, out: Optional[str] = None):
    """Flow field x_{t+1} - x_t of the most likely regime at each grid point, fixed points (posterior
    mean) with ``level`` credible ellipses, and optionally a trajectory.

    Args:
        samples: ``{site: (chain, draw, ...)}`` or ``{site: (draws, ...)}`` with ``dynamics_matrix``
            (K, D, D) and ``dynamics_bias`` (K, D) (first two latent coordinates are drawn) and, for an
            rSLDS passed as ``model``, its transition sites (the regime partition: background colours).
        ax: matplotlib axes (a new figure if None).
        model: the RSLDS, to colour the plane by the posterior most likely regime and draw each point's
            flow under that regime; without it the flow of regime 0 is drawn everywhere.
        latents: optional (T, D) path to overlay; states: optional (T,) regimes to colour it.
        limits: ((x0, x1), (y0, y1)); default from the path or the fixed points.
        level: probability of the ellipses; default the library's credible probability
            (:func:`ppl_switch.results.credible_interval_convention`: 0.89 under arviz >= 1, 0.94 under arviz < 1).
        out: save the figure there.
    Returns:
        the axes.
    """
    import matplotlib.pyplot as plt

    from ppl_switch.plots.fit import state_colours
    from ppl_switch.results import credible_interval_convention

    if level is None:
        level = credible_interval_convention()[0]

    A = np.asarray(samples["dynamics_matrix"], float)
    b = np.asarray(samples["dynamics_bias"], float)
    K, D = A.shape[-3], A.shape[-1]
    if D < 2:
        raise ValueError(f"samples: plot_dynamics needs a latent dimension >= 2, got {D}")
    A_draws, b_draws = A.reshape((-1, K, D, D)), b.reshape((-1, K, D))
    summary = summarise_fixed_points(A_draws, b_draws, level)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    colours = state_colours(K)
    if limits is None:
        pts = np.asarray(latents, float)[:, :2] if latents is not None else np.nan_to_num(summary["mean"][:, :2])
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.15 * np.maximum(hi - lo, 1.0)
        limits = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    gx, gy = np.meshgrid(np.linspace(*limits[0], grid_size), np.linspace(*limits[1], grid_size))
    grid = np.zeros((grid_size * grid_size, D))
    grid[:, 0], grid[:, 1] = gx.ravel(), gy.ravel()
    if model is not None and "transition_weights" in samples:
        from ppl_switch.analysis.fixed_points import regime_partition

        part = regime_partition(model, samples, grid)
        labels = part["map"]
        ax.imshow(labels.reshape(grid_size, grid_size), origin="lower", extent=(*limits[0], *limits[1]), aspect="auto",
                  cmap=plt.matplotlib.colors.ListedColormap(colours[:K]), alpha=0.25, vmin=-0.5, vmax=K - 0.5)
    else:
        labels = np.zeros(len(grid), int)
    A_mean, b_mean = A_draws.mean(0), b_draws.mean(0)
    flow = np.einsum("gij,gj->gi", A_mean[labels], grid) + b_mean[labels] - grid
    ax.quiver(grid[:, 0], grid[:, 1], flow[:, 0], flow[:, 1], color="0.3", angles="xy", width=0.003)
    if latents is not None:
        x = np.asarray(latents, float)
        if states is None:
            ax.plot(x[:, 0], x[:, 1], lw=0.5, color="k", alpha=0.6)
        else:
            ax.scatter(x[:, 0], x[:, 1], s=2, c=colours[np.asarray(states) % len(colours)], alpha=0.6)
    for k in range(K):
        if np.isnan(summary["mean"][k]).any():
            continue
        ax.plot(*summary["mean"][k, :2], "o", color=colours[k], mec="k", ms=7, label=f"regime {k} fixed point")
        if np.isfinite(summary["cov"][k]).all() and np.any(summary["cov"][k] > 0):
            e = credible_ellipse(summary["mean"][k], summary["cov"][k], level)
            ax.plot(e[:, 0], e[:, 1], color=colours[k], lw=1.5)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_xlabel("latent 1")
    ax.set_ylabel("latent 2")
    if out is not None:
        ax.figure.savefig(out, dpi=120, bbox_inches="tight")
    return ax
