"""Relaxed one-hot categorical (Concrete / Gumbel-softmax) distributions for NumPyro.

``RelaxedOneHotCategorical(temperature, logits=... | probs=...)`` lives on the probability simplex:

    z = softmax((logits + g) / temperature),   g_k ~ Gumbel(0, 1) i.i.d.,

with the exact Concrete density (Maddison et al. 2016, Jang et al. 2016) with respect to Lebesgue measure
on the first K-1 coordinates of z:

    log p(z) = lgamma(K) + (K-1) log(tau) + sum_k [l_k - (tau+1) log z_k] - K logsumexp_k(l_k - tau log z_k)

where l = logits (the density is unchanged by adding a constant to all logits). As tau -> 0 samples
become one-hot with argmax frequencies softmax(logits) (the Gumbel-max trick).

``ExpRelaxedOneHotCategorical`` is its log-space twin: the sample is y = log_softmax((logits + g)/tau),
so very small entries of z are represented without underflow. Its density is the ExpConcrete density

    log p(y) = lgamma(K) + (K-1) log(tau) + sum_k [l_k - tau y_k] - K logsumexp_k(l_k - tau y_k),

defined so that pushing y through ``exp`` (Jacobian sum_k y_k, as ``ExpTransform`` computes it) gives the
Concrete density above: ``log p_z(exp y) = log p_y(y) - sum_k y_k``.

``straight_through(z)`` returns the one-hot argmax of z in the forward pass and the gradient of z in the
backward pass. With ``RelaxedOneHotCategorical(..., straight_through=True)`` samples are hard one-hot
vectors carrying soft gradients; their ``log_prob`` is not a density (a one-hot point is on the simplex
boundary), so use the straight-through option for deterministic downstream computations and keep ELBO
sample sites soft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution
from numpyro.distributions.util import validate_sample

__all__ = [
    "RelaxedOneHotCategorical",
    "RelaxedMarkovChain",
    "ExpRelaxedOneHotCategorical",
    "straight_through",
    "concrete_log_prob",
    "exp_concrete_log_prob",
]


def _check_parameters(temperature, logits, probs):
    if (logits is None) == (probs is None):
        raise ValueError("RelaxedOneHotCategorical: pass exactly one of logits= or probs=")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    param = logits if logits is not None else probs
    if jnp.ndim(param) < 1:
        raise ValueError(
            f"{'logits' if logits is not None else 'probs'}: expected an array with a last (state) axis, got a scalar"
        )
    if jnp.shape(param)[-1] < 1:
        raise ValueError("logits/probs: expected at least one state (K >= 1) on the last axis")


def exp_concrete_log_prob(log_z, logits, temperature):
    """ExpConcrete log-density of ``log_z`` (..., K); ``temperature`` broadcasts against ``log_z[..., 0]``."""
    num_states = log_z.shape[-1]
    temperature = jnp.asarray(temperature)
    logits = logits - logsumexp(logits, axis=-1, keepdims=True)
    scores = logits - temperature[..., None] * log_z
    log_norm = gammaln(num_states) + (num_states - 1) * jnp.log(temperature)
    return log_norm + jnp.sum(scores, axis=-1) - num_states * logsumexp(scores, axis=-1)


def concrete_log_prob(z, logits, temperature):
    """Concrete log-density of a simplex point ``z`` (..., K) w.r.t. Lebesgue measure on K-1 coordinates.

    Entries of z are floored at the smallest normal float before the log so that points on (or rounded
    onto) the boundary give a finite value and finite gradients.
    """
    log_z = jnp.log(jnp.maximum(z, jnp.finfo(jnp.result_type(z)).tiny))
    return exp_concrete_log_prob(log_z, logits, temperature) - jnp.sum(log_z, axis=-1)


def straight_through(z):
    """One-hot argmax of ``z`` (..., K) in the forward pass, identity gradient in the backward pass."""
    hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=z.dtype)
    return hard + z - jax.lax.stop_gradient(z)


class ExpRelaxedOneHotCategorical(Distribution):
    """Log of a Concrete sample: y = log_softmax((logits + g) / temperature), y in R^K with logsumexp(y) = 0.

    Args:
        temperature: positive scalar or array broadcastable to the batch shape.
        logits: (..., K) unnormalised log-probabilities; or
        probs: (..., K) probabilities (normalised internally).
    """

    arg_constraints = {"temperature": constraints.positive, "logits": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["temperature", "logits"]
    has_rsample = True

    def __init__(self, temperature, logits=None, probs=None, *, validate_args=None):
        _check_parameters(temperature, logits, probs)
        if probs is not None:
            logits = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.result_type(probs, float)).tiny))
        temperature = jnp.asarray(temperature, dtype=jnp.result_type(logits, float))
        batch_shape = jax.lax.broadcast_shapes(jnp.shape(temperature), jnp.shape(logits)[:-1])
        self.logits = jnp.broadcast_to(logits, batch_shape + jnp.shape(logits)[-1:])
        self.temperature = jnp.broadcast_to(temperature, batch_shape)
        super().__init__(batch_shape=batch_shape, event_shape=jnp.shape(logits)[-1:], validate_args=validate_args)

    @property
    def probs(self):
        return jax.nn.softmax(self.logits, axis=-1)

    def rsample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.event_shape
        gumbels = jax.random.gumbel(key, shape, dtype=self.logits.dtype)
        return jax.nn.log_softmax((self.logits + gumbels) / self.temperature[..., None], axis=-1)

    def sample(self, key, sample_shape=()):
        return self.rsample(key, sample_shape)

    @validate_sample
    def log_prob(self, value):
        return exp_concrete_log_prob(value, self.logits, self.temperature)

    def tree_flatten(self):
        return (self.temperature, self.logits), None

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        temperature, logits = params
        return cls(temperature, logits=logits)


class RelaxedOneHotCategorical(Distribution):
    """Concrete / Gumbel-softmax distribution on the simplex, with reparameterised samples.

    Args:
        temperature: positive scalar or array broadcastable to the batch shape.
        logits: (..., K) unnormalised log-probabilities; or
        probs: (..., K) probabilities (normalised internally).
        straight_through: if True, ``sample`` returns hard one-hot vectors with soft (straight-through)
            gradients. ``log_prob`` is then not meaningful at the returned points (see module docstring).
    """

    arg_constraints = {"temperature": constraints.positive, "logits": constraints.real_vector}
    support = constraints.simplex
    reparametrized_params = ["temperature", "logits"]
    has_rsample = True

    def __init__(self, temperature, logits=None, probs=None, *, straight_through=False, validate_args=None):
        self.base = ExpRelaxedOneHotCategorical(temperature, logits=logits, probs=probs)
        self.straight_through = bool(straight_through)
        super().__init__(
            batch_shape=self.base.batch_shape, event_shape=self.base.event_shape, validate_args=validate_args
        )

    @property
    def logits(self):
        return self.base.logits

    @property
    def probs(self):
        return self.base.probs

    @property
    def temperature(self):
        return self.base.temperature

    def rsample(self, key, sample_shape=()):
        z = jnp.exp(self.base.rsample(key, sample_shape))
        return straight_through(z) if self.straight_through else z

    def sample(self, key, sample_shape=()):
        return self.rsample(key, sample_shape)

    @validate_sample
    def log_prob(self, value):
        return concrete_log_prob(value, self.logits, self.temperature)

    @property
    def mean(self):
        raise NotImplementedError("RelaxedOneHotCategorical: the mean has no closed form; average samples")

    def tree_flatten(self):
        return (self.base.temperature, self.base.logits), self.straight_through

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        temperature, logits = params
        return cls(temperature, logits=logits, straight_through=aux_data)


def _couple(z_prev, coupling):
    """Contribution of z_{t-1} to the logits of z_t: scalar (gamma * I) or (K, K) matrix coupling."""
    coupling = jnp.asarray(coupling)
    if coupling.ndim == 0:
        return coupling * z_prev
    return z_prev @ coupling.T


class RelaxedMarkovChain(Distribution):
    """A chain of Concrete variables whose logits may depend on the previous soft state.

        z_1 ~ GS(base_1, tau),   z_t ~ GS(base_t + G z_{t-1}, tau),  t >= 2,

    with G = ``coupling`` a scalar (gamma * I, the GDM's sticky term), a (K, K) matrix, or None
    (independent steps). The event is a whole path (T, K); ``log_prob`` is vectorised over time, and
    ``sample`` scans over time only when there is a coupling.

    Args:
        temperature: positive scalar.
        base_logits: (..., T, K) logits that do not depend on z.
        coupling: None, a scalar or a (K, K) matrix.
        step_mask: optional (..., T) bool; steps where it is False contribute 0 to ``log_prob``
            (padding past a trial's length).
    """

    arg_constraints = {"base_logits": constraints.real_matrix}
    support = constraints.independent(constraints.simplex, 1)
    reparametrized_params = ["base_logits", "coupling"]
    has_rsample = True

    def __init__(self, temperature, base_logits, coupling=None, step_mask=None, *, validate_args=None):
        if jnp.ndim(base_logits) < 2:
            raise ValueError(f"base_logits: expected shape (..., time, K), got {jnp.shape(base_logits)}")
        if coupling is not None and jnp.ndim(coupling) not in (0, 2):
            raise ValueError(f"coupling: expected a scalar or a (K, K) matrix, got shape {jnp.shape(coupling)}")
        self.temperature = temperature
        self.base_logits = base_logits
        self.coupling = coupling
        batch_shape = jnp.shape(base_logits)[:-2]
        self.step_mask = None if step_mask is None else jnp.broadcast_to(step_mask, batch_shape + jnp.shape(base_logits)[-2:-1])
        super().__init__(batch_shape=batch_shape, event_shape=jnp.shape(base_logits)[-2:], validate_args=validate_args)

    def logits(self, z):
        """(..., T, K) logits of every step given a path ``z`` (only z_{1:T-1} is used)."""
        if self.coupling is None:
            return jnp.broadcast_to(self.base_logits, jnp.shape(z)[:-2] + self.base_logits.shape[-2:])
        shift = _couple(z[..., :-1, :], self.coupling)
        base = jnp.broadcast_to(self.base_logits, jnp.shape(z)[:-2] + self.base_logits.shape[-2:])
        return base.at[..., 1:, :].add(shift)

    def rsample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.event_shape
        gumbels = jax.random.gumbel(key, shape, dtype=jnp.result_type(self.base_logits, float))
        base = jnp.broadcast_to(self.base_logits, shape)
        if self.coupling is None:
            return jax.nn.softmax((base + gumbels) / self.temperature, axis=-1)

        def step(z_prev, inputs):
            base_t, g_t = inputs
            z_t = jax.nn.softmax((base_t + _couple(z_prev, self.coupling) + g_t) / self.temperature, axis=-1)
            return z_t, z_t

        time_first = (jnp.moveaxis(base, -2, 0), jnp.moveaxis(gumbels, -2, 0))
        z_1 = jax.nn.softmax((time_first[0][0] + time_first[1][0]) / self.temperature, axis=-1)
        _, rest = jax.lax.scan(step, z_1, (time_first[0][1:], time_first[1][1:]))
        return jnp.moveaxis(jnp.concatenate([z_1[None], rest], 0), 0, -2)

    def sample(self, key, sample_shape=()):
        return self.rsample(key, sample_shape)

    def step_log_prob(self, value):
        """(..., T) per-step log-densities log p(z_t | z_{t-1}); 0 where ``step_mask`` is False."""
        lp = concrete_log_prob(value, self.logits(value), self.temperature)
        return lp if self.step_mask is None else jnp.where(self.step_mask, lp, 0.0)

    @validate_sample
    def log_prob(self, value):
        return jnp.sum(self.step_log_prob(value), -1)

    def tree_flatten(self):
        raise NotImplementedError("RelaxedMarkovChain is not a pytree; build it inside jitted functions")
