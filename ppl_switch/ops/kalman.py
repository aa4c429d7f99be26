"""Kalman filtering, RTS smoothing and posterior path sampling for linear-Gaussian state space models.

Pure JAX (no NumPyro). Model, for steps t = 1..T (arrays are 0-indexed, so row ``t`` below is step t+1)::

    x_1     ~ N(m0, S0)
    x_{t+1} = A_t x_t + b_t + N(0, Q_t)        t = 1..T-1
    y_t     = C_t x_t + d_t + N(0, R_t)        t = 1..T

Parameters live in :class:`LGSSMParams`. Each dynamics field is either constant or time-varying with a
leading axis of length T-1 whose row ``t`` maps x_t to x_{t+1}; each emission field is constant or has a
leading axis of length T. Whether a field is time-varying is read from its rank. The emission noise is
given in one of two ways:

* ``emission_cov``: full covariance (N, N) or (T, N, N); a rank-1 (N,) array is read as a constant diagonal;
* ``emission_cov_diag``: diagonal variances (N,) or (T, N), with ``emission_cov=None``.

Known inputs are folded in by the caller: B u_t into ``dynamics_bias`` and D u_t into ``emission_bias``.
:func:`lgssm_params` builds and validates a parameter set (default zero biases, clear shape errors).

Missing data: ``mask`` (T, N) bool, True = observed. A partly observed step conditions only on its
observed coordinates and the log-likelihood counts only observed entries; a fully masked step is a pure
prediction step. Padded ragged trials (padding masked out) therefore give the same log-likelihood as the
unpadded trials.

Numerics. Every step is reduced to D-dimensional information quantities before the scan: the noise is
whitened (Cholesky of R, or of its observed block), masked rows are zeroed, and the step is summarised by
Z_t = C_t' R_t^-1 C_t and g_t = C_t' R_t^-1 (y_t - d_t). The update then uses the square-root
information form: with P = L L' (predicted covariance) and M = I + L' Z L = Lm Lm',
the filtered covariance is G' G with G = Lm^-1 L', so it is symmetric positive semi-definite by
construction, no innovation covariance is ever inverted, and the scan body costs O(D^3) whatever N is.
The log-likelihood follows from the matrix-determinant lemma, log|C P C' + R| = log|R| + log|M|.
All Cholesky factors are lower triangular. Initial and dynamics covariances must be positive definite.

Parallel-in-time versions (``parallel=True``) use the filtering and smoothing elements of Särkkä &
García-Fernández (2021), "Temporal parallelization of Bayesian smoothers", in a parallel prefix scan
(:func:`ppl_switch.ops.scan.seeded_prefix_scan`: every prefix starts from the filtered x_0, or from the last
smoothed moments, so half the compositions are the cheaper ones of an element with a prefix).
The public kernels are jitted (``parallel`` / ``num_timesteps`` static), so eager calls reuse compiled
code; shape errors are raised at trace time, before compilation. Batch over trials with ``jax.vmap``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from ppl_switch.ops.scan import seeded_prefix_scan
from ppl_switch.ops.small_linalg import small_cho_solve, small_cholesky, small_solve, small_solve_lower

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class LGSSMParams(NamedTuple):
    """Parameters of a linear-Gaussian state space model (a pytree).

    Attributes (D latent dim, N observation dim, T number of steps):
        initial_mean: (D,) m0.
        initial_cov: (D, D) S0, positive definite.
        dynamics_matrix: (D, D) or (T-1, D, D) A; row t maps x_t to x_{t+1}.
        dynamics_bias: (D,) or (T-1, D) b.
        dynamics_cov: (D, D) or (T-1, D, D) Q, positive definite.
        emission_matrix: (N, D) or (T, N, D) C.
        emission_bias: (N,) or (T, N) d.
        emission_cov: (N, N) or (T, N, N) full R; (N,) is read as a constant diagonal; None when
            ``emission_cov_diag`` is given.
        emission_cov_diag: None, or diagonal variances of R, (N,) or (T, N).
    """

    initial_mean: Array
    initial_cov: Array
    dynamics_matrix: Array
    dynamics_bias: Array
    dynamics_cov: Array
    emission_matrix: Array
    emission_bias: Array
    emission_cov: Optional[Array]
    emission_cov_diag: Optional[Array] = None


class FilterResult(NamedTuple):
    """Kalman filter output.

    Attributes:
        log_likelihood: scalar, log p(y_{1:T}) over observed entries.
        filtered_means: (T, D) E[x_t | y_{1:t}].
        filtered_covs: (T, D, D) Cov[x_t | y_{1:t}].
        predicted_means: (T, D) E[x_t | y_{1:t-1}] (row 0 is m0).
        predicted_covs: (T, D, D) Cov[x_t | y_{1:t-1}] (row 0 is S0).
    """

    log_likelihood: Array
    filtered_means: Array
    filtered_covs: Array
    predicted_means: Array
    predicted_covs: Array


class SmootherResult(NamedTuple):
    """RTS smoother output.

    Attributes:
        log_likelihood: scalar, log p(y_{1:T}).
        filtered_means, filtered_covs: as in :class:`FilterResult`.
        smoothed_means: (T, D) E[x_t | y_{1:T}].
        smoothed_covs: (T, D, D) Cov[x_t | y_{1:T}].
        smoothed_cross_covs: (T-1, D, D); row t is Cov[x_{t+1}, x_t | y_{1:T}] (next state first),
            so E[x_{t+1} x_t' | y] = cross_covs[t] + smoothed_means[t+1] smoothed_means[t]'.
    """

    log_likelihood: Array
    filtered_means: Array
    filtered_covs: Array
    smoothed_means: Array
    smoothed_covs: Array
    smoothed_cross_covs: Array


# --------------------------------------------------------------------------------------------------
# Construction and validation


def lgssm_params(
    initial_mean,
    initial_cov,
    dynamics_matrix,
    dynamics_cov,
    emission_matrix,
    emission_cov=None,
    *,
    dynamics_bias=None,
    emission_bias=None,
    emission_cov_diag=None,
    num_timesteps: Optional[int] = None,
) -> LGSSMParams:
    """Build an :class:`LGSSMParams`, filling zero biases and validating every shape.

    Give exactly one of ``emission_cov`` (full, (N, N) or (T, N, N)) and ``emission_cov_diag``
    ((N,) or (T, N)). ``num_timesteps`` is needed only to check time-varying shapes here (they are
    checked again against ``y`` by every kernel). Raises ValueError naming the bad argument.
    """
    m0 = jnp.asarray(initial_mean)
    if m0.ndim != 1:
        raise ValueError(f"initial_mean must have shape (D,), got {m0.shape}")
    D = m0.shape[0]
    C = jnp.asarray(emission_matrix)
    if C.ndim not in (2, 3) or C.shape[-1] != D:
        raise ValueError(f"emission_matrix must have shape (N, {D}) or (T, N, {D}), got {C.shape}")
    N = C.shape[-2]
    if (emission_cov is None) == (emission_cov_diag is None):
        raise ValueError("give exactly one of emission_cov (full) and emission_cov_diag (diagonal)")
    dtype = jnp.result_type(m0, C, float)
    A = jnp.asarray(dynamics_matrix)
    b = jnp.zeros((D,), dtype) if dynamics_bias is None else jnp.asarray(dynamics_bias)
    d = jnp.zeros((N,), dtype) if emission_bias is None else jnp.asarray(emission_bias)
    params = LGSSMParams(
        m0,
        jnp.asarray(initial_cov),
        A,
        b,
        jnp.asarray(dynamics_cov),
        C,
        d,
        None if emission_cov is None else jnp.asarray(emission_cov),
        None if emission_cov_diag is None else jnp.asarray(emission_cov_diag),
    )
    check_params(params, num_timesteps)
    return params


def _check_shape(x, name: str, allowed: tuple) -> None:
    """Raise ValueError unless ``x.shape`` is one of ``allowed`` (None entries match any length)."""
    shape = tuple(jnp.shape(x))
    for pattern in allowed:
        if len(pattern) == len(shape) and all(p is None or p == s for p, s in zip(pattern, shape)):
            return
    pretty = " or ".join(str(tuple("T" if p is None else p for p in pat)) for pat in allowed)
    raise ValueError(f"{name} must have shape {pretty}, got {shape}")


def check_params(params: LGSSMParams, num_timesteps: Optional[int] = None) -> tuple[int, int]:
    """Validate the shapes of ``params`` (static, so it runs before compilation). Returns (D, N).

    With ``num_timesteps`` T, time-varying fields must have leading length T-1 (dynamics) or T
    (emissions); without it any leading length is accepted here.
    """
    _check_shape(params.initial_mean, "initial_mean", ((None,),))
    D = jnp.shape(params.initial_mean)[0]
    C = params.emission_matrix
    _check_shape(C, "emission_matrix", ((None, D), (None, None, D)))
    N = jnp.shape(C)[-2]
    T = num_timesteps
    Tm1 = None if T is None else max(T - 1, 0)
    _check_shape(params.initial_cov, "initial_cov", ((D, D),))
    _check_shape(params.dynamics_matrix, "dynamics_matrix", ((D, D), (Tm1, D, D)))
    _check_shape(params.dynamics_bias, "dynamics_bias", ((D,), (Tm1, D)))
    _check_shape(params.dynamics_cov, "dynamics_cov", ((D, D), (Tm1, D, D)))
    _check_shape(C, "emission_matrix", ((N, D), (T, N, D)))
    _check_shape(params.emission_bias, "emission_bias", ((N,), (T, N)))
    if (params.emission_cov is None) == (params.emission_cov_diag is None):
        raise ValueError("give exactly one of emission_cov (full) and emission_cov_diag (diagonal)")
    if params.emission_cov is not None:
        _check_shape(params.emission_cov, "emission_cov", ((N, N), (T, N, N), (N,)))
    else:
        _check_shape(params.emission_cov_diag, "emission_cov_diag", ((N,), (T, N)))
    return D, N


def _check_data(params: LGSSMParams, y, mask) -> tuple[int, int, int]:
    """Validate ``y`` (T, N) and ``mask`` against ``params``. Returns (T, D, N)."""
    N = jnp.shape(params.emission_matrix)[-2]
    if jnp.ndim(y) != 2 or jnp.shape(y)[1] != N:
        raise ValueError(f"y must have shape (T, {N}) (one trial; vmap over trials), got {jnp.shape(y)}")
    T = jnp.shape(y)[0]
    if T < 1:
        raise ValueError("y must have at least one time step")
    if mask is not None and tuple(jnp.shape(mask)) != (T, N):
        raise ValueError(f"mask must have shape {(T, N)} like y, got {jnp.shape(mask)}")
    D, _ = check_params(params, T)
    return T, D, N


# --------------------------------------------------------------------------------------------------
# Small helpers


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _mv(M: Array, v: Array) -> Array:
    """Matrix-vector product broadcasting over leading axes: (..., i, j) x (..., j) -> (..., i)."""
    return (M @ v[..., None])[..., 0]


# small factorisations written out (fused into the scan step) up to UNROLL_MAX, LAPACK above
_cholesky, _solve_lower, _cho_solve, _solve = small_cholesky, small_solve_lower, small_cho_solve, small_solve


def _sym(x: Array) -> Array:
    return 0.5 * (x + _mT(x))


def _dynamics(params: LGSSMParams) -> tuple[Array, Array, Array]:
    return params.dynamics_matrix, params.dynamics_bias, params.dynamics_cov


def _is_tv(x: Array, const_ndim: int) -> bool:
    return x.ndim > const_ndim


class _EmissionInfo(NamedTuple):
    """Emissions reduced to whitened, masked form (``*`` = optional leading T axis).

    Z: (*, D, D) C' R^-1 C over observed rows. g: (T, D) C' R^-1 (y - d).
    C: (*, N, D) whitened emission matrix; r: (T, N) whitened residual target (y - d, masked to 0);
    w: None or (*, N) precision weights (diagonal R; 0 where masked).
    logdet_r: (*) log-determinant of R over observed entries; n_obs: (T,) observed entries per step.
    """

    Z: Array
    g: Array
    C: Array
    r: Array
    w: Optional[Array]
    logdet_r: Array
    n_obs: Array


def _emission_info(params: LGSSMParams, y: Array, mask: Optional[Array]) -> _EmissionInfo:
    """Whiten and mask the emission model once, vectorised over time (outside any scan)."""
    T, N = y.shape
    C, d = params.emission_matrix, params.emission_bias
    r = y - d
    diag = params.emission_cov_diag
    if diag is None and params.emission_cov.ndim == 1:
        diag = params.emission_cov
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        r = jnp.where(mask, r, 0.0)  # also removes NaN placeholders before they reach a gradient
        n_obs = mask.sum(-1).astype(r.dtype)
    else:
        n_obs = jnp.full((T,), N, r.dtype)

    if diag is not None:
        w = 1.0 / diag
        logr = jnp.log(diag)
        if mask is not None:
            w = jnp.where(mask, w, 0.0)
            logr = jnp.where(mask, logr, 0.0)
        logdet_r = logr.sum(-1)
        Cw = C * w[..., :, None]
        Z = _mT(C) @ Cw
        g = _mv(_mT(C), w * r)
        return _EmissionInfo(Z, g, C, r, w, logdet_r, n_obs)

    R = params.emission_cov
    if mask is not None:
        # Observed block of R, identity on masked coordinates with zero cross terms: the Cholesky
        # factor keeps masked coordinates decoupled, and zeroed rows of C and r whiten to zero.
        both = mask[:, :, None] & mask[:, None, :]
        R = jnp.where(both, R, jnp.eye(N, dtype=r.dtype))
        C = jnp.where(mask[:, :, None], C, 0.0)
    Lr = jnp.linalg.cholesky(R)
    if Lr.ndim == 3 and C.ndim == 2:
        C = jnp.broadcast_to(C, (T,) + C.shape)
    Cw = solve_triangular(Lr, C, lower=True)
    if Lr.ndim == 2:
        rw = solve_triangular(Lr, r.T, lower=True).T
    else:
        rw = solve_triangular(Lr, r[..., None], lower=True)[..., 0]
    logdet_r = 2.0 * jnp.log(jnp.diagonal(Lr, axis1=-2, axis2=-1)).sum(-1)
    Z = _mT(Cw) @ Cw
    g = _mv(_mT(Cw), rw)
    return _EmissionInfo(Z, g, Cw, rw, None, logdet_r, n_obs)


def _condition(mean: Array, cov: Array, Z: Array, g: Array):
    """Square-root information update of N(mean, cov) with the Gaussian factor exp(-x'Zx/2 + x'g).

    Returns (filtered mean, filtered cov, log|M|, v'v) where M = I + L'ZL and v = Lm^-1 L'(g - Z mean);
    the last two give the log-likelihood without any N-dimensional work.
    """
    D = mean.shape[-1]
    L = _cholesky(cov)
    M = jnp.eye(D, dtype=cov.dtype) + _mT(L) @ Z @ L
    Lm = _cholesky(M)
    G = _solve_lower(Lm, _mT(L))
    v = G @ (g - Z @ mean)
    new_mean = mean + _mT(G) @ v
    new_cov = _mT(G) @ G
    logdet_m = 2.0 * jnp.log(jnp.diagonal(Lm)).sum()
    return new_mean, new_cov, logdet_m, v @ v


def _log_likelihood(info: _EmissionInfo, pred_means: Array, logdet_m: Array, vv: Array) -> Array:
    """Sum over steps of log N(y_t | C mu_t + d, C P_t C' + R), vectorised after the scan."""
    e = info.r - _mv(info.C, pred_means)
    we = e if info.w is None else info.w * e
    quad = (e * we).sum(-1) - vv
    return -0.5 * jnp.sum(info.n_obs * _LOG_2PI + info.logdet_r + logdet_m + quad)


def _predict(mean, cov, A, b, Q):
    return A @ mean + b, _sym(A @ cov @ _mT(A)) + Q


# --------------------------------------------------------------------------------------------------
# Filter


def _condition_whitened(mean: Array, cov: Array, C: Array, r: Array):
    """Covariance-form update with whitened emissions r = C x + N(0, I) (masked rows are zero).

    S = C P C' + I >= I is well conditioned; its Cholesky gives the update and log N(r | C mean, S).
    Cheaper than :func:`_condition` when N <= D. Returns (mean, cov, log-likelihood of the step
    without the log|R| and 2*pi constants).
    """
    N = C.shape[-2]
    CP = C @ cov
    Ls = _cholesky(CP @ _mT(C) + jnp.eye(N, dtype=cov.dtype))
    We = _solve_lower(Ls, jnp.concatenate([CP, (r - C @ mean)[:, None]], -1))  # one solve for both
    W, e = We[:, :-1], We[:, -1]
    new_mean = mean + _mT(W) @ e
    new_cov = _sym(cov - _mT(W) @ W)
    return new_mean, new_cov, -0.5 * (2.0 * jnp.log(jnp.diagonal(Ls)).sum() + e @ e)


def _filter_sequential(params: LGSSMParams, info: _EmissionInfo, T: int):
    """lax.scan filter. Uses the covariance form when N <= D and the information form otherwise,
    so the per-step cost is O(min(N, D)^3 + N D^2) rather than O(N^3)."""
    A, b, Q = _dynamics(params)
    whitened = info.C.shape[-2] <= params.initial_mean.shape[0]

    # Time-varying pieces travel as scan inputs; constant ones are closed over. Dynamics get one dummy
    # row so that every step can predict (the prediction after the last step is dropped).
    def pad(x):
        return jnp.concatenate([x, x[-1:] if x.shape[0] else jnp.zeros((1,) + x.shape[1:], x.dtype)])

    const = {"A": A, "b": b, "Q": Q}
    if whitened:
        sw = None if info.w is None else jnp.sqrt(info.w)
        Cw = info.C if sw is None else info.C * sw[..., None]
        xs = {"r": info.r if sw is None else info.r * sw}
        if _is_tv(Cw, 2):
            xs["C"] = Cw
        const["C"] = Cw
    else:
        xs = {"g": info.g}
        if _is_tv(info.Z, 2):
            xs["Z"] = info.Z
        const["Z"] = info.Z
    for name, x, nd in (("A", A, 2), ("b", b, 1), ("Q", Q, 2)):
        if _is_tv(x, nd):
            xs[name] = pad(x)

    def step(carry, x):
        mean, cov = carry
        p = {**const, **x}
        if whitened:
            m, S, ll = _condition_whitened(mean, cov, p["C"], p["r"])
            out = (ll,)
        else:
            m, S, logdet_m, vv = _condition(mean, cov, p["Z"], p["g"])
            out = (logdet_m, vv)
        next_mean = p["A"] @ m + p["b"]
        next_cov = _sym(p["A"] @ S @ _mT(p["A"])) + p["Q"]
        return (next_mean, next_cov), (m, S, mean, cov) + out

    init = (params.initial_mean, params.initial_cov)
    _, (ms, Ss, mus, Ps, *out) = lax.scan(step, init, xs)
    if whitened:
        ll = jnp.sum(out[0]) - 0.5 * jnp.sum(info.n_obs * _LOG_2PI + info.logdet_r)
    else:
        ll = _log_likelihood(info, mus, *out)
    return ms, Ss, mus, Ps, ll


def _filter_elements(F, u, P, Z, g):
    """Parallel-filter elements of steps with prior x_t | x_{t-1} ~ N(F x_{t-1} + u, P) and emission
    information (Z, g_t): p(x_t | x_{t-1}, y_t) = N(E x_{t-1} + f, Cf) and the information (J, eta) that
    y_t carries about x_{t-1}. Matrices may be (D, D) (time-invariant: factorised once, not per step) or
    (T', D, D); g is (T', D) or (D,). Returns E, f, Cf, eta, J with the broadcast shapes."""
    eye = jnp.eye(P.shape[-1], dtype=P.dtype)
    L = _cholesky(P)
    Lm = _cholesky(eye + _mT(L) @ Z @ L)
    G = _solve_lower(Lm, _mT(L))  # conditional cov = G'G
    Cf = _mT(G) @ G
    K = eye - Cf @ Z  # (P^-1 + Z)^-1 P^-1
    E = K @ F
    f = _mv(K, u) + _mv(Cf, g)
    GZ = G @ Z
    Jhat = _sym(Z - _mT(GZ) @ GZ)  # C'(CPC'+R)^-1 C
    ghat = g - _mv(_mT(GZ), _mv(G, g))
    J = _sym(_mT(F) @ Jhat @ F)
    eta = _mv(_mT(F), ghat - _mv(Jhat, u))
    return E, f, Cf, eta, J


def _filter_parallel(params: LGSSMParams, info: _EmissionInfo, T: int):
    """Parallel-prefix filter over the elements of Särkkä & García-Fernández (2021, Sec. 3), seeded with the
    filtered x_0. With time-invariant A, Q and no missing entries (Z constant) the element matrices are the
    same at every step and are computed once."""
    A, b, Q = _dynamics(params)
    D = params.initial_mean.shape[0]
    dtype = info.g.dtype
    eye = jnp.eye(D, dtype=dtype)
    Z, g = info.Z, info.g
    Z0, Z_rest = (Z[0], Z[1:]) if Z.ndim == 3 else (Z, Z)
    # step 0 has prior N(m0, S0) (F = 0), so its element is already the filtered distribution of x_0
    _, m0, S0, _, _ = _filter_elements(jnp.zeros((D, D), dtype), params.initial_mean, params.initial_cov, Z0, g[0])
    E, f, Cf, eta, J = _filter_elements(A, b, Q, Z_rest, g[1:])
    E, Cf, J = (jnp.broadcast_to(x, (T - 1, D, D)) for x in (E, Cf, J))

    def combine(first, second):
        E1, f1, C1, eta1, J1 = first
        E2, f2, C2, eta2, J2 = second
        I = jnp.broadcast_to(eye, C1.shape)
        rhs = jnp.concatenate([E1, (f1 + _mv(C1, eta2))[..., None], C1], -1)
        X = _solve(I + C1 @ J2, rhs)  # (I + C1 J2)^-1 [E1 | f1 + C1 eta2 | C1]
        XE, Xf, XC = X[..., :D], X[..., D], X[..., D + 1 :]
        E = E2 @ XE
        f = _mv(E2, Xf) + f2
        C = _sym(E2 @ XC @ _mT(E2)) + C2
        # E1'(I + J2 C1)^-1 = ((I + C1 J2)^-1 E1)' = XE'
        eta = _mv(_mT(XE), eta2 - _mv(J2, f1)) + eta1
        J = _sym(_mT(XE) @ J2 @ E1) + J1
        return E, f, C, eta, J

    def apply(prefix, element):  # combine with a filtered prefix (E1 = 0, eta1 = 0, J1 = 0): means, covs only
        m1, S1 = prefix
        E2, f2, C2, eta2, J2 = element
        I = jnp.broadcast_to(eye, S1.shape)
        X = _solve(I + S1 @ J2, jnp.concatenate([(m1 + _mv(S1, eta2))[..., None], S1], -1))
        return _mv(E2, X[..., 0]) + f2, _sym(E2 @ X[..., 1:] @ _mT(E2)) + C2

    ms, Ss = seeded_prefix_scan(combine, apply, (m0, S0), (E, f, Cf, eta, J))
    ms, Ss = jnp.concatenate([m0[None], ms]), _sym(jnp.concatenate([S0[None], Ss]))
    mus = jnp.concatenate([params.initial_mean[None], _mv(A, ms[:-1]) + b])
    Ps = jnp.concatenate([params.initial_cov[None], _sym(A @ Ss[:-1] @ _mT(A)) + Q])
    _, _, logdet_m, vv = jax.vmap(_condition)(mus, Ps, jnp.broadcast_to(Z, (T, D, D)), g)
    return ms, Ss, mus, Ps, _log_likelihood(info, mus, logdet_m, vv)


@functools.partial(jax.jit, static_argnames="parallel")
def lgssm_filter(params: LGSSMParams, y: Array, mask: Optional[Array] = None, parallel: bool = False) -> FilterResult:
    """Kalman filter and marginal log-likelihood of one trial.

    Args:
        params: model parameters (see :class:`LGSSMParams`).
        y: (T, N) observations; entries under ``mask == False`` are ignored (may be NaN).
        mask: optional (T, N) bool, True = observed.
        parallel: use the parallel-in-time (prefix-scan) filter.

    Returns:
        :class:`FilterResult` with the log-likelihood, filtered and one-step predicted moments.
    """
    T, _, _ = _check_data(params, y, mask)
    info = _emission_info(params, y, mask)
    run = _filter_parallel if parallel else _filter_sequential
    ms, Ss, mus, Ps, ll = run(params, info, T)
    return FilterResult(ll, ms, Ss, mus, Ps)


# --------------------------------------------------------------------------------------------------
# Smoother and sampler


def _backward_kernel(params: LGSSMParams, filt: FilterResult):
    """x_t | x_{t+1}, y_{1:t} = N(G_t x_{t+1} + h_t, W_t) for t = 1..T-1, vectorised.

    Returns G (T-1, D, D), h (T-1, D), W (T-1, D, D) (Joseph form: a sum of PSD terms).
    """
    A, _, Q = _dynamics(params)
    m, S = filt.filtered_means[:-1], filt.filtered_covs[:-1]
    mu_next, P_next = filt.predicted_means[1:], filt.predicted_covs[1:]
    G = _mT(_cho_solve(_cholesky(P_next), A @ S))  # S A' P^-1
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    F = eye - G @ A
    W = _sym(F @ S @ _mT(F) + G @ Q @ _mT(G))
    h = m - _mv(G, mu_next)
    return G, h, W


def _affine_backward(G, h, last, parallel: bool):
    """Solve x_t = G_t x_{t+1} + h_t backwards from x_T = last. Returns (T, D)."""
    if not parallel:
        def step(x_next, gh):
            Gt, ht = gh
            x = Gt @ x_next + ht
            return x, x

        _, xs = lax.scan(step, last, (G, h), reverse=True)
        return jnp.concatenate([xs, last[None]])

    def combine(later, earlier):  # scanning backwards in time: compose earlier ∘ later
        G2, h2 = later
        G1, h1 = earlier
        return G1 @ G2, _mv(G1, h2) + h1

    def apply(x_next, gh):
        Gt, ht = gh
        return _mv(Gt, x_next) + ht

    xs = seeded_prefix_scan(combine, apply, last, (G[::-1], h[::-1]))
    return jnp.concatenate([xs[::-1], last[None]])


@functools.partial(jax.jit, static_argnames="parallel")
def lgssm_smoother(params: LGSSMParams, y: Array, mask: Optional[Array] = None, parallel: bool = False) -> SmootherResult:
    """Rauch–Tung–Striebel smoother of one trial (arguments as :func:`lgssm_filter`).

    Returns :class:`SmootherResult`; ``smoothed_cross_covs[t] = Cov[x_{t+1}, x_t | y]``.
    """
    filt = lgssm_filter(params, y, mask, parallel)
    mT, ST = filt.filtered_means[-1], filt.filtered_covs[-1]
    G, h, W = _backward_kernel(params, filt)
    means = _affine_backward(G, h, mT, parallel)
    if not parallel:
        def step(S_next, GW):
            Gt, Wt = GW
            S = _sym(Gt @ S_next @ _mT(Gt)) + Wt
            return S, S

        _, covs = lax.scan(step, ST, (G, W), reverse=True)
        covs = jnp.concatenate([covs, ST[None]])
    else:
        def combine(later, earlier):  # backwards in time, as in _affine_backward
            G2, W2 = later
            G1, W1 = earlier
            return G1 @ G2, _sym(G1 @ W2 @ _mT(G1)) + W1

        def apply(S_next, GW):
            Gt, Wt = GW
            return _sym(Gt @ S_next @ _mT(Gt)) + Wt

        covs = jnp.concatenate([seeded_prefix_scan(combine, apply, ST, (G[::-1], W[::-1]))[::-1], ST[None]])
    cross = covs[1:] @ _mT(G)
    return SmootherResult(filt.log_likelihood, filt.filtered_means, filt.filtered_covs, means, covs, cross)


@functools.partial(jax.jit, static_argnames="parallel")
def lgssm_sample(key: Array, params: LGSSMParams, y: Array, mask: Optional[Array] = None, parallel: bool = False) -> Array:
    """One joint posterior path x_{1:T} ~ p(x | y) by forward filtering, backward sampling. Returns (T, D)."""
    filt = lgssm_filter(params, y, mask, parallel)
    G, h, W = _backward_kernel(params, filt)
    T, D = filt.filtered_means.shape
    eps = jax.random.normal(key, (T, D), filt.filtered_means.dtype)
    x_last = filt.filtered_means[-1] + jnp.linalg.cholesky(filt.filtered_covs[-1]) @ eps[-1]
    noise = _mv(jnp.linalg.cholesky(W), eps[:-1])
    return _affine_backward(G, h + noise, x_last, parallel)


# --------------------------------------------------------------------------------------------------
# Forward simulation and the dense oracle


def _at(x, t: int, const_ndim: int):
    return x[t] if x.ndim > const_ndim else x


def _emission_cov_at(params: LGSSMParams, t: int) -> np.ndarray:
    if params.emission_cov_diag is not None:
        return np.diag(_at(np.asarray(params.emission_cov_diag), t, 1))
    R = np.asarray(params.emission_cov)
    return np.diag(R) if R.ndim == 1 else _at(R, t, 2)


def lgssm_joint_gaussian(params: LGSSMParams, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense mean and covariance of the stacked vector (x_1, ..., x_T, y_1, ..., y_T), in NumPy float64.

    Returns mean (T*(D+N),) and covariance (T*(D+N), T*(D+N)). O((T(D+N))^2) memory and not jit-able:
    an oracle for tests and small problems, built by writing every variable as an affine map of
    independent standard-normal noise.
    """
    T = int(num_timesteps)
    D, N = check_params(params, T)
    p = LGSSMParams(*(None if x is None else np.asarray(x, np.float64) for x in params))
    K = T * D + T * N  # one standard-normal block per state and per observation
    x_mean, x_coef, y_mean, y_coef = [], [], [], []
    mean = p.initial_mean
    coef = np.zeros((D, K))
    coef[:, :D] = np.linalg.cholesky(p.initial_cov)
    for t in range(T):
        if t > 0:
            A = _at(p.dynamics_matrix, t - 1, 2)
            mean = A @ mean + _at(p.dynamics_bias, t - 1, 1)
            coef = A @ coef
            coef[:, t * D : (t + 1) * D] += np.linalg.cholesky(_at(p.dynamics_cov, t - 1, 2))
        x_mean.append(mean)
        x_coef.append(coef)
        C = _at(p.emission_matrix, t, 2)
        y_mean.append(C @ mean + _at(p.emission_bias, t, 1))
        yc = C @ coef
        yc[:, T * D + t * N : T * D + (t + 1) * N] += np.linalg.cholesky(_emission_cov_at(p, t))
        y_coef.append(yc)
    mu = np.concatenate(x_mean + y_mean)
    W = np.concatenate(x_coef + y_coef)
    return mu, W @ W.T


@functools.partial(jax.jit, static_argnames="num_timesteps")
def lgssm_simulate(key: Array, params: LGSSMParams, num_timesteps: int) -> tuple[Array, Array]:
    """Draw (x, y) from the model: x (T, D), y (T, N). Sequential in time; jit-able with static T."""
    T = int(num_timesteps)
    D, N = check_params(params, T)
    dtype = jnp.result_type(params.initial_mean, float)
    k0, kx, ky = jax.random.split(key, 3)
    A, b, Q = _dynamics(params)
    x0 = params.initial_mean + jnp.linalg.cholesky(params.initial_cov) @ jax.random.normal(k0, (D,), dtype)
    Lq = jnp.linalg.cholesky(Q)
    noise = _mv(Lq, jax.random.normal(kx, (T - 1, D), dtype))
    xs = {"w": noise}
    for name, x, nd in (("A", A, 2), ("b", b, 1)):
        if _is_tv(x, nd):
            xs[name] = x
    const = {"A": A, "b": b}

    def step(x, inp):
        p = {**const, **inp}
        x_next = p["A"] @ x + p["b"] + p["w"]
        return x_next, x_next

    _, rest = lax.scan(step, x0, xs)
    x = jnp.concatenate([x0[None], rest])
    C, d = params.emission_matrix, params.emission_bias
    eps = jax.random.normal(ky, (T, N), dtype)
    if params.emission_cov_diag is not None or params.emission_cov.ndim == 1:
        diag = params.emission_cov if params.emission_cov_diag is None else params.emission_cov_diag
        v = jnp.sqrt(diag) * eps
    else:
        v = _mv(jnp.linalg.cholesky(params.emission_cov), eps)
    y = _mv(C, x) + d + v
    return x, y
