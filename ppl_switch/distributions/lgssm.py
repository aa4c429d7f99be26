"""Kalman-marginalised linear-Gaussian state space model as a NumPyro distribution over observations.

``LinearGaussianStateSpace(params, T)`` is the distribution of y_{1:T} with the latent path x_{1:T}
integrated out exactly by the Kalman filter (see :mod:`ppl_switch.ops.kalman` for the model and the
parameter shapes). Using it as the observation site lets NUTS and SVI work on the parameters alone;
the latent path is recovered afterwards with :meth:`smoother` or :meth:`posterior_sample`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample

from ppl_switch.ops import kalman
from ppl_switch.ops.kalman import LGSSMParams


class LinearGaussianStateSpace(dist.Distribution):
    """p(y_{1:T}) of a linear-Gaussian state space model, latent states marginalised.

    Args:
        params: :class:`~ppl_switch.ops.kalman.LGSSMParams`; or leave None and pass its fields as
            keyword arguments (``initial_mean=..., ...``; built with :func:`~ppl_switch.ops.kalman.lgssm_params`,
            so the biases default to zero and ``emission_cov_diag`` may replace ``emission_cov``).
        num_timesteps: T. Inferred from ``mask`` when omitted.
        mask: optional (T, N) bool, True = observed; ``log_prob`` counts only observed entries, so padded
            ragged trials give the same value as unpadded ones.
        parallel: use the parallel-in-time (associative scan) kernels.

    Event shape (T, N); batch shape (). ``log_prob(y)`` accepts y of shape (..., T, N) and returns (...).
    """

    support = constraints.independent(constraints.real, 2)
    arg_constraints = {}
    pytree_data_fields = ("params", "mask")
    pytree_aux_fields = ("num_timesteps", "parallel")

    def __init__(
        self,
        params: Optional[LGSSMParams] = None,
        num_timesteps: Optional[int] = None,
        mask=None,
        *,
        parallel: bool = False,
        validate_args=None,
        **fields,
    ):
        if num_timesteps is None:
            if mask is None:
                raise ValueError("num_timesteps is required when no mask is given")
            num_timesteps = jnp.shape(mask)[0]
        num_timesteps = int(num_timesteps)
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if params is None:
            params = kalman.lgssm_params(**fields, num_timesteps=num_timesteps)
        elif fields:
            raise ValueError(f"give params or its fields, not both (got extra {sorted(fields)})")
        _, N = kalman.check_params(params, num_timesteps)
        if mask is not None:
            if tuple(jnp.shape(mask)) != (num_timesteps, N):
                raise ValueError(f"mask must have shape {(num_timesteps, N)}, got {jnp.shape(mask)}")
            mask = jnp.asarray(mask, bool)
        self.params = params
        self.num_timesteps = num_timesteps
        self.mask = mask
        self.parallel = parallel
        super().__init__(batch_shape=(), event_shape=(num_timesteps, N), validate_args=validate_args)

    def _map_trials(self, fn, y):
        """Apply ``fn`` to every (T, N) slice of y (..., T, N), returning stacked results."""
        y = jnp.asarray(y)
        if y.shape[-2:] != self.event_shape:
            raise ValueError(f"y must have trailing shape {self.event_shape}, got {y.shape}")
        lead = y.shape[:-2]
        flat = y.reshape((-1,) + self.event_shape)
        out = jax.vmap(fn)(flat)
        return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), out)

    @validate_sample
    def log_prob(self, value):
        return self._map_trials(
            lambda y: kalman.lgssm_filter(self.params, y, self.mask, self.parallel).log_likelihood, value
        )

    def sample_with_states(self, key, sample_shape=()):
        """Draw (x, y) jointly from the model: x (*sample_shape, T, D), y (*sample_shape, T, N)."""
        n = 1
        for s in sample_shape:
            n *= s
        keys = jax.random.split(key, n)
        x, y = jax.vmap(lambda k: kalman.lgssm_simulate(k, self.params, self.num_timesteps))(keys)
        return x.reshape(tuple(sample_shape) + x.shape[1:]), y.reshape(tuple(sample_shape) + y.shape[1:])

    def sample(self, key, sample_shape=()):
        return self.sample_with_states(key, sample_shape)[1]

    def sample_with_intermediates(self, key, sample_shape=()):
        x, y = self.sample_with_states(key, sample_shape)
        return y, [x]

    def filter(self, y) -> kalman.FilterResult:
        """Kalman filter of y (..., T, N) under this distribution's mask; fields gain leading dims (...)."""
        return self._map_trials(lambda yi: kalman.lgssm_filter(self.params, yi, self.mask, self.parallel), y)

    def smoother(self, y) -> kalman.SmootherResult:
        """RTS smoother of y (..., T, N); see :class:`~ppl_switch.ops.kalman.SmootherResult`."""
        return self._map_trials(lambda yi: kalman.lgssm_smoother(self.params, yi, self.mask, self.parallel), y)

    def posterior_sample(self, key, y, sample_shape=()):
        """Latent paths x ~ p(x | y) for one trial y (T, N): returns (*sample_shape, T, D)."""
        n = 1
        for s in sample_shape:
            n *= s
        keys = jax.random.split(key, n)
        draws = jax.vmap(lambda k: kalman.lgssm_sample(k, self.params, y, self.mask, self.parallel))(keys)
        return draws.reshape(tuple(sample_shape) + draws.shape[1:])
