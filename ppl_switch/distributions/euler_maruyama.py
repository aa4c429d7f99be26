"""The Euler–Maruyama path prior of a latent SDE as a NumPyro distribution (gpSLDS, GP-SDE).

``EulerMaruyamaPath(drift_fn, input_drift, dt, initial_scale, time_mask, latent_dim)`` is p(x_{0:T-1}) of
the chain x_0 ~ N(0, s_0^2 I), x_{t+1} ~ N(x_t + dt (f(x_t) + u_t), dt I). Shapes: ``time_mask`` (B, T)
(True inside each trial), ``input_drift`` (B, T, K) or None, ``drift_fn`` maps (..., K) to (..., K);
batch shape (B,), event shape (T, K). Steps past a trial's length are N(0, I), independent of the rest.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ppl_switch.ops.sde import euler_maruyama_transition_log_prob

_LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["EulerMaruyamaPath"]


class EulerMaruyamaPath(dist.Distribution):
    """p(x_{0:T-1}) of the Euler–Maruyama chain; batch (B,), event (T, K).

    x_0 ~ N(0, s_0^2 I); x_{t+1} ~ N(x_t + dt (f(x_t) + u_t), dt I) for steps inside the trial; steps past
    a trial's length are N(0, I), independent of everything (so padding does not change the density of
    the valid part). ``drift_fn`` is the autonomous drift f, pointwise on (..., K); ``input_drift``
    (B, T, K) or None is the additive input term u_t = B v_t.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, drift_fn, input_drift, dt: float, initial_scale: float, time_mask, latent_dim: int, *,
                 validate_args=None):
        self.drift_fn = drift_fn
        self.input_drift = input_drift
        self.dt = float(dt)
        self.initial_scale = float(initial_scale)
        self.time_mask = time_mask
        B, T = jnp.shape(time_mask)
        super().__init__(batch_shape=(B,), event_shape=(T, latent_dim), validate_args=validate_args)

    def log_prob(self, x):
        drift = self.drift_fn(x[:, :-1])
        if self.input_drift is not None:
            drift = drift + self.input_drift[:, :-1]
        trans = euler_maruyama_transition_log_prob(x, drift, self.dt, None, self.time_mask).sum(-1)
        s0 = self.initial_scale
        init = jnp.sum(-0.5 * (x[:, 0] / s0) ** 2 - math.log(s0) - 0.5 * _LOG_2PI, -1)
        pad = jnp.sum(jnp.where(self.time_mask[..., None], 0.0, -0.5 * x**2 - 0.5 * _LOG_2PI), (-2, -1))
        return init + trans + pad

    def sample(self, key, sample_shape=()):
        if sample_shape:
            keys = jax.random.split(key, int(np.prod(sample_shape)))
            return jax.vmap(self.sample)(keys).reshape(tuple(sample_shape) + self.batch_shape + self.event_shape)
        B, (T, K) = self.batch_shape[0], self.event_shape
        dtype = jnp.result_type(float)
        k0, k1, k2 = jax.random.split(key, 3)
        x0 = self.initial_scale * jax.random.normal(k0, (B, K), dtype)
        eps = jax.random.normal(k1, (T - 1, B, K), dtype)
        u = jnp.zeros((T - 1, B, K), dtype) if self.input_drift is None else jnp.swapaxes(self.input_drift[:, :-1], 0, 1)

        def step(x, inp):
            e, ut = inp
            x_next = x + self.dt * (self.drift_fn(x) + ut) + math.sqrt(self.dt) * e
            return x_next, x_next

        _, rest = jax.lax.scan(step, x0, (eps, u))
        x = jnp.concatenate([x0[:, None], jnp.swapaxes(rest, 0, 1)], 1)
        pad = jax.random.normal(k2, x.shape, dtype)
        return jnp.where(self.time_mask[..., None], x, pad)
