"""Flow fields, fixed points and their uncertainty for latent-SDE fits (GPSLDS, GPSDE).

All summaries are computed per posterior draw of the drift parameters (``{site: (S, ...)}`` or
``{site: (chain, draw, ...)}``) and then pooled:

* :func:`drift_draws` -- f(x) on a grid for every draw, (S, G, K);
* :func:`flow_summary` -- posterior mean and variance of f on the grid;
* :func:`slow_point_probability` -- the paper's map prod_k P(|f_k(x)| < eps), from the Gaussian moments
  of q(f(x)) (the paper's formula) or as the fraction of draws (``method="empirical"``);
* :func:`fixed_points` -- per draw, roots of f by Newton from a grid of starts inside the data region,
  their Jacobian eigenvalues and stability type;
* :func:`fixed_point_regions` -- pooled roots clustered across draws, with mean, covariance and the
  94% credible ellipse of each cluster (and the fraction of draws that have a root there);
* :func:`partition_map` -- pi(x) and the most likely regime on the grid (GPSLDS);
* :func:`add_gpslds_summaries` -- all of the above written into the fit's InferenceData as derived
  groups ``flow_field`` and ``fixed_points``;
* alignment to a ground truth (:func:`align_latents`, :func:`aligned_drift`) and the synthetic-benchmark
  metrics (:func:`dynamics_nmse`, :func:`visited_cells`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from ppl_switch.analysis.metrics import affine_align

__all__ = [
    "grid_points",
    "drift_draws",
    "flow_summary",
    "slow_point_probability",
    "fixed_points",
    "classify_stability",
    "fixed_point_regions",
    "partition_map",
    "add_gpslds_summaries",
    "align_latents",
    "aligned_drift",
    "visited_cells",
    "dynamics_nmse",
    "in_credible_ellipse",
    "credible_level",
]

_DRIFT_SITES = ("partition_weights", "temperature", "fixed_points", "regime_matrix", "regime_offset",
                "slope_scales", "offset_scale", "rbf_lengthscale", "rbf_amplitude", "rbf_weights")


def _flat_draws(model, samples: Mapping) -> dict:
    """Drift-parameter draws with (chain, draw) or (S,) leading axes flattened to (S,)."""
    ref = model.site_dims()
    out = {}
    for name in _DRIFT_SITES:
        if name in samples:
            v = np.asarray(samples[name])
            event = len(ref.get(name, ()))
            out[name] = v.reshape((-1,) + v.shape[v.ndim - event:])
    return out


def grid_points(lo, hi, num: int = 40):
    """A (num*num, 2) grid over the box lo..hi (scalars or (2,) arrays), and the two axes."""
    lo, hi = np.broadcast_to(lo, (2,)).astype(float), np.broadcast_to(hi, (2,)).astype(float)
    a = np.linspace(lo[0], hi[0], num)
    b = np.linspace(lo[1], hi[1], num)
    X, Y = np.meshgrid(a, b, indexing="xy")
    return np.stack([X.ravel(), Y.ravel()], -1), (a, b)


def drift_draws(model, samples, points) -> np.ndarray:
    """(S, G, K) f at ``points`` (G, K) for every draw."""
    draws = _flat_draws(model, samples)
    pts = jnp.asarray(points, float)
    return np.asarray(jax.jit(jax.vmap(lambda p: model.drift(p, pts)))(draws))


def flow_summary(model, samples, points) -> dict:
    """{"mean": (G, K), "var": (G, K)} posterior moments of f at ``points``."""
    f = drift_draws(model, samples, points)
    return {"mean": f.mean(0), "var": f.var(0)}


def slow_point_probability(mean=None, var=None, eps: float = 0.5, *, draws=None, method: str = "gaussian") -> np.ndarray:
    """prod_k P(|f_k(x)| < eps) per grid point.

    ``method="gaussian"``: the paper's formula from the marginal moments (mean, var (G, K)) of q(f);
    ``method="empirical"``: fraction of ``draws`` (S, G, K) with every |f_k| < eps.
    """
    if method == "empirical":
        return np.mean(np.all(np.abs(np.asarray(draws)) < eps, -1), 0)
    if method != "gaussian":
        raise ValueError(f"method: expected 'gaussian' or 'empirical', got {method!r}")
    s = np.sqrt(np.maximum(np.asarray(var), 1e-12))
    m = np.asarray(mean)
    p = norm.cdf((eps - m) / s) - norm.cdf((-eps - m) / s)
    return np.asarray(np.prod(p, -1))


def classify_stability(eigenvalues, tol: float = 1e-9) -> np.ndarray:
    """Stability type from Jacobian eigenvalues (..., K): "stable"/"unstable" node or focus,
    "saddle", "center"; "" for NaN rows."""
    ev = np.asarray(eigenvalues)
    re, im = ev.real, ev.imag
    out = np.full(ev.shape[:-1], "", dtype=object)
    valid = np.all(np.isfinite(re), -1)
    osc = np.any(np.abs(im) > tol, -1)
    allneg, allpos = np.all(re < -tol, -1), np.all(re > tol, -1)
    kind = np.where(osc, "focus", "node")
    out = np.where(valid & allneg, "stable " + kind, out)
    out = np.where(valid & allpos, "unstable " + kind, out)
    out = np.where(valid & ~allneg & ~allpos & ~osc, "saddle", out)
    out = np.where(valid & ~allneg & ~allpos & osc, "center", out)
    return out


def fixed_points(model, samples, starts, *, region=None, num_iters: int = 50, tol: float = 1e-6,
                 merge_radius: float = 0.1) -> dict:
    """Roots of f per draw by damped Newton from ``starts`` (M, K), kept if |f| < tol inside ``region``.

    Args:
        region: (lo, hi) box (arrays (K,)) the roots must lie in (default: the box of the starts).
        merge_radius: roots of one draw closer than this are the same root.
    Returns:
        {"points": (S, M, K) roots (NaN where none), "eigenvalues": (S, M, K) complex Jacobian eigenvalues,
         "stability": (S, M) strings, "num_roots": (S,)} -- each draw's distinct roots first.
    """
    draws = _flat_draws(model, samples)
    starts = jnp.asarray(starts, float)
    lo, hi = (starts.min(0), starts.max(0)) if region is None else (jnp.asarray(region[0], float), jnp.asarray(region[1], float))

    def solve(p, x0):
        f = lambda x: model.drift(p, x)

        def step(x, _):
            J = jax.jacfwd(f)(x)
            dx = jnp.linalg.solve(J, f(x))
            dx = dx * jnp.minimum(1.0, 2.0 / (jnp.linalg.norm(dx) + 1e-12))  # trust region of 2 units
            return x - dx, None

        x, _ = jax.lax.scan(step, x0, None, length=num_iters)
        ok = (jnp.linalg.norm(f(x)) < tol) & jnp.all((x >= lo) & (x <= hi)) & jnp.all(jnp.isfinite(x))
        return jnp.where(ok, x, jnp.nan), jax.jacfwd(f)(x)

    roots, jacs = jax.jit(jax.vmap(lambda p: jax.vmap(lambda s: solve(p, s))(starts)))(draws)
    roots, jacs = np.asarray(roots), np.asarray(jacs)
    S, M, K = roots.shape
    points = np.full((S, M, K), np.nan)
    eig = np.full((S, M, K), np.nan + 0j)
    counts = np.zeros(S, int)
    for s in range(S):
        kept = []
        for m in range(M):
            r = roots[s, m]
            if not np.all(np.isfinite(r)) or any(np.linalg.norm(r - q) < merge_radius for q in kept):
                continue
            kept.append(r)
            points[s, len(kept) - 1] = r
            eig[s, len(kept) - 1] = np.linalg.eigvals(jacs[s, m])
        counts[s] = len(kept)
    return {"points": points, "eigenvalues": eig, "stability": classify_stability(eig), "num_roots": counts}


def fixed_point_regions(points, *, radius: float = 1.5, min_fraction: float = 0.05) -> list[dict]:
    """Cluster the roots of all draws (S, M, K) greedily (each root joins the nearest cluster mean within
    ``radius``), keeping clusters found in at least ``min_fraction`` of the draws.

    Returns a list (most frequent first) of {"mean" (K,), "cov" (K, K), "fraction" (share of draws
    with a root in the cluster), "points" (n, K)}; its credible ellipses are in :func:`in_credible_ellipse`.
    """
    pts = np.asarray(points)
    S = pts.shape[0]
    clusters: list[dict] = []
    for s in range(S):
        for r in pts[s]:
            if not np.all(np.isfinite(r)):
                continue
            best, dist = None, radius
            for c in clusters:
                d = np.linalg.norm(r - np.mean(c["points"], 0))
                if d < dist:
                    best, dist = c, d
            if best is None:
                clusters.append({"points": [r], "draws": {s}})
            else:
                best["points"].append(r)
                best["draws"].add(s)
    out = []
    for c in clusters:
        p = np.asarray(c["points"])
        frac = len(c["draws"]) / S
        if frac < min_fraction:
            continue
        cov = np.cov(p.T) if len(p) > 2 else np.eye(p.shape[1]) * 1e-6
        out.append({"mean": p.mean(0), "cov": np.atleast_2d(cov), "fraction": frac, "points": p})
    return sorted(out, key=lambda c: -c["fraction"])


def _mahalanobis_sq(region: dict, x) -> float:
    d = np.asarray(x, float) - region["mean"]
    return float(d @ np.linalg.solve(region["cov"] + 1e-12 * np.eye(len(d)), d))


def in_credible_ellipse(region: dict, x, prob: "float | None" = None) -> bool:
    """Whether x (K,) lies inside the cluster's ``prob`` credible ellipse, {y: (y - mean)' cov^-1 (y - mean)
    <= the chi-square(K) quantile at ``prob``} (the region as a Gaussian). ``prob`` defaults to the library's
    credible probability, the one its figures and summaries use (:func:`ppl_switch.results.credible_interval_convention`:
    0.89 under arviz >= 1, 0.94 under arviz < 1)."""
    from scipy.stats import chi2

    from ppl_switch.results import credible_interval_convention

    prob = credible_interval_convention()[0] if prob is None else float(prob)
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob: expected a probability in (0, 1), got {prob}")
    return _mahalanobis_sq(region, x) <= chi2.ppf(prob, len(region["mean"]))


def credible_level(region: dict, x) -> float:
    """The level of the smallest credible ellipse of the cluster that contains x (2-d: the chi-square(2)
    CDF of the squared Mahalanobis distance, 1 - exp(-d^2 / 2)). Across repeated data sets a calibrated
    Gaussian posterior gives levels uniform on [0, 1]; x is inside the ``prob`` ellipse iff the level <= prob."""
    if len(region["mean"]) != 2:
        raise ValueError(f"credible_level: expected a 2-d region, got dimension {len(region['mean'])}")
    return float(-np.expm1(-0.5 * _mahalanobis_sq(region, x)))


def partition_map(model, samples, points) -> dict:
    """{"mean": (G, J) posterior mean of pi(x), "most_likely": (G,) argmax regime} (GPSLDS only)."""
    draws = _flat_draws(model, samples)
    pts = jnp.asarray(points, float)
    pi = np.asarray(jax.jit(jax.vmap(lambda p: model.partition(p, pts)))(draws))
    return {"mean": pi.mean(0), "most_likely": pi.mean(0).argmax(-1)}


def add_gpslds_summaries(fit, *, lo=None, hi=None, num: int = 30, eps: float = 0.5, samples=None,
                         num_starts: int = 6, max_roots: int = 6):
    """Return ``fit.idata`` with derived groups ``flow_field`` and ``fixed_points`` added.

    ``flow_field`` (dims x1, x2 = the grid axes, latent, state): ``drift_mean``, ``drift_var``,
    ``slow_point_probability`` (eps as attr), and for GPSLDS ``partition_mean``, ``most_likely_regime``.
    ``fixed_points`` (dims sample, root, latent): ``fixed_point``, ``eigenvalue_real``, ``eigenvalue_imag``,
    ``stability`` and ``num_roots``. The grid defaults to the range of the posterior mean path +- 10%.
    ``samples`` overrides the fit's draws (e.g. extra parameter draws from the guide).
    """
    from ppl_switch.results import replace_groups
    import xarray as xr

    samples = fit.samples if samples is None else samples
    if lo is None or hi is None:
        x = np.asarray(fit.samples["x"]).reshape((-1,) + np.shape(fit.samples["x"])[-3:]).mean(0)
        tm = np.asarray(fit.data.time_mask)
        xs = x[tm]
        span = xs.max(0) - xs.min(0)
        lo, hi = xs.min(0) - 0.1 * span, xs.max(0) + 0.1 * span
    pts, (a, b) = grid_points(lo, hi, num)
    f = drift_draws(fit.model, samples, pts)
    mean, var = f.mean(0), f.var(0)
    shape = (num, num)
    K = mean.shape[-1]
    flow = {
        "drift_mean": (("x2", "x1", "latent"), mean.reshape(shape + (K,))),
        "drift_var": (("x2", "x1", "latent"), var.reshape(shape + (K,))),
        "slow_point_probability": (("x2", "x1"), slow_point_probability(mean, var, eps).reshape(shape)),
    }
    if hasattr(fit.model, "partition"):
        part = partition_map(fit.model, samples, pts)
        flow["partition_mean"] = (("x2", "x1", "state"), part["mean"].reshape(shape + (-1,)))
        flow["most_likely_regime"] = (("x2", "x1"), part["most_likely"].reshape(shape))
    flow_ds = xr.Dataset({k: xr.Variable(*v) for k, v in flow.items()}, coords={"x1": a, "x2": b}, attrs={"eps": eps})
    starts, _ = grid_points(lo, hi, num_starts)
    fp_ds = fixed_point_dataset(fit.model, samples, starts, (lo, hi), max_roots)
    return replace_groups(fit.idata, {"flow_field": flow_ds, "fixed_points": fp_ds})


def fixed_point_dataset(model, samples, starts, region, max_roots: int = 6):
    """Roots of the drift found from ``starts`` (S, K) inside ``region`` = (lo, hi), per draw, as the
    ``fixed_points`` group: ``fixed_point`` (sample, root, latent; NaN where fewer roots were found),
    ``eigenvalue_real``/``eigenvalue_imag`` of the drift Jacobian, ``stability`` and ``num_roots``."""
    import xarray as xr

    fp = fixed_points(model, samples, starts, region=region)
    R = min(max_roots, fp["points"].shape[1])
    return xr.Dataset({
        "fixed_point": (("sample", "root", "latent"), fp["points"][:, :R]),
        "eigenvalue_real": (("sample", "root", "latent"), fp["eigenvalues"][:, :R].real),
        "eigenvalue_imag": (("sample", "root", "latent"), fp["eigenvalues"][:, :R].imag),
        "stability": (("sample", "root"), fp["stability"][:, :R].astype(str)),
        "num_roots": (("sample",), fp["num_roots"]),
    })


# --------------------------------------------------------------------------------------------------
# Alignment to a ground truth and the synthetic metrics


def align_latents(x_hat, x_true, mask=None):
    """Affine map x_true ~ P x_hat + o from paths (..., T, K) pooled over trials; returns (P (K, K), o (K,))."""
    src = np.asarray(x_hat).reshape(-1, np.shape(x_hat)[-1])
    tgt = np.asarray(x_true).reshape(-1, np.shape(x_true)[-1])
    if mask is not None:
        keep = np.asarray(mask).reshape(-1)
        src, tgt = src[keep], tgt[keep]
    _, coef = affine_align(src, tgt)
    K = src.shape[1]
    return coef[:K].T, coef[K]


def align_by_emissions(C_hat, d_hat, C_true, d_true):
    """Affine map x_true = P x_hat + o implied by two readouts of the same rates, C_hat x_hat + d_hat =
    C_true x_true + d_true: P = C_true^+ C_hat, o = C_true^+ (d_hat - d_true) (the reference code's
    alignment, with the offset it leaves out). Unlike :func:`align_latents` it does not use the inferred
    paths, so smoothing error in q(x) does not enter it, and per-draw readouts give per-draw maps.

    Shapes: C_hat (..., N, K), d_hat (..., N), C_true (N, K), d_true (N,); returns P (..., K, K), o (..., K).
    """
    pinv = np.linalg.pinv(np.asarray(C_true, float))
    P = np.einsum("kn,...nj->...kj", pinv, np.asarray(C_hat, float))
    o = np.einsum("kn,...n->...k", pinv, np.asarray(d_hat, float) - np.asarray(d_true, float))
    return P, o


def aligned_drift(f_hat_fn, P, o):
    """f in the true coordinates: f_true(x) = P f_hat(P^{-1} (x - o)) for x (..., K)."""
    Pinv = np.linalg.inv(P)

    def fn(x):
        z = (np.asarray(x) - o) @ Pinv.T
        return np.asarray(f_hat_fn(z)) @ P.T

    return fn


def visited_cells(x_true, lo, hi, num: int = 20, min_count: int = 20):
    """(num*num, 2) cell centres of a num x num grid over [lo, hi]^2 and a bool (num*num,) of cells the
    true latents visit at least ``min_count`` times (x (..., T, 2))."""
    edges = np.linspace(lo, hi, num + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    pts = np.asarray(x_true).reshape(-1, 2)
    H, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=[edges, edges])  # rows = x2, cols = x1
    X, Y = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([X.ravel(), Y.ravel()], -1), H.ravel() >= min_count


def dynamics_nmse(f_est, f_true) -> float:
    """sum ||f_est - f_true||^2 / sum ||f_true||^2 over the given points ((G, K) each)."""
    f_est, f_true = np.asarray(f_est), np.asarray(f_true)
    return float(np.sum((f_est - f_true) ** 2) / np.sum(f_true**2))
