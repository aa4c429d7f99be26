"""Gauss–Markov path guide: a linear-Gaussian chain over a latent path, per trial.

For each trial b (batch) the guide is::

    q(x_1)              = N(m_b, L0_b L0_b')
    q(x_t | x_{t-1})    = N(F_{b,t} x_{t-1} + g_{b,t}, L_{b,t} L_{b,t}')      t = 2..T

a Gaussian whose precision is block-tridiagonal in time. Sampling (a scan), ``log_prob`` (vectorised
residuals) and the entropy (sum of log-diagonals) all cost O(T D^3) per trial, so the guide scales
linearly in T. It is generic in (trials, time, latent) and reusable by any model whose latent path is a
single ``(trials, time, latent)`` site (SLDS, rSLDS, gpSLDS, CLDS).

Ragged trials: given ``time_mask`` (trials, time), steps past a trial's end are decoupled from the
trial (F = 0 there), so the valid part of each path is a chain of its own and the padding is an
independent Gaussian per step (models put an N(0, I) prior on padded steps).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints

_LOG_2PI = math.log(2.0 * math.pi)


class GaussMarkovChain(dist.Distribution):
    """Linear-Gaussian chain over paths: batch shape (B,), event shape (T, D).

    Args:
        initial_loc: (B, D) m.
        initial_scale_tril: (B, D, D) lower Cholesky L0.
        transition_matrices: (B, T-1, D, D); row t maps x_t to the mean of x_{t+1}.
        transition_offsets: (B, T-1, D) g.
        transition_scale_trils: (B, T-1, D, D) lower Cholesky factors L_t.
    """

    arg_constraints = {
        "initial_loc": constraints.real_vector,
        "initial_scale_tril": constraints.lower_cholesky,
        "transition_matrices": constraints.independent(constraints.real, 2),
        "transition_offsets": constraints.real_vector,
        "transition_scale_trils": constraints.lower_cholesky,
    }
    support = constraints.independent(constraints.real, 2)
    reparametrized_params = list(arg_constraints)

    def __init__(self, initial_loc, initial_scale_tril, transition_matrices, transition_offsets, transition_scale_trils, *, validate_args=None):
        self.initial_loc = initial_loc
        self.initial_scale_tril = initial_scale_tril
        self.transition_matrices = transition_matrices
        self.transition_offsets = transition_offsets
        self.transition_scale_trils = transition_scale_trils
        B, D = jnp.shape(initial_loc)
        T = jnp.shape(transition_offsets)[1] + 1
        super().__init__(batch_shape=(B,), event_shape=(T, D), validate_args=validate_args)

    def _path(self, eps):
        """Map standard-normal noise eps (B, T, D) to a path (B, T, D)."""

        def one(m, L0, F, g, L, e):
            x0 = m + L0 @ e[0]

            def step(x, inp):
                Ft, gt, Lt, et = inp
                x_next = Ft @ x + gt + Lt @ et
                return x_next, x_next

            _, rest = lax.scan(step, x0, (F, g, L, e[1:]))
            return jnp.concatenate([x0[None], rest])

        return jax.vmap(one)(
            self.initial_loc, self.initial_scale_tril, self.transition_matrices, self.transition_offsets,
            self.transition_scale_trils, eps,
        )

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        eps = jax.random.normal(key, shape, jnp.result_type(self.initial_loc, float))
        flat = eps.reshape((-1,) + self.batch_shape + self.event_shape)
        return jax.vmap(self._path)(flat).reshape(shape)

    def log_prob(self, value):
        """(..., B) log q(path); ``value`` (..., B, T, D)."""
        resid0 = value[..., 0, :] - self.initial_loc
        pred = jnp.einsum("...tij,...tj->...ti", self.transition_matrices, value[..., :-1, :]) + self.transition_offsets
        resid = value[..., 1:, :] - pred
        # explicit broadcasting: jax < 0.10 needs equal batch ranks in triangular_solve
        L0 = jnp.broadcast_to(self.initial_scale_tril, resid0.shape + resid0.shape[-1:])
        w0 = solve_triangular(L0, resid0[..., None], lower=True)[..., 0]
        L = jnp.broadcast_to(self.transition_scale_trils, resid.shape + resid.shape[-1:])
        w = solve_triangular(L, resid[..., None], lower=True)[..., 0]
        T, D = self.event_shape
        return (
            -0.5 * (jnp.sum(w0**2, -1) + jnp.sum(w**2, (-2, -1)))
            - self._log_det_scale()
            - 0.5 * T * D * _LOG_2PI
        )

    def _log_det_scale(self):
        diag0 = jnp.diagonal(self.initial_scale_tril, axis1=-2, axis2=-1)
        diag = jnp.diagonal(self.transition_scale_trils, axis1=-2, axis2=-1)
        return jnp.sum(jnp.log(diag0), -1) + jnp.sum(jnp.log(diag), (-2, -1))

    def entropy(self):
        """(B,) exact entropy: sum of log-determinants of the conditional covariances."""
        T, D = self.event_shape
        return 0.5 * T * D * (1.0 + _LOG_2PI) + self._log_det_scale()

    @property
    def mean(self):
        """(B, T, D) means, by propagating the conditional means."""
        return self._path(jnp.zeros(self.batch_shape + self.event_shape, self.initial_loc.dtype))


def gauss_markov_chain(
    prefix: str,
    num_trials: int,
    num_timesteps: int,
    latent_dim: int,
    *,
    init_loc=None,
    init_scale: float = 0.1,
    time_mask=None,
) -> GaussMarkovChain:
    """Register the chain's variational parameters with ``numpyro.param`` and return the distribution.

    Call inside a guide. Parameters are named ``{prefix}_initial_loc``, ``{prefix}_initial_scale_tril``,
    ``{prefix}_transition_matrices``, ``{prefix}_transition_offsets``, ``{prefix}_transition_scale_trils``.

    Args:
        num_trials, num_timesteps, latent_dim: B, T, D.
        init_loc: optional (B, T, D) initial path means (F starts at 0, so g starts at init_loc).
        init_scale: initial conditional standard deviation.
        time_mask: optional (B, T) bool, True inside each trial; padded steps are decoupled (F = 0).
    """
    B, T, D = int(num_trials), int(num_timesteps), int(latent_dim)
    if init_loc is None:
        init_loc = np.zeros((B, T, D))
    init_loc = jnp.asarray(init_loc)
    if init_loc.shape != (B, T, D):
        raise ValueError(f"init_loc: expected shape {(B, T, D)}, got {init_loc.shape}")
    if not init_scale > 0:
        raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
    eye = jnp.eye(D, dtype=init_loc.dtype)
    m = numpyro.param(f"{prefix}_initial_loc", init_loc[:, 0])
    L0 = numpyro.param(f"{prefix}_initial_scale_tril", jnp.broadcast_to(init_scale * eye, (B, D, D)), constraint=constraints.lower_cholesky)
    F = numpyro.param(f"{prefix}_transition_matrices", jnp.zeros((B, T - 1, D, D), init_loc.dtype))
    g = numpyro.param(f"{prefix}_transition_offsets", init_loc[:, 1:])
    L = numpyro.param(
        f"{prefix}_transition_scale_trils", jnp.broadcast_to(init_scale * eye, (B, T - 1, D, D)), constraint=constraints.lower_cholesky
    )
    if time_mask is not None:
        F = F * jnp.asarray(time_mask)[:, 1:, None, None]
    return GaussMarkovChain(m, L0, F, g, L)


def chain_precision_blocks(chain: GaussMarkovChain):
    """Dense check helper: block-tridiagonal precision of one trial's chain (trial 0) as a dense matrix.

    Returns (mean (T*D,), precision (T*D, T*D)); O((TD)^2) memory -- tests and tiny problems only.
    """
    T, D = chain.event_shape
    # x = M^{-1}(Lc eps + offsets) with M the block lower-bidiagonal "I - F" operator
    M = np.eye(T * D)
    S = np.zeros((T * D, T * D))
    S[:D, :D] = np.asarray(chain.initial_scale_tril[0])
    for t in range(1, T):
        M[t * D : (t + 1) * D, (t - 1) * D : t * D] = -np.asarray(chain.transition_matrices[0, t - 1])
        S[t * D : (t + 1) * D, t * D : (t + 1) * D] = np.asarray(chain.transition_scale_trils[0, t - 1])
    offsets = np.concatenate([np.asarray(chain.initial_loc[0]), np.asarray(chain.transition_offsets[0]).ravel()])
    Minv = np.linalg.inv(M)
    cov = Minv @ S @ S.T @ Minv.T
    return Minv @ offsets, np.linalg.inv(cov)


__all__ = ["GaussMarkovChain", "gauss_markov_chain", "chain_precision_blocks"]
