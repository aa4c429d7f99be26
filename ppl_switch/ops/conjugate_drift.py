"""Closed-form Bayesian linear regression of Euler increments on drift features.

For a drift that is linear in its weights, f_k(x) = phi(x) . w_k with phi (D,) shared by all K output
dimensions, and the Euler–Maruyama chain with identity diffusion,

    r_t = x_{t+1} - x_t - dt u_t ~ N(dt phi(x_t)' W, dt I_K),      W = [w_1 .. w_K] (D, K),
    w_k ~ N(0, diag(1 / prior_precision))   independently over k,

the weights given the path are Gaussian with one precision shared by all columns::

    Lambda = diag(prior_precision) + dt G,     G = sum_t phi_t phi_t'           (D, D)
    mean_k = Lambda^{-1} h_k,                   H = sum_t phi_t r_t'  = [h_1 .. h_K]   (D, K)

and the path's density with the weights integrated out is, per column k,

    log p(r_{.k}) = -S_k / (2 dt) - n/2 log(2 pi dt) + 1/2 h_k' Lambda^{-1} h_k
                    + 1/2 log|diag(prior_precision)| - 1/2 log|Lambda|,         S_k = sum_t r_tk^2.

(dt^2 phi phi' / dt = dt phi phi' and dt phi r / dt = phi r: the precision and shift of the Gaussian
likelihood in w.) Only the sufficient statistics (G, H, S, n) of the path enter; they are sums over steps,
so trials, masks and padding reduce to a weighted sum. Pure JAX, no NumPyro.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["RegressionStats", "regression_stats", "weight_posterior", "collapsed_log_marginal"]


class RegressionStats(NamedTuple):
    """Sufficient statistics of the increments: gram G (D, D), cross H (D, K), squares S (K,), count n ()."""

    gram: jax.Array
    cross: jax.Array
    squares: jax.Array
    count: jax.Array


def regression_stats(features, increments, step_mask=None) -> RegressionStats:
    """Sums over steps of phi phi', phi r', r^2 and the number of steps.

    Args:
        features: (..., D) phi(x_t) per step (any leading batch/time axes).
        increments: (..., K) r_t = x_{t+1} - x_t - dt u_t on the same axes.
        step_mask: optional (...) bool, False for steps that do not count (padding).
    """
    if step_mask is None:
        step_mask = jnp.ones(features.shape[:-1], bool)
    w = step_mask.astype(features.dtype)[..., None]
    phi = (features * w).reshape(-1, features.shape[-1])
    r = (increments * w).reshape(-1, increments.shape[-1])
    return RegressionStats(phi.T @ phi, phi.T @ r, jnp.sum(r**2, 0), jnp.sum(w))


def weight_posterior(prior_precision, stats: RegressionStats, dt: float):
    """Gaussian p(W | path): (mean (D, K), precision (D, D) shared by the K columns, its lower Cholesky factor)."""
    precision = jnp.diag(prior_precision) + dt * stats.gram
    precision = 0.5 * (precision + precision.T)
    chol = jnp.linalg.cholesky(precision)
    mean = jax.scipy.linalg.cho_solve((chol, True), stats.cross)
    return mean, precision, chol


def collapsed_log_marginal(prior_precision, stats: RegressionStats, dt: float):
    """log p(increments) with the weights integrated out (a scalar, summed over the K columns)."""
    mean, _, chol = weight_posterior(prior_precision, stats, dt)
    K = stats.cross.shape[-1]
    quad = jnp.sum(stats.cross * mean)  # sum_k h_k' Lambda^{-1} h_k
    log_det_ratio = jnp.sum(jnp.log(prior_precision)) - 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return (-0.5 * jnp.sum(stats.squares) / dt - 0.5 * K * stats.count * (_LOG_2PI + math.log(dt))
            + 0.5 * quad + 0.5 * K * log_det_ratio)
