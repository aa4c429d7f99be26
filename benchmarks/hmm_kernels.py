"""HMM kernels to time: a random sticky K-state HMM and the filter/smoother of each implementation.

Used by ``benchmarks/kernels.py`` (which runs each implementation in its own subprocess with a time-out).
Every kernel is a function ``(initial (K,), transition (K, K), log_likelihoods (T, K))`` returning the
same outputs on both sides: the filters (log normaliser, filtered and predicted probabilities), the
smoothers (log normaliser, smoothed marginals), so neither side pays for outputs the other skips, and
``log_normalizer_grad`` the gradient of the filter's log normaliser with respect to the transition matrix and
the log-likelihoods: what every SVI step or NUTS leapfrog step of an HMM-based model computes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.ops import hmm as ops_hmm

IMPLS = ("ours_seq", "ours_par", "dynamax_seq", "dynamax_par")


def problem(num_timesteps: int, num_states: int, seed: int = 0) -> tuple:
    """(initial (K,), transition (K, K), log_likelihoods (T, K)) in float32 (float64 under x64)."""
    rng = np.random.default_rng(seed)
    transition = 0.9 * np.eye(num_states) + 0.1 * rng.dirichlet(np.ones(num_states), size=num_states)
    initial = rng.dirichlet(np.ones(num_states))
    log_likelihoods = -0.5 * rng.normal(size=(num_timesteps, num_states)) ** 2 * 4.0
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return tuple(jnp.asarray(x, dtype) for x in (initial, transition, log_likelihoods))


def kernels(impl: str) -> dict[str, Callable]:
    """{"filter": fn, "smoother": fn} for one implementation (jit-compiled by the caller)."""
    if impl.startswith("ours"):
        parallel = impl == "ours_par"
        return {
            "filter": lambda p, A, ll: tuple(ops_hmm.hmm_filter(p, A, ll, parallel=parallel)),
            "smoother": lambda p, A, ll: ops_hmm.hmm_smoother(p, A, ll, parallel=parallel)[::2],
            "log_normalizer_grad": _gradient(lambda p, A, ll: ops_hmm.hmm_filter(p, A, ll, parallel=parallel)[0]),
        }
    if impl == "dynamax_seq":
        from dynamax.hidden_markov_model import inference as dx
    else:
        from dynamax.hidden_markov_model import parallel_inference as dx

    def filter_(p, A, ll):
        post = dx.hmm_filter(p, A, ll)
        return post.marginal_loglik, post.filtered_probs, post.predicted_probs

    def smoother(p, A, ll):
        post = dx.hmm_smoother(p, A, ll)
        return post.marginal_loglik, post.smoothed_probs

    return {"filter": filter_, "smoother": smoother,
            "log_normalizer_grad": _gradient(lambda p, A, ll: dx.hmm_filter(p, A, ll).marginal_loglik)}


def _gradient(log_normalizer: Callable) -> Callable:
    """``(p, A, ll) -> (d/dA, d/dll)`` of ``log_normalizer(p, A, ll)``."""
    return lambda p, A, ll: jax.grad(lambda A, ll: log_normalizer(p, A, ll), argnums=(0, 1))(A, ll)
