"""Figures (matplotlib is imported inside the drawing functions, so importing this package does not load it).

- :mod:`ppl_switch.plots.fit`: a fit over time (observations, predictive band, state probabilities) and the
  shared conventions (credible intervals, state colours); the CLI's ``ppl-switch plot``.
- :mod:`ppl_switch.plots.dynamics`: switching linear dynamics in a 2-D latent plane (flow, regimes, fixed points).
- :mod:`ppl_switch.plots.gpslds`: latent-SDE fits (gpSLDS, GP-SDE): drift, its variance, slow points, latents.

>>> from ppl_switch.plots import plot_fit
>>> fig = plot_fit(fit.idata, "fit.png")          # doctest: +SKIP
"""

from ppl_switch.plots.dynamics import plot_dynamics
from ppl_switch.plots.fit import STATE_COLOURS, credible_interval, interval_label, plot_fit, plot_states, state_colours
from ppl_switch.plots.gpslds import (
    plot_drift_variance,
    plot_fixed_point_regions,
    plot_flow_field,
    plot_gpslds_summary,
    plot_latents,
    plot_slow_points,
)

__all__ = [
    "STATE_COLOURS",
    "credible_interval",
    "interval_label",
    "plot_drift_variance",
    "plot_dynamics",
    "plot_fit",
    "plot_fixed_point_regions",
    "plot_flow_field",
    "plot_gpslds_summary",
    "plot_latents",
    "plot_slow_points",
    "plot_states",
    "state_colours",
]
