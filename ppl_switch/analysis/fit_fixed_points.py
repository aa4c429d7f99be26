"""The derived ``fixed_points`` group of a fit, for every model whose dynamics have fixed points: one
dispatch over the model zoo that ``ppl-switch fit`` calls before writing its .nc.

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

The affine models (lds, slds, rslds, arhmm, gdm) also hold ``eigenvalue_real``/``eigenvalue_imag``
(..., eig), ``stability`` (index into ``attrs["stability_types"]``) and ``spectral_radius``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import xarray as xr

from ppl_switch.analysis.fixed_points import STABILITY_TYPES, add_fixed_points_group, fixed_points, stability_types

__all__ = ["FIXED_POINT_DIMS", "add_fit_fixed_points", "condition_grid"]

#: model name -> dims of the group's fixed-point variable (models not listed get no group)
FIXED_POINT_DIMS = {
    "lds": ("chain", "draw", "latent"),
    "slds": ("chain", "draw", "state", "latent"),
    "rslds": ("chain", "draw", "state", "latent"),
    "arhmm": ("chain", "draw", "state", "obs"),
    "gdm": ("chain", "draw", "state", "latent"),
    "clds": ("chain", "draw", "condition", "latent"),
    "gpslds": ("sample", "root", "latent"),
    "gpsde": ("sample", "root", "latent"),
}

#: points of the CLDS condition grid (per input axis: round(CONDITION_GRID_SIZE ** (1 / input_dim)))
CONDITION_GRID_SIZE = 25


def add_fit_fixed_points(fit):
    """``fit.idata`` with the ``fixed_points`` group of the table above added (and ``flow_field`` for a
    2-D latent SDE); ``fit.idata`` unchanged for a model without fixed points."""
    from ppl_switch.results import replace_groups

    name = getattr(fit.model, "name", None)
    if name not in FIXED_POINT_DIMS:
        return fit.idata
    if name in ("slds", "rslds"):
        return add_fixed_points_group(fit.idata, fit.model)
    if name == "clds":
        from ppl_switch.analysis.clds_analysis import add_fixed_points

        return add_fixed_points(fit, condition_grid(fit.data))
    if name in ("gpslds", "gpsde"):
        return _latent_sde_fixed_points(fit)
    A, b, lead, space, keep = _affine_maps(fit.model, fit.samples, fit.data.obs_dim)
    ds = _affine_dataset(A, b, lead, space, keep)
    if name == "gdm":  # back to observation space: y* = S_k x* + b_k
        S, offsets = np.asarray(fit.samples["dynamics"]), np.asarray(fit.samples["offsets"])
        y_star = np.einsum("...knd,...kd->...kn", S, ds["fixed_point"].values) + offsets
        ds["fixed_point_obs"] = xr.Variable(("chain", "draw", "state", "obs"), y_star)
    return replace_groups(fit.idata, {"fixed_points": ds})


def _affine_maps(model, samples, obs_dim: int):
    """(A (..., D, D), b (..., D), lead dims, name of the coordinate dim, coordinates kept) of the
    per-draw affine maps whose fixed points the group holds."""
    get = lambda name: np.asarray(samples[name], float)  # noqa: E731
    if model.name == "lds":
        return get("dynamics_matrix"), get("dynamics_bias"), ("chain", "draw"), "latent", None
    if model.name == "arhmm":
        # the AR(L) recursion as a first-order one on (y_t, ..., y_{t-L+1}): its fixed point repeats y*
        # L times and its eigenvalues decide the stability of the AR process
        W, bias = get("ar_weights"), get("biases")  # (..., K, L, D, D), (..., K, D)
        L, D = W.shape[-3], W.shape[-1]
        top = np.concatenate([W[..., l, :, :] for l in range(L)], -1)  # (..., K, D, L*D)
        shift = np.broadcast_to(np.eye((L - 1) * D, L * D), top.shape[:-2] + ((L - 1) * D, L * D))
        companion = np.concatenate([top, shift], -2)
        padded = np.concatenate([bias, np.zeros(bias.shape[:-1] + ((L - 1) * D,))], -1)
        return companion, padded, ("chain", "draw", "state"), "obs", D
    if model.name == "gdm":
        # x = F y follows x -> F S_k x + F b_k in regime k (App. B)
        S = get("dynamics")  # (..., K, N, D)
        F = get("projection") if model.train_projection else model.fixed_projection(obs_dim)  # (..., D, N)
        A = np.einsum("...dn,...kne->...kde", F, S)
        b = np.einsum("...dn,...kn->...kd", F, get("offsets"))
        return A, b, ("chain", "draw", "state"), "latent", None
    raise ValueError(f"model: no affine fixed points for {model.name!r}")


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
