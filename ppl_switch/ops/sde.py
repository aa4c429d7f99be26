"""Euler–Maruyama discretisation of latent SDEs, and the spike likelihoods used on its grid.

A latent SDE ``dx = drift(x, t) dt + Sigma^(1/2) dW`` on a grid of step ``dt`` becomes the Markov chain::

    x_{t+1} | x_t ~ N(x_t + dt * drift(x_t, t), dt * Sigma)

Everything here is pure JAX (no NumPyro) and batched over a leading trial axis where noted. Ragged
trials are handled with a ``time_mask`` (trials, time): a transition t -> t+1 counts only when both
steps lie inside the trial.

Observation likelihoods on the grid (bin width ``dt``, rate ``lam`` in events per unit time):

* ``poisson_bin_log_prob``: counts per bin, ``y ~ Poisson(lam * dt)``;
* ``point_process_log_prob``: the Poisson-process limit for event indicators on a fine grid,
  ``sum_t [y_t log lam_t - lam_t dt]`` -- the log density of the event *times* (Lebesgue measure), which
  differs from the binned Poisson log-pmf by ``sum_t y_t log dt - log y_t!``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import gammaln

_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "check_dt",
    "euler_maruyama_simulate",
    "euler_maruyama_transition_log_prob",
    "affine_recursion",
    "poisson_bin_log_prob",
    "point_process_log_prob",
    "inverse_link",
]


def check_dt(dt) -> float:
    """``dt`` as a positive float; ValueError naming ``dt`` otherwise (before anything compiles)."""
    try:
        value = float(dt)
    except (TypeError, ValueError):
        raise ValueError(f"dt: expected a positive number (the Euler step), got {dt!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"dt: expected a positive finite number (the Euler step), got {dt!r}")
    return value


def euler_maruyama_transition_log_prob(x, drift, dt: float, noise_scale_tril=None, time_mask=None):
    """Per-step log N(x_{t+1} | x_t + dt drift_t, dt Sigma).

    Args:
        x: (..., T, D) paths.
        drift: (..., T-1, D) drift evaluated at x_t (and input at t) for t = 0..T-2.
        dt: Euler step.
        noise_scale_tril: (D, D) lower Cholesky factor of Sigma; None = identity.
        time_mask: optional (..., T) bool; transition t -> t+1 counts only if step t+1 is inside.
    Returns:
        (..., T-1) log densities (0 for masked transitions).
    """
    resid = x[..., 1:, :] - x[..., :-1, :] - dt * drift
    D = x.shape[-1]
    if noise_scale_tril is None:
        white = resid / math.sqrt(dt)
        log_det = 0.5 * D * math.log(dt)
    else:
        L = jnp.broadcast_to(noise_scale_tril, resid.shape + (D,))
        white = jax.scipy.linalg.solve_triangular(L, resid[..., None], lower=True)[..., 0] / math.sqrt(dt)
        log_det = jnp.sum(jnp.log(jnp.diagonal(noise_scale_tril))) + 0.5 * D * math.log(dt)
    lp = -0.5 * jnp.sum(white**2, -1) - log_det - 0.5 * D * _LOG_2PI
    if time_mask is not None:
        lp = jnp.where(time_mask[..., 1:], lp, 0.0)
    return lp


def euler_maruyama_simulate(key, x0, drift_fn: Callable, dt: float, num_timesteps: int, noise_scale_tril=None, extra=None):
    """Simulate one path of the Euler–Maruyama chain.

    Args:
        x0: (D,) initial state.
        drift_fn: ``drift_fn(x, extra_t) -> (D,)``.
        dt: Euler step.
        num_timesteps: T (the path includes x0).
        noise_scale_tril: (D, D) Sigma^(1/2) (lower Cholesky); None = identity.
        extra: optional (T, ...) per-step array passed to ``drift_fn`` (e.g. inputs); None passes 0.
    Returns:
        (T, D) path.
    """
    D = x0.shape[-1]
    eps = jax.random.normal(key, (num_timesteps - 1, D), jnp.result_type(x0, float))
    if noise_scale_tril is not None:
        eps = eps @ jnp.asarray(noise_scale_tril).T
    extra = jnp.zeros((num_timesteps, 0), x0.dtype) if extra is None else extra

    def step(x, inp):
        e, u = inp
        x_next = x + dt * drift_fn(x, u) + math.sqrt(dt) * e
        return x_next, x_next

    _, rest = lax.scan(step, x0, (eps, extra[:-1]))
    return jnp.concatenate([x0[None], rest])


def affine_recursion(x0, F, h):
    """All states of x_{t+1} = F_t x_t + h_t by a parallel (associative) scan.

    Args:
        x0: (..., D). F: (..., T-1, D, D). h: (..., T-1, D).
    Returns:
        (..., T, D) with row 0 = x0.
    """

    def combine(a, b):  # apply a, then b: x -> Fb (Fa x + ha) + hb
        Fa, ha = a
        Fb, hb = b
        return Fb @ Fa, jnp.einsum("...ij,...j->...i", Fb, ha) + hb

    axis = F.ndim - 3
    Fc, hc = lax.associative_scan(combine, (F, h), axis=axis)
    rest = jnp.einsum("...tij,...j->...ti", Fc, x0) + hc
    return jnp.concatenate([x0[..., None, :], rest], axis=-2)


def inverse_link(name: str) -> Callable:
    """The rate function g: "softplus" (log(1 + e^a)) or "exp"."""
    if name == "softplus":
        return jax.nn.softplus
    if name == "exp":
        return jnp.exp
    raise ValueError(f"link: expected 'softplus' or 'exp', got {name!r}")


def poisson_bin_log_prob(y, rate, dt: float, mask=None):
    """Elementwise log Poisson(y | rate * dt) (counts per bin); 0 where ``mask`` is False."""
    y0 = y if mask is None else jnp.where(mask, y, 0.0)
    mu = rate * dt
    lp = y0 * jnp.log(mu) - mu - gammaln(y0 + 1.0)
    return lp if mask is None else jnp.where(mask, lp, 0.0)


def point_process_log_prob(y, rate, dt: float, mask=None):
    """Elementwise discretised Poisson-process log density y log(rate) - rate dt; 0 where masked.

    ``y`` counts the events in each bin (0/1 on a fine grid); the sum over bins converges to the
    point-process log-likelihood sum_i log lam(t_i) - int lam(t) dt as dt -> 0.
    """
    y0 = y if mask is None else jnp.where(mask, y, 0.0)
    lp = y0 * jnp.log(rate) - rate * dt
    return lp if mask is None else jnp.where(mask, lp, 0.0)
