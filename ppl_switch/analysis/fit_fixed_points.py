"""The derived ``fixed_points`` group of a fit, for every model whose dynamics have fixed points, as the
model asks for it (``Model.fixed_point_kind``, ``Model.affine_dynamics``): ``ppl-switch fit`` calls it
before writing its .nc, and a new model gets the group by declaring its kind, without editing this file.

Each model reuses its own analysis helper where there is one, so the group has the schema its model card
documents; in every model the fixed points are the variable ``fixed_point``. The fixed point is taken at
zero input where inputs enter the dynamics additively.

=============  =====================================================  =======================================
model          fixed point                                            dims of the fixed point variable
=============  =====================================================  =======================================
lds            x* = (I - A)^-1 b                                      ``fixed_point`` (chain, draw, latent)
slds, rslds    x*_k = (I - A_k)^-1 b_k                                ``fixed_point`` (chain, draw, state, latent)
arhmm          y*_k = (I - sum_l A_kl)^-1 b_k; eigenvalues of the     ``fixed_point`` (chain, draw, state, obs)
               companion matrix (dim eig = lags * obs)
gdm            x*_k = (I - F S_k)^-1 F b_k in the projected space     ``fixed_point`` (chain, draw, state, latent),
               x = F y, and y*_k = S_k x*_k + b_k                     ``fixed_point_obs`` (chain, draw, state, obs)
clds           x*(u) = (I - A(u))^-1 b(u) on a grid of conditions     ``fixed_point`` (chain, draw, condition,
               spanning the observed inputs                           latent)
gpslds, gpsde  roots of the drift f(x), Newton from a grid of starts  ``fixed_point`` (sample, root, latent); with
               in the box of the posterior mean path                  latent_dim 2 also a ``flow_field`` group
hmm            none (no continuous dynamics): no group
=============  =====================================================  =======================================

Their ``fixed_point_kind``: "affine" lds, arhmm, gdm; "switching" slds, rslds; "conditions" clds;
"drift_roots" gpslds, gpsde; None hmm, gdm_mixture. The affine models (lds, slds, rslds, arhmm, gdm) also
hold ``eigenvalue_real``/``eigenvalue_imag`` (..., eig), ``stability`` (index into
``attrs["stability_types"]``) and ``spectral_radius``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import xarray as xr

from ppl_switch.analysis.fixed_points import STABILITY_TYPES, add_fixed_points_group, fixed_points, stability_types

__all__ = ["add_fit_fixed_points", "condition_grid"]

#: points of the CLDS condition grid (per input axis: round(CONDITION_GRID_SIZE ** (1 / input_dim)))
CONDITION_GRID_SIZE = 25


def add_fit_fixed_points(fit):
    """``fit.idata`` with the ``fixed_points`` group its model asks for (``model.fixed_point_kind``, the table
    above; and ``flow_field`` for a 2-D latent SDE); ``fit.idata`` unchanged for a model without fixed points."""
    from ppl_switch.results import replace_groups

    kind = getattr(fit.model, "fixed_point_kind", None)
    if kind is None:
        return fit.idata
    if kind == "switching":
        return add_fixed_points_group(fit.idata, fit.model)
    if kind == "conditions":
        from ppl_switch.analysis.clds_analysis import add_fixed_points

        return add_fixed_points(fit, condition_grid(fit.data))
    if kind == "drift_roots":
        return _latent_sde_fixed_points(fit)
    if kind != "affine":
        raise ValueError(f"model: unknown fixed_point_kind {kind!r} (None, 'affine', 'switching', 'conditions', 'drift_roots')")
    A, b, lead, space, keep = fit.model.affine_dynamics(fit.samples, fit.data.obs_dim)
    ds = _affine_dataset(A, b, lead, space, keep)
    back = getattr(fit.model, "observation_fixed_points", None)
    if callable(back):  # e.g. the GDM: fixed points found in its projected space, shown in y too
        ds["fixed_point_obs"] = xr.Variable(lead + ("obs",), back(fit.samples, ds["fixed_point"].values))
    return replace_groups(fit.idata, {"fixed_points": ds})


def _affine_dataset(A, b, lead, space: str, keep: Optional[int]) -> xr.Dataset:
    """Fixed points, eigenvalues, stability type and spectral radius of every map, as in
    :func:`ppl_switch.analysis.fixed_points.add_fixed_points_group`."""
    x, eig = fixed_points(A, b)
    types = stability_types(eig, x)
    data = {
        "fixed_point": (lead + (space,), x[..., :keep]),
        "eigenvalue_real": (lead + ("eig",), eig.real),
        "eigenvalue_imag": (lead + ("eig",), eig.imag),
        "stability": (lead, types),
        "spectral_radius": (lead, np.abs(eig).max(-1)),
    }
    attrs = {"stability_types": ",".join(STABILITY_TYPES), "input": "fixed points at zero input"}
    return xr.Dataset({k: xr.Variable(*v) for k, v in data.items()}, attrs=attrs)


def condition_grid(data, size: int = CONDITION_GRID_SIZE) -> np.ndarray:
    """(G, input_dim) evenly spaced conditions over the box of the observed inputs (product grid)."""
    u = np.asarray(data.inputs)[np.asarray(data.time_mask)]
    per_axis = max(2, int(round(size ** (1.0 / u.shape[-1]))))
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(u.min(0), u.max(0))]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, u.shape[-1])


def _latent_sde_fixed_points(fit):
    """:func:`add_gpslds_summaries` for a 2-D latent; otherwise its fixed-point search alone, from a
    product grid of starts over the box of the posterior mean path (+- 10%)."""
    from ppl_switch.analysis import gpslds_analysis as gp
    from ppl_switch.results import replace_groups

    if fit.model.latent_dim == 2:
        return gp.add_gpslds_summaries(fit)
    x = np.asarray(fit.samples["x"]).reshape((-1,) + np.shape(fit.samples["x"])[-3:]).mean(0)
    xs = x[np.asarray(fit.data.time_mask)]
    span = xs.max(0) - xs.min(0)
    lo, hi = xs.min(0) - 0.1 * span, xs.max(0) + 0.1 * span
    K = xs.shape[-1]
    per_axis = max(2, int(round(36 ** (1.0 / K))))
    axes = [np.linspace(lo[i], hi[i], per_axis) for i in range(K)]
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, K)
    ds = gp.fixed_point_dataset(fit.model, fit.samples, starts, (lo, hi))
    return replace_groups(fit.idata, {"fixed_points": ds})
