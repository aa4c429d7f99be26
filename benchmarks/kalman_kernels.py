"""Kalman kernels to time: a random stable LGSSM (full emission covariance) and the filter/RTS smoother
of each implementation, given identically to both libraries.

Used by ``benchmarks/kernels.py`` (which runs each implementation in its own subprocess with a time-out).
Every kernel is a function ``(ours: LGSSMParams, theirs: dynamax ParamsLGSSM, y (T, N))`` returning the
log-likelihood (filters) or the smoothed means (smoothers).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.ops import kalman

IMPLS = ("ours_seq", "ours_par", "dynamax_seq", "dynamax_par")


def problem(num_timesteps: int, latent_dim: int, obs_dim: int, seed: int = 0) -> tuple:
    """(ours, dynamax params or None, y (T, N)) in float32."""
    rng = np.random.default_rng(seed)
    A = 0.95 * np.linalg.qr(rng.normal(size=(latent_dim, latent_dim)))[0]
    X = rng.normal(size=(obs_dim, obs_dim))
    R = 0.1 * (X @ X.T / obs_dim + np.eye(obs_dim))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    params = kalman.lgssm_params(
        f32(np.zeros(latent_dim)),
        f32(np.eye(latent_dim)),
        f32(A),
        f32(0.1 * np.eye(latent_dim)),
        f32(rng.normal(size=(obs_dim, latent_dim))),
        f32(R),
        dynamics_bias=f32(np.zeros(latent_dim)),
        emission_bias=f32(np.zeros(obs_dim)),
    )
    _, y = jax.jit(kalman.lgssm_simulate, static_argnums=2)(jax.random.PRNGKey(num_timesteps), params, num_timesteps)
    return params, _dynamax_params(params), y


def _dynamax_params(p: kalman.LGSSMParams):
    try:
        from dynamax.linear_gaussian_ssm.inference import (
            ParamsLGSSM,
            ParamsLGSSMDynamics,
            ParamsLGSSMEmissions,
            ParamsLGSSMInitial,
        )
    except ImportError:  # dynamax is optional
        return None
    D, N = p.initial_mean.shape[0], p.emission_matrix.shape[0]
    no_inputs = jnp.zeros((D, 0), jnp.float32), jnp.zeros((N, 0), jnp.float32)
    return ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=p.initial_mean, cov=p.initial_cov),
        dynamics=ParamsLGSSMDynamics(p.dynamics_matrix, p.dynamics_bias, no_inputs[0], p.dynamics_cov),
        emissions=ParamsLGSSMEmissions(p.emission_matrix, p.emission_bias, no_inputs[1], p.emission_cov),
    )


def kernels(impl: str) -> dict[str, Callable]:
    """{"filter": fn, "smoother": fn} for one implementation (jit-compiled by the caller)."""
    if impl.startswith("ours"):
        parallel = impl == "ours_par"
        return {
            "filter": lambda p, q, y: kalman.lgssm_filter(p, y, parallel=parallel).log_likelihood,
            "smoother": lambda p, q, y: kalman.lgssm_smoother(p, y, parallel=parallel).smoothed_means,
        }
    if impl == "dynamax_seq":
        from dynamax.linear_gaussian_ssm import inference as dx
    else:
        from dynamax.linear_gaussian_ssm import parallel_inference as dx
    return {
        "filter": lambda p, q, y: dx.lgssm_filter(q, y).marginal_loglik,
        "smoother": lambda p, q, y: dx.lgssm_smoother(q, y).smoothed_means,
    }
