"""Fixed points of switching linear dynamics and their posterior uncertainty; the regime partition of
latent space of a recurrent SLDS. NumPy on host (inputs are posterior draws of small matrices).

For regime k with dynamics x_t = A_k x_{t-1} + b_k the fixed point is x*_k = (I - A_k)^{-1} b_k. Its
type follows the eigenvalues lambda of A_k (discrete time): all |lambda| < 1 stable, all > 1
unstable, mixed a saddle; complex eigenvalues make it a spiral (a "center" when |lambda| = 1 within
``tol``). When I - A_k is (nearly) singular there is no isolated fixed point (e.g. a pure translation,
A = I): x* is NaN and the type "none".
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import xarray as xr
from scipy.stats import chi2

__all__ = [
    "STABILITY_TYPES",
    "fixed_points",
    "continuous_time_dynamics",
    "stability_types",
    "summarise_fixed_points",
    "credible_ellipse",
    "regime_partition",
    "add_fixed_points_group",
]

STABILITY_TYPES = ("stable node", "stable spiral", "unstable node", "unstable spiral", "saddle", "center", "none")


def fixed_points(dynamics_matrix, dynamics_bias, tol: float = 1e-6):
    """x* = (I - A)^{-1} b for every regime and draw.

    Args:
        dynamics_matrix: (..., K, D, D). dynamics_bias: (..., K, D).
        tol: smallest singular value of I - A below which there is no isolated fixed point (NaN).
    Returns:
        (fixed points (..., K, D), eigenvalues of A (..., K, D) complex, sorted by modulus).
    """
    A = np.asarray(dynamics_matrix, float)
    b = np.asarray(dynamics_bias, float)
    if A.shape[-1] != A.shape[-2] or A.shape[:-1] != b.shape:
        raise ValueError(f"dynamics_bias: expected shape {A.shape[:-1]} to match dynamics_matrix {A.shape}, got {b.shape}")
    M = np.eye(A.shape[-1]) - A
    smallest = np.linalg.svd(M, compute_uv=False)[..., -1]
    singular = smallest < tol
    safe = np.where(singular[..., None, None], np.eye(A.shape[-1]), M)
    x = np.linalg.solve(safe, b[..., None])[..., 0]
    x = np.where(singular[..., None], np.nan, x)
    eig = np.linalg.eigvals(A)
    order = np.argsort(np.abs(eig), axis=-1)
    return x, np.take_along_axis(eig, order, -1)


def continuous_time_dynamics(dynamics_matrix, dynamics_bias, bin_size: float, tol: float = 1e-8):
    """The linear SDE dx = M_k (x - x*_k) dt + noise whose exact discretisation over ``bin_size`` is the
    regime map x_t = A_k x_{t-1} + b_k: M_k = logm(A_k) / bin_size (the principal real logarithm), x*_k
    the fixed point. For comparing a discrete-time (r)SLDS with a continuous-time drift (gpSLDS) in
    the same units; (A_k - I) / bin_size is its first-order approximation.

    Args:
        dynamics_matrix: (..., K, D, D). dynamics_bias: (..., K, D). bin_size: time per step (> 0).
        tol: largest imaginary part of logm(A_k) * bin_size accepted as rounding.
    Returns:
        (M (..., K, D, D), fixed points (..., K, D)).
    Raises:
        ValueError when some A_k has no real logarithm (a negative real eigenvalue: the map flips
        through the origin every step, which no linear flow does).
    """
    from scipy.linalg import logm

    if not bin_size > 0:
        raise ValueError(f"bin_size: expected a positive time per step, got {bin_size!r}")
    A = np.asarray(dynamics_matrix, float)
    centres, _ = fixed_points(A, dynamics_bias)
    flat = A.reshape((-1,) + A.shape[-2:])
    logs = np.stack([logm(a) for a in flat]).reshape(A.shape)
    bad = np.abs(logs.imag).max(axis=(-2, -1)) > tol
    if np.any(bad):
        raise ValueError(f"dynamics_matrix: no real matrix logarithm at {np.argwhere(bad).tolist()} "
                         "(a negative real eigenvalue)")
    return logs.real / bin_size, centres


def stability_types(eigenvalues, fixed_point=None, tol: float = 1e-3) -> np.ndarray:
    """Index into :data:`STABILITY_TYPES` for each regime (..., K) from eigenvalues (..., K, D)."""
    eig = np.asarray(eigenvalues)
    mod = np.abs(eig)
    complex_ = np.any(np.abs(eig.imag) > 1e-9, -1)
    stable, unstable = np.all(mod < 1 - tol, -1), np.all(mod > 1 + tol, -1)
    center = complex_ & np.all(np.abs(mod - 1) <= tol, -1)
    out = np.full(mod.shape[:-1], STABILITY_TYPES.index("saddle"))
    out = np.where(stable & ~complex_, STABILITY_TYPES.index("stable node"), out)
    out = np.where(stable & complex_, STABILITY_TYPES.index("stable spiral"), out)
    out = np.where(unstable & ~complex_, STABILITY_TYPES.index("unstable node"), out)
    out = np.where(unstable & complex_, STABILITY_TYPES.index("unstable spiral"), out)
    out = np.where(center, STABILITY_TYPES.index("center"), out)
    if fixed_point is not None:
        out = np.where(np.any(np.isnan(fixed_point), -1), STABILITY_TYPES.index("none"), out)
    return out


def credible_ellipse(mean, cov, level: float = 0.95, num_points: int = 100) -> np.ndarray:
    """(num_points, 2) boundary of the Gaussian credible region {x: (x-m)' S^-1 (x-m) <= chi2_2(level)}
    of the first two coordinates."""
    mean, cov = np.asarray(mean, float)[:2], np.asarray(cov, float)[:2, :2]
    vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
    radius = np.sqrt(chi2.ppf(level, 2) * np.maximum(vals, 0.0))
    angle = np.linspace(0, 2 * np.pi, num_points)
    circle = np.stack([np.cos(angle), np.sin(angle)], -1)
    return mean + (circle * radius) @ vecs.T


def summarise_fixed_points(dynamics_matrix, dynamics_bias, level: float = 0.95) -> dict:
    """Posterior summaries over draws (leading axes pooled) of each regime's fixed point.

    Args:
        dynamics_matrix: (draws..., K, D, D); dynamics_bias: (draws..., K, D).
    Returns:
        dict with ``mean`` (K, D), ``cov`` (K, D, D), ``lower``/``upper`` (K, D) central ``level``
        intervals per coordinate, ``prob_exists`` (K,) fraction of draws with an isolated fixed point,
        ``type_probs`` (K, len(STABILITY_TYPES)), ``spectral_radius`` (K,) posterior mean of max |lambda|,
        ``level``. Draws without a fixed point are left out of mean/cov/intervals.
    """
    A = np.asarray(dynamics_matrix, float)
    K, D = A.shape[-3], A.shape[-1]
    A = A.reshape((-1, K, D, D))
    b = np.asarray(dynamics_bias, float).reshape((-1, K, D))
    x, eig = fixed_points(A, b)
    types = stability_types(eig, x)
    out = {"mean": np.full((K, D), np.nan), "cov": np.full((K, D, D), np.nan), "lower": np.full((K, D), np.nan),
           "upper": np.full((K, D), np.nan), "level": level}
    exists = ~np.any(np.isnan(x), -1)
    for k in range(K):
        xs = x[exists[:, k], k]
        if len(xs):
            out["mean"][k] = xs.mean(0)
            out["cov"][k] = np.cov(xs.T).reshape(D, D) if len(xs) > 1 else np.zeros((D, D))
            out["lower"][k] = np.quantile(xs, (1 - level) / 2, axis=0)
            out["upper"][k] = np.quantile(xs, (1 + level) / 2, axis=0)
    out["prob_exists"] = exists.mean(0)
    out["type_probs"] = np.stack([(types == i).mean(0) for i in range(len(STABILITY_TYPES))], -1)
    out["spectral_radius"] = np.abs(eig).max(-1).mean(0)
    return out


def regime_partition(model, samples, grid, previous_state: Optional[int] = None) -> dict:
    """Most likely next regime on a grid of latent points, per draw, and its posterior probability.

    Args:
        model: an RSLDS (its ``transitions`` form names the logits).
        samples: ``{site: (chain, draw, ...)}`` or ``{site: (draws, ...)}`` with the transition sites.
        grid: (G, D) points of latent space.
        previous_state: row of the logits to use (see :func:`ppl_switch.models.rslds_transitions.regime_partition`).
    Returns:
        ``{"labels": (draws, G) int, "probs": (G, K) posterior probability of each regime being the argmax,
        "map": (G,) most probable label}``.
    """
    import jax

    from ppl_switch.models.rslds_transitions import regime_partition as partition, transition_site_names

    names = transition_site_names(model.transitions, model.input_dim)
    names = [n for n in names if n != "transition_input_weights"]  # inputs are not part of the map
    K = model.num_states
    W = np.asarray(samples["transition_weights"])
    lead = W.shape[:-2]
    flat = {n: np.asarray(samples[n]).reshape((-1,) + np.asarray(samples[n]).shape[len(lead):]) for n in names}
    grid = np.asarray(grid, float)
    labels = np.asarray(jax.vmap(lambda p: partition(model.transitions, p, grid, previous_state))(flat))
    probs = np.stack([(labels == k).mean(0) for k in range(K)], -1)
    return {"labels": labels, "probs": probs, "map": probs.argmax(-1)}


def add_fixed_points_group(idata, model=None, *, grid=None, level: float = 0.95, group: str = "fixed_points"):
    """Add a derived group with each draw's fixed points, eigenvalues and stability types, and (for an
    rSLDS with a ``grid``) the posterior probability of the regime partition.

    Variables: ``fixed_point`` (chain, draw, state, latent), ``eigenvalue_real``/``eigenvalue_imag``
    (chain, draw, state, eig), ``stability`` (chain, draw, state) index into ``attrs["stability_types"]``,
    ``spectral_radius`` (chain, draw, state); with a grid ``partition_probs`` (grid_point, state) and
    ``grid`` (grid_point, latent). Returns a new container of the same kind.
    """
    from ppl_switch.results import get_group, replace_groups

    post = get_group(idata, "posterior")
    if "dynamics_matrix" not in post or "dynamics_bias" not in post:
        raise ValueError("idata: the posterior has no dynamics_matrix / dynamics_bias (not a switching LDS fit)")
    A, b = post["dynamics_matrix"].values, post["dynamics_bias"].values
    x, eig = fixed_points(A, b)
    types = stability_types(eig, x)
    ds = {
        "fixed_point": (("chain", "draw", "state", "latent"), x),
        "eigenvalue_real": (("chain", "draw", "state", "eig"), eig.real),
        "eigenvalue_imag": (("chain", "draw", "state", "eig"), eig.imag),
        "stability": (("chain", "draw", "state"), types),
        "spectral_radius": (("chain", "draw", "state"), np.abs(eig).max(-1)),
    }
    if grid is not None:
        if model is None:
            raise ValueError("model: the regime partition needs the fitted model")
        samples = {n: post[n].values for n in post.data_vars}
        part = regime_partition(model, samples, grid)
        ds["partition_probs"] = (("grid_point", "state"), part["probs"])
        ds["grid"] = (("grid_point", "latent"), np.asarray(grid, float))
    attrs = {"stability_types": ",".join(STABILITY_TYPES), "level": level}
    return replace_groups(idata, {group: xr.Dataset({k: xr.Variable(*v) for k, v in ds.items()}, attrs=attrs)})
