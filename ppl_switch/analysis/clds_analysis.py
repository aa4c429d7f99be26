"""Analyses of a fitted CLDS: fixed points and eigenvalues of the dynamics as functions of the
condition (with posterior credible bands), tuning curves, and co-smoothing.

All functions take a :class:`ppl_switch.models.clds.CLDS` and one parameter set (a dict of sites);
for posterior draws use :func:`over_draws`, which maps a function over leading (chain, draw) axes.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.data import SequenceData

__all__ = [
    "add_fixed_points",
    "co_smoothing",
    "credible_band",
    "dynamics_on_grid",
    "fixed_point_dataset",
    "fixed_points",
    "forecast_co_smoothing",
    "band_coverage",
    "over_draws",
    "r2_score",
    "tuning_curves",
    "whitening",
]


def whitening(Q):
    """Symmetric whitening H = Q^{-1/2} and its inverse for Q (D, D)."""
    s, U = jnp.linalg.eigh(Q)
    return (U / jnp.sqrt(s)) @ U.T, (U * jnp.sqrt(s)) @ U.T


def dynamics_on_grid(model, params: Mapping, u_grid, whiten: bool = False) -> dict:
    """A(u) (G, D, D) and b(u) (G, D) on a grid of conditions u_grid (G, input_dim); with ``whiten``
    in the coordinates where Q = I (A' = H A H^-1, b' = H b), which makes them comparable across fits
    that differ by an invertible transform of x (up to a rotation)."""
    u_grid = jnp.asarray(u_grid, dtype=float)
    if u_grid.ndim == 1:
        u_grid = u_grid[:, None]
    f = model.parameter_functions(params, u_grid)
    A, b = f["A"], f["b"]
    if whiten:
        H, Hinv = whitening(model.covariances(params)["dynamics_cov"])
        A, b = H @ A @ Hinv, b @ H.T
    return {"A": A, "b": b}


def fixed_points(model, params: Mapping, u_grid, whiten: bool = False) -> dict:
    """Fixed points x*(u) = (I - A(u))^-1 b(u) and eigenvalues of A(u) on a grid.

    Returns {"fixed_points": (G, D), "eigenvalues": (G, D) complex sorted by decreasing modulus,
    "A": (G, D, D), "b": (G, D)}.
    """
    dyn = dynamics_on_grid(model, params, u_grid, whiten)
    A, b = dyn["A"], dyn["b"]
    D = A.shape[-1]
    x_star = jnp.linalg.solve(jnp.eye(D) - A, b[..., None])[..., 0]
    eig = jnp.linalg.eigvals(A)
    order = jnp.argsort(-jnp.abs(eig), axis=-1)
    eig = jnp.take_along_axis(eig, order, axis=-1)
    return {"fixed_points": x_star, "eigenvalues": eig, "A": A, "b": b}


def over_draws(fn: Callable, samples: Mapping, *args, sample_ndim: int = 2, **kwargs):
    """Apply ``fn(params, *args, **kwargs)`` to every draw of ``samples``, whose arrays carry
    ``sample_ndim`` leading sample axes ((chain, draw) by default; 1 for (draw,)). Returns a pytree
    whose leaves have those leading axes in front. A host loop: eigenvalues run on the host on CPU."""
    flat = {k: np.asarray(v) for k, v in samples.items()}
    lead = next(iter(flat.values())).shape[:sample_ndim]
    if any(v.shape[:sample_ndim] != lead for v in flat.values()):
        raise ValueError(f"samples: every site must share the leading sample shape {lead}")
    size = int(np.prod(lead))
    flat = {k: v.reshape((size,) + v.shape[sample_ndim:]) for k, v in flat.items()}
    outs = [fn({k: v[i] for k, v in flat.items()}, *args, **kwargs) for i in range(size)]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]).reshape(lead + np.shape(xs[0])), *outs)


def credible_band(values, prob: float = 0.9, axis: int = 0):
    """Equal-tailed credible band of ``values`` over ``axis`` (draws). Returns (lower, upper)."""
    if not 0 < prob < 1:
        raise ValueError(f"prob: expected a number in (0, 1), got {prob}")
    values = np.asarray(values)
    lo, hi = np.quantile(values, [(1 - prob) / 2, (1 + prob) / 2], axis=axis)
    return lo, hi


def band_coverage(lower, upper, truth) -> float:
    """Fraction of entries of ``truth`` inside [lower, upper]."""
    truth = np.asarray(truth)
    return float(np.mean((truth >= lower) & (truth <= upper)))


def r2_score(y, y_hat, mask=None, axis=None):
    """Coefficient of determination 1 - SS_res / SS_tot over the observed entries (``mask`` True).
    With ``axis`` (e.g. the trial and time axes) one R^2 per remaining index (per neuron)."""
    y, y_hat = np.asarray(y), np.asarray(y_hat)
    mask = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    n = mask.sum(axis=axis)
    mean = np.where(mask, y, 0).sum(axis=axis, keepdims=axis is not None) / (
        np.maximum(n, 1) if axis is None else np.expand_dims(np.maximum(n, 1), axis))
    ss_res = np.where(mask, (y - y_hat) ** 2, 0).sum(axis=axis)
    ss_tot = np.where(mask, (y - mean) ** 2, 0).sum(axis=axis)
    return 1.0 - ss_res / ss_tot


def co_smoothing(model, params: Mapping, data: SequenceData, held_out: Optional[Sequence[int]] = None,
                 num_held_out: int = 5, jointly: bool = False) -> dict:
    """Co-smoothing R^2 (Pei et al. 2021, as in the CLDS paper): predict each held-out neuron of the
    test trials from the other neurons. With Poisson emissions the latents come from the Laplace
    smoother and the prediction is the expected count (:meth:`CLDS.predict_observations`).

    For each held-out neuron n (by default the ``num_held_out`` neurons of highest variance in ``data``)
    the latents are smoothed with neuron n masked out, and y_n is predicted as C_n(u_t) E[x_t | y_{-n}]
    + d_n(u_t). With ``jointly=True`` all held-out neurons are masked at once (NLB held-in/held-out).

    Returns {"held_out": (H,) neuron indices, "r2": (H,) per-neuron R^2, "mean_r2": their mean,
    "predictions": (trials, time, H)}.
    """
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    N = y.shape[-1]
    if held_out is None:
        if not 1 <= num_held_out <= N - 1:
            raise ValueError(f"num_held_out: expected 1..{N - 1} (some neurons must stay observed), got {num_held_out}")
        var = np.array([np.var(y[..., n][mask[..., n]]) for n in range(N)])
        held_out = np.argsort(-var)[:num_held_out]
    held_out = np.asarray(held_out, dtype=int)
    if held_out.ndim != 1 or held_out.size == 0 or held_out.min() < 0 or held_out.max() >= N:
        raise ValueError(f"held_out: expected neuron indices in [0, {N}), got {held_out.tolist()}")

    predict = jax.jit(lambda m: model.predict_observations(params, data, mask=m))
    preds = []
    if jointly:
        m = mask.copy()
        m[..., held_out] = False
        full = np.asarray(predict(jnp.asarray(m)))
        preds = [full[..., n] for n in held_out]
    else:
        for n in held_out:
            m = mask.copy()
            m[..., n] = False
            preds.append(np.asarray(predict(jnp.asarray(m)))[..., n])
    preds = np.stack(preds, -1)
    r2 = r2_score(y[..., held_out], preds, mask[..., held_out], axis=(0, 1))
    return {"held_out": held_out, "r2": r2, "mean_r2": float(np.mean(r2)), "predictions": preds}


def _top_variance_neurons(data: SequenceData, num: int) -> np.ndarray:
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    N = y.shape[-1]
    if not 1 <= num <= N - 1:
        raise ValueError(f"num_held_out: expected 1..{N - 1} (some neurons must stay observed), got {num}")
    var = np.array([np.var(y[..., n][mask[..., n]]) for n in range(N)])
    return np.argsort(-var)[:num]


def forecast_co_smoothing(model, params: Mapping, data: SequenceData, horizons: Sequence[int] = (0, 1, 5),
                          held_out: Optional[Sequence[int]] = None, num_held_out: int = 5) -> dict:
    """Causal co-smoothing: predict held-out neurons ``k`` steps ahead from the held-in neurons' past.

    The held-out neurons (default: the ``num_held_out`` of highest variance) are masked on every test
    trial; the Kalman filter runs on the held-in neurons; for each horizon k the filtered mean
    E[x_t | y^in_{1:t}] is propagated k steps with the model's own dynamics at the known conditions,
    x_{s+1} = A(u_s) x_s + b(u_s), and y_{t+k} of the held-out neurons is predicted as
    C(u_{t+k}) x_{t+k} + d(u_{t+k}). k = 0 is filtered (causal) co-smoothing. Unlike smoothed
    co-smoothing, which mostly measures how well the held-in neurons pin down x_t, this depends on the
    learned dynamics. Gaussian emissions only (Kalman filter).

    Returns {"held_out": (H,), "horizons": list, "r2": {k: (H,) per-neuron R^2 over the steps t + k
    inside the trials}, "mean_r2": {k: mean}}.
    """
    from ppl_switch.ops.kalman import lgssm_filter

    if getattr(model, "emission", "gaussian") != "gaussian":
        raise ValueError("model: forecast_co_smoothing needs Gaussian emissions (Kalman filter)")
    horizons = [int(k) for k in horizons]
    if not horizons or min(horizons) < 0 or max(horizons) >= data.num_timesteps:
        raise ValueError(f"horizons: expected integers in [0, {data.num_timesteps - 1}], got {horizons}")
    held_out = _top_variance_neurons(data, num_held_out) if held_out is None else np.asarray(held_out, dtype=int)
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    held_in_mask = mask.copy()
    held_in_mask[..., held_out] = False
    K = max(horizons)

    @jax.jit
    def predictions(held_in_mask):
        def one(yk, mk, u):
            lg = model.lgssm(params, u)
            x = lgssm_filter(lg, yk, mk).filtered_means  # (T, D)
            f = model.parameter_functions(params, u)
            A, b, C = f["A"], f["b"], f["C"]
            T = x.shape[0]
            C = jnp.broadcast_to(C, (T,) + C.shape[-2:])
            d = f["d"] if "d" in f else jnp.zeros(C.shape[:2], x.dtype)
            d = jnp.broadcast_to(d, C.shape[:2])
            A = jnp.broadcast_to(A, (T,) + A.shape[-2:])
            b = jnp.broadcast_to(b, (T,) + b.shape[-1:])
            out = []
            for k in range(K + 1):  # x now holds E[x_{t+k} | y_{1:t}] at row t (valid for t + k < T)
                out.append(jnp.einsum("tnd,td->tn", jnp.roll(C, -k, 0), x) + jnp.roll(d, -k, 0))
                x = jnp.einsum("tij,tj->ti", jnp.roll(A, -k, 0), x) + jnp.roll(b, -k, 0)
            return jnp.stack(out)  # (K + 1, T, N): row k, step t predicts y_{t+k}

        return jax.vmap(one)(jnp.asarray(data.y), held_in_mask, jnp.asarray(data.inputs))

    pred = np.asarray(predictions(jnp.asarray(held_in_mask)))  # (trials, K + 1, T, N)
    r2, mean_r2 = {}, {}
    T = y.shape[1]
    for k in horizons:
        target = y[:, k:][..., held_out]
        m = mask[:, k:][..., held_out]
        r2[k] = r2_score(target, pred[:, k, : T - k][..., held_out], m, axis=(0, 1))
        mean_r2[k] = float(np.mean(r2[k]))
    return {"held_out": held_out, "horizons": horizons, "r2": r2, "mean_r2": mean_r2}


def tuning_curves(model, params: Mapping, data: SequenceData, num_bins: int = 50, column: int = 0,
                  period: float = 2 * math.pi) -> dict:
    """Model and empirical tuning curves over one angular condition column (paper Eq. 14).

    Model: E[y | theta] = C(theta) E[x | theta] + d(theta), with E[x | theta] the average smoothed mean
    over time steps whose condition falls in the bin (Poisson emissions: bin_size link(...) of that,
    with the Laplace posterior means). Empirical: average observed y per bin.
    Returns {"centers": (B,), "model": (B, N), "empirical": (B, N), "counts": (B,)} (NaN in empty bins).
    """
    means = np.asarray(model.smooth(params, data)[0])
    u = np.asarray(data.inputs)
    theta = np.mod(u[..., column], period)
    edges = np.linspace(0, period, num_bins + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    idx = np.clip(np.digitize(theta, edges) - 1, 0, num_bins - 1)
    valid = np.asarray(data.time_mask)
    D, N = means.shape[-1], data.obs_dim
    ex = np.full((num_bins, D), np.nan)
    emp = np.full((num_bins, N), np.nan)
    counts = np.zeros(num_bins, int)
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    for b in range(num_bins):
        sel = valid & (idx == b)
        counts[b] = sel.sum()
        if counts[b]:
            ex[b] = means[sel].mean(0)
            m = mask[sel]
            emp[b] = np.where(m, y[sel], 0).sum(0) / np.maximum(m.sum(0), 1)
    grid = np.zeros((num_bins, u.shape[-1]))
    grid[:, column] = centers
    f = model.parameter_functions(params, jnp.asarray(grid))
    curve = np.einsum("bnd,bd->bn", np.asarray(f["C"]) if np.ndim(f["C"]) == 3 else np.asarray(f["C"]), ex)
    if "d" in f:
        curve = curve + np.asarray(f["d"])
    if getattr(model, "emission", "gaussian") == "poisson":  # rate at the mean log-rate
        from ppl_switch.ops.sde import inverse_link

        curve = model.bin_size * np.asarray(inverse_link(model.link)(jnp.asarray(curve)))
    return {"centers": centers, "model": curve, "empirical": emp, "counts": counts}


def fixed_point_dataset(model, samples: Mapping, u_grid, whiten: bool = False, sample_ndim: int = 2):
    """Per-draw fixed points, eigenvalues (modulus and real part), A(u) and b(u) on a condition grid,
    as an ``xarray.Dataset`` with dims (chain, draw, condition, latent | eig[, latent_from]) -- the derived
    ``fixed_points`` group of a CLDS fit; the fixed points are the variable ``fixed_point``, as for every model."""
    import xarray as xr

    u_grid = np.asarray(u_grid, dtype=float)
    if u_grid.ndim == 1:
        u_grid = u_grid[:, None]
    out = over_draws(lambda p: fixed_points(model, p, u_grid, whiten=whiten), samples, sample_ndim=sample_ndim)
    lead = ("chain", "draw")[-sample_ndim:] if sample_ndim <= 2 else tuple(f"sample_{i}" for i in range(sample_ndim))
    eig = np.asarray(out["eigenvalues"])
    coords = {"condition": np.arange(u_grid.shape[0])}
    return xr.Dataset(
        {
            "fixed_point": (lead + ("condition", "latent"), np.asarray(out["fixed_points"])),
            "eigenvalue_modulus": (lead + ("condition", "eig"), np.abs(eig)),
            "eigenvalue_real": (lead + ("condition", "eig"), eig.real),
            "eigenvalue_imag": (lead + ("condition", "eig"), eig.imag),
            "dynamics_matrix": (lead + ("condition", "latent", "latent_from"), np.asarray(out["A"])),
            "dynamics_bias": (lead + ("condition", "latent"), np.asarray(out["b"])),
            "condition_value": (("condition", "input"), u_grid),
        },
        coords=coords,
        attrs={"whitened": int(whiten)},
    )


def add_fixed_points(fit, u_grid, whiten: bool = False):
    """Return ``fit.idata`` with a ``fixed_points`` group (see :func:`fixed_point_dataset`) added,
    computed from every posterior draw (or the EM point estimate) of a CLDS fit."""
    from ppl_switch.results import replace_groups

    ds = fixed_point_dataset(fit.model, fit.samples, u_grid, whiten=whiten)
    return replace_groups(fit.idata, {"fixed_points": ds})
