"""Per-step emission log-likelihoods that honour an elementwise observation mask.

Shared by the discrete-state models: each function returns ``log p(y_t | z_t = k)`` for every step and
state, with unobserved entries integrated out. A step with no observed entry contributes exactly 0, so
padding and missing steps leave the marginal likelihood unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from ppl_switch.ops.mask_patterns import mask_patterns, observed_block, worth_deduplicating
from ppl_switch.ops.small_linalg import UNROLL_MAX, cholesky_unrolled, solve_lower_unrolled

_LOG_2PI = math.log(2.0 * math.pi)


def masked_mvn_log_prob(y, mask, mean, scale_tril, *, shared_over_steps: bool = False):
    """Log density of the observed coordinates of ``y`` under N(mean, L L^T).

    The marginal of a Gaussian over a subset of coordinates keeps the rows/columns of the covariance
    for those coordinates. We keep shapes static by replacing the rows/columns of unobserved
    coordinates with those of the identity and the residual there with 0; each such coordinate then
    adds exactly log N(0 | 0, 1) = -log(2 pi)/2, which we remove again.

    Args:
        y: (..., D) observations (any value where unobserved).
        mask: (..., D) bool, True = observed.
        mean: (..., D) means.
        scale_tril: (..., D, D) lower Cholesky factors of the covariances.
        shared_over_steps: the caller's promise that ``scale_tril`` (*C, D, D) is the same at every step: the
            mask is (*S, 1, ..., 1, D) with one singleton axis per covariance batch axis (e.g. (trials, T, 1, D)
            against (K, D, D) per state). Then, for D > UNROLL_MAX, the observed blocks are factorised once per
            distinct pattern of observed entries, not once per step (:mod:`ppl_switch.ops.mask_patterns`).
    Returns:
        (...,) log densities; 0 where no coordinate is observed.
    """
    return masked_mvn_log_prob_cov(y, mask, mean, scale_tril @ jnp.swapaxes(scale_tril, -1, -2),
                                   shared_over_steps=shared_over_steps)


def masked_mvn_log_prob_cov(y, mask, mean, cov, *, shared_over_steps: bool = False):
    """As :func:`masked_mvn_log_prob` with the covariance (..., D, D) given directly."""
    if shared_over_steps and y.shape[-1] > UNROLL_MAX and _worth_patterns(mask, cov):
        return _masked_mvn_by_pattern(y, mask, mean, cov)
    cov = observed_block(mask, cov)
    resid = jnp.where(mask, y - mean, 0.0)
    if y.shape[-1] <= UNROLL_MAX:
        # one factorisation per step and state: elementwise and fused, where LAPACK would make a custom call
        # per (trial, step, state) (10x the HMM EM's E-step on CPU, and slower still split over devices)
        chol = cholesky_unrolled(cov)
        white = solve_lower_unrolled(chol, resid[..., None])[..., 0]
    else:
        chol = jnp.linalg.cholesky(cov)
        white = jax.scipy.linalg.solve_triangular(chol, resid[..., None], lower=True)[..., 0]
    log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    num_obs = jnp.sum(mask, -1)
    return -0.5 * jnp.sum(white**2, -1) - log_det - 0.5 * num_obs * _LOG_2PI


def _worth_patterns(mask, cov) -> bool:
    """For ``cov`` (*C, D, D) shared by the steps of ``mask`` (*S, 1, ..., 1, D): whether the steps can have
    fewer distinct patterns than there are steps (a mask of another layout is an error)."""
    num_cov = cov.ndim - 2
    lead = mask.shape[: mask.ndim - 1 - num_cov]
    if mask.ndim - 1 < num_cov or mask.shape[len(lead):-1] != (1,) * num_cov:
        raise ValueError(f"mask: expected (*steps, {', '.join(['1'] * num_cov + ['D'])}) against a covariance "
                         f"{tuple(cov.shape)} shared over steps, got {tuple(mask.shape)}")
    return worth_deduplicating(math.prod(lead), mask.shape[-1])


def _masked_mvn_by_pattern(y, mask, mean, cov):
    """:func:`masked_mvn_log_prob_cov` with one factorisation per distinct pattern of observed entries and
    covariance, instead of one per step: each step whitens its residual with its pattern's inverse factor.
    ``cov`` (*C, D, D) is shared by the steps of ``mask`` (*S, 1...1, D) (:func:`_worth_patterns`)."""
    num_cov, D = cov.ndim - 2, y.shape[-1]
    patterns, index = mask_patterns(mask.reshape(mask.shape[: mask.ndim - 1 - num_cov] + (D,)))  # (U, D), S
    p = patterns.reshape((-1,) + (1,) * num_cov + (D,))  # (U, 1..., D)
    chol = jnp.linalg.cholesky(observed_block(p, cov))  # (U, *C, D, D)
    eye = jnp.eye(D, dtype=cov.dtype)
    inverse = jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(eye, chol.shape), lower=True)
    log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)  # (U, *C)
    resid = jnp.where(mask, y - mean, 0.0)
    white = (inverse[index] @ resid[..., None])[..., 0]  # (*S, *C, D): its pattern's L^-1 per step
    return -0.5 * jnp.sum(white**2, -1) - log_det[index] - 0.5 * jnp.sum(mask, -1) * _LOG_2PI


def masked_diag_normal_log_prob(y, mask, mean, scale):
    """Sum over observed coordinates of log N(y_d | mean_d, scale_d^2). Shapes (..., D) -> (...)."""
    z = (y - mean) / scale
    lp = -0.5 * z**2 - jnp.log(scale) - 0.5 * _LOG_2PI
    return jnp.sum(jnp.where(mask, lp, 0.0), -1)


def masked_poisson_log_prob(y, mask, rate):
    """Sum over observed coordinates of log Poisson(y_d | rate_d). Shapes (..., D) -> (...)."""
    y = jnp.where(mask, y, 0.0)
    lp = y * jnp.log(rate) - rate - gammaln(y + 1.0)
    return jnp.sum(jnp.where(mask, lp, 0.0), -1)


def state_log_likelihoods(emission: str, y, mask, params) -> jax.Array:
    """(..., T, K) log p(y_t | z_t = k) for the i.i.d. emission families of the HMM.

    Args:
        emission: "gaussian" (params ``means`` (K, D), ``scale_tril`` (K, D, D)), "diag_gaussian"
            (``means``, ``scales`` (K, D)) or "poisson" (``rates`` (K, D)).
        y, mask: (..., T, D) observations and their mask.
    """
    y = jnp.where(mask, y, 0.0)[..., None, :]  # (..., T, 1, D) broadcasts against (K, D)
    m = mask[..., None, :]
    if emission == "gaussian":
        return masked_mvn_log_prob(y, m, params["means"], params["scale_tril"], shared_over_steps=True)
    if emission == "diag_gaussian":
        return masked_diag_normal_log_prob(y, m, params["means"], params["scales"])
    if emission == "poisson":
        return masked_poisson_log_prob(y, m, params["rates"])
    raise ValueError(f"emission: expected 'gaussian', 'diag_gaussian' or 'poisson', got {emission!r}")
