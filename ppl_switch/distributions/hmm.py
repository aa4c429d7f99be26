"""The marginal likelihood of a discrete HMM as a NumPyro distribution.

:class:`MarginalHMM` sums the discrete state path out with the forward algorithm, so NUTS and SVI see
a continuous model. The model computes the emission log-likelihoods ``log p(y_t | z_t = k)`` itself
(any emission family, autoregressive or switching dynamics alike) and hands them over as
``log_likelihoods``; the distribution only adds the Markov chain. Its ``log_prob(value)`` therefore
ignores ``value`` beyond a shape check. Two equivalent ways to use it in a model::

    hmm = MarginalHMM(initial_probs, transition_matrix, log_likelihoods, mask=data.time_mask)
    numpyro.factor("y", hmm.log_prob_marginal())                      # (a)
    numpyro.sample("y", hmm, obs=data.time_mask)                      # (b) placeholder obs, shape (..., T)

(b) records a named observed site (for ``log_likelihood`` utilities); ``obs`` is only a placeholder of
shape ``batch_shape + (T,)``. Decoding after fitting: :meth:`filter`, :meth:`smoother`,
:meth:`viterbi`, :meth:`sample_states`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution

from ppl_switch.ops import hmm as ops


class MarginalHMM(Distribution):
    """p(y_{0:T-1}) = sum_z p(z_0) prod_t p(z_{t+1} | z_t) prod_t p(y_t | z_t), batched over trials.

    Args:
        initial_probs: (..., K) initial distribution; or give ``initial_logits`` (..., K) instead.
        transition_matrix: (..., K, K) rows p(z_{t+1} | z_t), or time-varying (..., T-1, K, K); or give
            ``transition_logits`` of the same shape instead (normalised with a softmax over the last axis).
        log_likelihoods: (..., T, K) emission log-likelihoods ``log p(y_t | z_t = k)``.
        mask: optional (..., T) bool, False = no observation at that step (padding of ragged trials).
        time_varying: whether the transitions carry a time axis. None infers it: time-varying iff
            the transition array has one more dim than ``log_likelihoods``. Pass True for one
            time-varying (T-1, K, K) array shared by a batch of trials.
        parallel: use the parallel-in-time (associative scan) filter.

    The batch shape (trials, ...) is the broadcast of the leading dims; the event shape is (T,).
    """

    arg_constraints = {
        "log_likelihoods": constraints.real,
    }
    support = constraints.real_vector
    pytree_data_fields = ("_initial", "_transition", "log_likelihoods", "mask")
    pytree_aux_fields = ("_from_logits", "time_varying", "parallel")

    def __init__(
        self,
        initial_probs=None,
        transition_matrix=None,
        log_likelihoods=None,
        *,
        initial_logits=None,
        transition_logits=None,
        mask=None,
        time_varying: Optional[bool] = None,
        parallel: bool = False,
        validate_args=None,
    ):
        if (initial_probs is None) == (initial_logits is None):
            raise ValueError("MarginalHMM: give exactly one of initial_probs or initial_logits")
        if (transition_matrix is None) == (transition_logits is None):
            raise ValueError("MarginalHMM: give exactly one of transition_matrix or transition_logits")
        from_logits = initial_logits is not None
        if from_logits != (transition_logits is not None):
            raise ValueError(
                "MarginalHMM: give probabilities for both initial and transition (initial_probs, "
                "transition_matrix) or logits for both (initial_logits, transition_logits)"
            )
        if log_likelihoods is None:
            raise ValueError("MarginalHMM: log_likelihoods (..., T, K) is required")
        initial_name = "initial_logits" if from_logits else "initial_probs"
        transition_name = "transition_logits" if from_logits else "transition_matrix"
        initial = jnp.asarray(initial_logits if from_logits else initial_probs)
        transition = jnp.asarray(transition_logits if from_logits else transition_matrix)
        log_likelihoods = jnp.asarray(log_likelihoods)

        if log_likelihoods.ndim < 2:
            raise ValueError(f"log_likelihoods must have shape (..., T, K), got shape {log_likelihoods.shape}")
        T, K = log_likelihoods.shape[-2:]
        if initial.ndim < 1 or initial.shape[-1] != K:
            raise ValueError(f"{initial_name} must have shape (..., K) with K = {K}, got shape {initial.shape}")
        if time_varying is None:
            time_varying = transition.ndim == log_likelihoods.ndim + 1
        event_dims = 3 if time_varying else 2
        expected = (T - 1, K, K) if time_varying else (K, K)
        if transition.ndim < event_dims or transition.shape[-event_dims:] != expected:
            raise ValueError(
                f"{transition_name} must have shape (..., {', '.join(map(str, expected))}) "
                f"({'time-varying' if time_varying else 'static'}) to match log_likelihoods (..., T, K) = "
                f"(..., {T}, {K}), got shape {transition.shape}"
            )
        batch_shapes = [log_likelihoods.shape[:-2], initial.shape[:-1], transition.shape[:-event_dims]]
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.dtype != jnp.bool_:
                raise ValueError(f"mask must be a boolean array (True = observed), got dtype {mask.dtype}")
            if mask.ndim < 1 or mask.shape[-1] != T:
                raise ValueError(f"mask must have shape (..., T) with T = {T}, got shape {mask.shape}")
            batch_shapes.append(mask.shape[:-1])
        try:
            batch_shape = jax.lax.broadcast_shapes(*batch_shapes)
        except ValueError as err:
            raise ValueError(
                f"MarginalHMM: batch dims do not broadcast: log_likelihoods {batch_shapes[0]}, "
                f"{initial_name} {batch_shapes[1]}, {transition_name} {batch_shapes[2]}"
                + (f", mask {batch_shapes[3]}" if mask is not None else "")
            ) from err

        self._initial = initial
        self._transition = transition
        self.log_likelihoods = log_likelihoods
        self.mask = mask
        self._from_logits = from_logits
        self.time_varying = bool(time_varying)
        self.parallel = bool(parallel)
        super().__init__(batch_shape=batch_shape, event_shape=(T,), validate_args=validate_args)

    # ----- parameters ---------------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        return self.log_likelihoods.shape[-1]

    @property
    def initial_probs(self):
        """(..., K) initial distribution."""
        return jax.nn.softmax(self._initial, -1) if self._from_logits else self._initial

    @property
    def transition_matrix(self):
        """(..., K, K) or (..., T-1, K, K) transition probabilities."""
        return jax.nn.softmax(self._transition, -1) if self._from_logits else self._transition

    # ----- batching -----------------------------------------------------------------------------
    def _per_trial(self, fn, initial, transition, *extra):
        """Apply ``fn(initial, transition, log_likelihoods, mask, *extra)`` to every batch element.

        Arguments without batch dims are shared (``in_axes=None``) rather than copied; the others are
        broadcast to the batch shape and flattened for one ``vmap``.
        """
        batch = self.batch_shape
        n = 1
        for d in batch:
            n *= d
        event_dims = 3 if self.time_varying else 2
        args = [
            (initial, 1),
            (transition, event_dims),
            (self.log_likelihoods, 2),
            (self.mask, 1),
            *((x, 0) for x in extra),
        ]
        flat, axes = [], []
        for x, dims in args:
            if x is None or x.ndim == dims:
                flat.append(x)
                axes.append(None)
            else:
                x = jnp.broadcast_to(x, batch + x.shape[x.ndim - dims :])
                flat.append(x.reshape((n,) + x.shape[len(batch) :]))
                axes.append(0)
        if all(a is None for a in axes):
            return fn(*flat)
        out = jax.vmap(fn, in_axes=axes)(*flat)
        return jax.tree_util.tree_map(lambda y: y.reshape(batch + y.shape[1:]), out)

    # ----- density ------------------------------------------------------------------------------
    def log_prob_marginal(self):
        """(batch_shape) marginal log-likelihood log p(y) of every trial."""
        parallel = self.parallel
        if self._from_logits:
            fn = lambda p, A, ll, m: ops.hmm_log_normalizer_from_logits(p, A, ll, m, parallel)  # noqa: E731
        else:
            fn = lambda p, A, ll, m: ops.hmm_filter(p, A, ll, m, parallel).log_normalizer  # noqa: E731
        return self._per_trial(fn, self._initial, self._transition)

    def log_prob(self, value):
        """Marginal log-likelihood, shape ``broadcast(value.shape[:-1], batch_shape)``.

        ``value`` is a placeholder (the emissions are already in ``log_likelihoods``); only its shape is
        checked: it must broadcast to ``batch_shape + (T,)``.
        """
        shape = jnp.shape(value)
        try:
            full = jax.lax.broadcast_shapes(shape, self.batch_shape + self.event_shape)
        except ValueError as err:
            raise ValueError(
                f"MarginalHMM.log_prob: value is a placeholder of shape batch_shape + (T,) = "
                f"{self.batch_shape + self.event_shape}; got shape {shape}"
            ) from err
        return jnp.broadcast_to(self.log_prob_marginal(), full[:-1])

    def step_log_likelihoods(self):
        """(..., T) one-step predictive log-likelihoods log p(y_t | y_{0:t-1}), 0 at masked steps.

        They sum over time to :meth:`log_prob_marginal` (the pointwise log-likelihood for ArviZ).
        """

        def fn(p, A, ll, m):
            predicted = ops.hmm_filter(p, A, ll, m, self.parallel).predicted_probs
            if m is not None:
                ll = jnp.where(m[:, None], ll, 0.0)
            top = jax.lax.stop_gradient(jnp.max(ll, -1, keepdims=True))
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            steps = jnp.log(jnp.sum(predicted * jnp.exp(ll - top), -1)) + top[:, 0]
            return steps if m is None else jnp.where(m, steps, 0.0)  # exactly 0, not round-off

        return self._per_trial(fn, self.initial_probs, self.transition_matrix)

    def sample(self, key, sample_shape=()):
        raise NotImplementedError(
            "MarginalHMM is the marginal of emissions that the model supplies as log-likelihoods; it "
            "cannot draw observations. Use sample_states(key) for state paths from p(z | y), or sample "
            "z and y in the model's own simulator."
        )

    # ----- decoding -----------------------------------------------------------------------------
    def filter(self) -> ops.HMMFilterResult:
        """Forward filter per trial: fields with leading batch dims (see ops.hmm_filter)."""
        return self._per_trial(
            lambda p, A, ll, m: ops.hmm_filter(p, A, ll, m, self.parallel), self.initial_probs, self.transition_matrix
        )

    def smoother(self) -> ops.HMMSmootherResult:
        """Posterior marginals per trial (see ops.hmm_smoother)."""
        return self._per_trial(
            lambda p, A, ll, m: ops.hmm_smoother(p, A, ll, m, self.parallel), self.initial_probs, self.transition_matrix
        )

    def viterbi(self):
        """(..., T) most probable state path of every trial."""
        return self._per_trial(
            lambda p, A, ll, m: ops.hmm_viterbi(p, A, ll, m, self.parallel), self.initial_probs, self.transition_matrix
        )

    def sample_states(self, key, num_samples: Optional[int] = None):
        """State paths from p(z | y): (..., T), or (num_samples, ..., T) with ``num_samples``."""
        n = 1
        for d in self.batch_shape:
            n *= d
        keys = jax.random.split(key, n).reshape(self.batch_shape + (-1,)) if self.batch_shape else key

        def fn(p, A, ll, m, k):
            return ops.hmm_sample(k, p, A, ll, m, self.parallel, num_samples)

        if self.batch_shape:
            paths = self._per_trial_keys(fn, keys)
        else:
            paths = fn(self.initial_probs, self.transition_matrix, self.log_likelihoods, self.mask, key)
        if num_samples is not None and self.batch_shape:
            paths = jnp.moveaxis(paths, len(self.batch_shape), 0)
        return paths

    def _per_trial_keys(self, fn, keys):
        # keys carry the batch shape, so they are always mapped
        batch = self.batch_shape
        flat_keys = keys.reshape((-1,) + keys.shape[len(batch) :])

        def with_index(p, A, ll, m, i):
            return fn(p, A, ll, m, flat_keys[i])

        index = jnp.arange(flat_keys.shape[0]).reshape(batch)
        return self._per_trial(with_index, self.initial_probs, self.transition_matrix, index)


__all__ = ["MarginalHMM"]
