"""Message passing for discrete hidden Markov models: forward filter, forward-backward smoother,
Viterbi decoding and forward-filter backward-sampling (FFBS), sequential (``lax.scan``) and
parallel-in-time (associative scans, O(log T) depth; the forward and backward passes use
:func:`ppl_switch.ops.scan.seeded_prefix_scan`, which does about half the matrix-matrix work of
``lax.associative_scan`` because their prefixes start from a vector).

Conventions (one trial; batch trials with ``jax.vmap``, never inside these functions):

* ``initial_probs``: (K,) p(z_0 = k).
* ``transition_matrix``: (K, K) with ``[i, j] = p(z_{t+1} = j | z_t = i)`` (rows sum to one), or
  time-varying (T-1, K, K) where ``[t]`` maps z_t -> z_{t+1}.
* ``log_likelihoods``: (T, K) emission log-likelihoods ``log p(y_t | z_t = k)``.
* ``mask``: optional (T,) bool; False marks a step without an observation. Its log-likelihood row is
  ignored (treated as 0), so padded and unpadded ragged trials give the same log normaliser.

Numerics. The recursions run in probability space on per-step max-shifted likelihoods
``exp(ll_t - max_k ll_t)`` (computed once, outside the scan) and renormalise every step; the log
normaliser is accumulated exactly as ``sum_t log c_t + max_k ll_t``. The scan body is then a
K-vector product, a K x K matrix-vector product and one division -- no logs or exps. Zeros in the
transition matrix are fine (values and gradients stay finite). The one regime this cannot represent is
a step where every state the chain can reach has a likelihood below ``exp(-87)`` (float32) or
``exp(-708)`` (float64) relative to the best state; that step then underflows and the log normaliser
is -inf (filtered and smoothed probabilities are 0 there, and the gradient is NaN).

Everything is jit-able and vmap-able; the public functions are jitted themselves (``parallel`` and
``num_samples`` are static), so eager calls compile once per input shape instead of op by op. Shapes are
checked at trace time with ValueErrors naming the argument.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ppl_switch.ops.scan import seeded_prefix_scan

Array = jax.Array

#: loop unrolling of the sequential scans (fewer loop iterations amortise XLA's per-step overhead)
_SCAN_UNROLL = 1

#: up to this many states, a sequential step's vector-matrix product runs as a broadcast multiply and a sum,
#: above it as a dot: on XLA's CPU backend the dot's call overhead dominates for small K (K = 25, T = 1e4 filter:
#: 1.33 against 1.61 ms on jax 0.12.1, 2.1 against 2.5 ms on 0.9.2) and the dot wins for large K (K = 100:
#: 7.5 against 17.6 ms); benchmarks/results.md, "HMM sequential step form"
_BROADCAST_PRODUCT_MAX_K = 32

#: the sequential filter emits p(z_t | y_{0:t-1}) from its scan on jax >= 0.12, and recomputes them afterwards
#: with one batched product on older jax: XLA's CPU backend changed which is faster (K = 25, T = 1e4 filter:
#: 1.6 against 2.3 ms on jax 0.12.1; 5.7-6.4 against 2.9 ms on 0.9.2, 0.10.2 and 0.11.2); benchmarks/results.md,
#: "HMM sequential step form". Same values either way (a product of the same numbers).
_PREDICTED_FROM_SCAN = tuple(jax.__version_info__[:2]) >= (0, 12)


def _row_times_matrix(v: Array, A: Array) -> Array:
    """v @ A for one step: (K,) x (K, K) -> (K,)."""
    if A.shape[-1] <= _BROADCAST_PRODUCT_MAX_K:
        return (v[:, None] * A).sum(0)
    return v @ A


class HMMFilterResult(NamedTuple):
    """Result of :func:`hmm_filter`.

    Attributes:
        log_normalizer: () log p(y_{0:T-1}).
        filtered_probs: (T, K) p(z_t | y_{0:t}).
        predicted_probs: (T, K) p(z_t | y_{0:t-1}) (row 0 is ``initial_probs``).
    """

    log_normalizer: Array
    filtered_probs: Array
    predicted_probs: Array


class HMMSmootherResult(NamedTuple):
    """Result of :func:`hmm_smoother`.

    Attributes:
        log_normalizer: () log p(y_{0:T-1}).
        filtered_probs: (T, K) p(z_t | y_{0:t}).
        smoothed_probs: (T, K) p(z_t | y_{0:T-1}).
        pairwise_probs: (T-1, K, K) with ``[t, i, j] = p(z_t = i, z_{t+1} = j | y)``; summing over t
            gives the expected transition counts.
    """

    log_normalizer: Array
    filtered_probs: Array
    smoothed_probs: Array
    pairwise_probs: Array


class HMMPosteriorStats(NamedTuple):
    """Result of :func:`hmm_posterior_stats`: what an EM needs, without the (T-1, K, K) pairwise marginals.

    Attributes:
        log_normalizer: () log p(y_{0:T-1}).
        smoothed_probs: (T, K) p(z_t | y_{0:T-1}).
        transition_counts: (K, K) ``sum_t w_t p(z_t = i, z_{t+1} = j | y)`` (expected transition counts,
            each pair t -> t+1 weighted by ``pair_weights[t]``).
    """

    log_normalizer: Array
    smoothed_probs: Array
    transition_counts: Array


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    initial: Array  # (K,)
    transition: Array  # (K, K) or (T-1, K, K)
    log_likelihoods: Array  # (T, K), masked steps set to 0
    time_varying: bool


def _check_inputs(
    initial,
    transition,
    log_likelihoods,
    mask,
    initial_name: str = "initial_probs",
    transition_name: str = "transition_matrix",
) -> _Inputs:
    """Validate shapes (trace time) and apply the mask."""
    initial = jnp.asarray(initial)
    transition = jnp.asarray(transition)
    log_likelihoods = jnp.asarray(log_likelihoods)
    if log_likelihoods.ndim != 2:
        raise ValueError(
            f"log_likelihoods must have shape (T, K) for one trial, got shape {log_likelihoods.shape}; "
            "batch trials with jax.vmap"
        )
    T, K = log_likelihoods.shape
    if T < 1 or K < 1:
        raise ValueError(f"log_likelihoods must have T >= 1 steps and K >= 1 states, got shape {(T, K)}")
    if initial.shape != (K,):
        raise ValueError(
            f"{initial_name} must have shape (K,) = ({K},) to match log_likelihoods (T, K) = {(T, K)}, "
            f"got shape {initial.shape}"
        )
    if transition.shape == (K, K):
        time_varying = False
    elif transition.shape == (T - 1, K, K):
        time_varying = True
    else:
        raise ValueError(
            f"{transition_name} must have shape (K, K) = {(K, K)} or time-varying (T-1, K, K) = "
            f"{(T - 1, K, K)} to match log_likelihoods (T, K) = {(T, K)}, got shape {transition.shape}"
        )
    for name, x in ((initial_name, initial), (transition_name, transition), ("log_likelihoods", log_likelihoods)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    dtype = jnp.result_type(initial.dtype, transition.dtype, log_likelihoods.dtype)
    initial, transition, log_likelihoods = (x.astype(dtype) for x in (initial, transition, log_likelihoods))
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (T,):
            raise ValueError(f"mask must have shape (T,) = ({T},) to match log_likelihoods, got shape {mask.shape}")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be a boolean array (True = observed), got dtype {mask.dtype}")
        log_likelihoods = jnp.where(mask[:, None], log_likelihoods, 0.0)
    return _Inputs(initial, transition, log_likelihoods, time_varying)


def _shifted_likelihoods(log_likelihoods: Array) -> tuple[Array, Array]:
    """(T, K) likelihoods scaled so each step's largest is 1, and the (T,) log shifts.

    The shift cancels in every quantity we return, so it is held constant under differentiation.
    """
    shift = lax.stop_gradient(jnp.max(log_likelihoods, axis=-1))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    return jnp.exp(log_likelihoods - shift[:, None]), shift


def _safe_divide(x: Array, total: Array) -> Array:
    """x / total, giving 0 where total == 0 (an impossible step) instead of NaN."""
    return x / jnp.where(total > 0, total, 1.0)


def _normalise_step(x: Array, total: Array) -> Array:
    """x / total inside a scan body, 0 where total == 0 (x is then all zeros: 0/0 -> 0).

    Same values as :func:`_safe_divide`, but XLA's CPU backend keeps a plain division fused with the
    reduction that produced ``total``, whereas guarding the divisor (where/maximum) adds a scalar
    kernel per step and doubles the time of the sequential recursions (measured 28 vs 55 ms, K = 25,
    T = 1e5). The gradient at an impossible step (log normaliser -inf) is NaN; elsewhere it is exact.
    """
    return jnp.nan_to_num(x / total, nan=0.0)


def _transition_steps(inputs: _Inputs) -> Array:
    """(T-1, K, K) transition matrices, broadcasting a static one."""
    T, K = inputs.log_likelihoods.shape
    if inputs.time_varying:
        return inputs.transition
    return jnp.broadcast_to(inputs.transition, (T - 1, K, K))


# ----------------------------------------------------------------------------------------------
# sequential recursions
# ----------------------------------------------------------------------------------------------


def _forward_sequential(inputs: _Inputs, lik: Array, emit_predicted: bool = False):
    """Forward pass; returns filtered (T, K) and the per-step normalisers c (T,) (and with
    ``emit_predicted`` the predicted probabilities (T, K) too).

    The step divides plainly (no guard for c = 0): with the guard (``nan_to_num`` in the loop) and the older
    layout the jax 0.12.1 filter took 1.61 ms against 1.28 ms now (K = 25, T = 1e4; benchmarks/results.md, session
    of 2026-12-07 (sixth)). An impossible step (c = 0) then gives 0/0 = NaN, which the next steps carry on;
    afterwards :func:`_zero_after_impossible_step` turns those NaNs into the zeros the recursion means there.

    Two loop layouts, by which one XLA runs faster (``_PREDICTED_FROM_SCAN``): on jax >= 0.12 the loop carries
    the predicted vector from step 0 and emits it; on older jax it carries the filtered vector from step 1,
    emits only what the recursion needs, and :func:`hmm_filter` recomputes the predicted vectors after the loop
    (emitting them cost ~2x there).
    """
    A = inputs.transition
    if emit_predicted and not inputs.time_varying:

        def predict_step(predicted, lik_t):
            alpha = predicted * lik_t
            c = alpha.sum()
            filtered = alpha / c
            return _row_times_matrix(filtered, A), (filtered, c, predicted)

        _, (filtered, c, predicted) = lax.scan(predict_step, inputs.initial, lik, unroll=_SCAN_UNROLL)
        c, filtered, predicted = _zero_after_impossible_step(c, filtered, predicted)
        return filtered, c, predicted

    def step(filtered_prev, xs):
        lik_t, A_prev = xs if inputs.time_varying else (xs, A)
        predicted = _row_times_matrix(filtered_prev, A_prev)
        alpha = predicted * lik_t
        c = alpha.sum()
        filtered = alpha / c
        return filtered, ((filtered, c, predicted) if emit_predicted else (filtered, c))

    alpha0 = inputs.initial * lik[0]
    c0 = alpha0.sum()
    filtered0 = _safe_divide(alpha0, c0)
    xs = (lik[1:], A) if inputs.time_varying else lik[1:]
    _, out = lax.scan(step, filtered0, xs, unroll=_SCAN_UNROLL)
    filtered, c = jnp.concatenate([filtered0[None], out[0]]), jnp.concatenate([c0[None], out[1]])
    if emit_predicted:
        c, filtered, predicted = _zero_after_impossible_step(c, filtered, jnp.concatenate([inputs.initial[None], out[2]]))
        return filtered, c, predicted
    c, filtered = _zero_after_impossible_step(c, filtered)
    return filtered, c


def _zero_after_impossible_step(c: Array, *per_step: Array):
    """``(c, *per_step)`` with the NaNs from and after the first impossible step (c_t = 0, every reachable state
    ruled out) set to 0: there the recursion's messages are 0 (the log normaliser is then -inf). NaNs before
    it (a NaN likelihood) are kept. ``c`` (T,), each of ``per_step`` (T, K)."""
    after = jnp.cumsum(c == 0) > 0
    return (jnp.where(after & jnp.isnan(c), 0.0, c),) + tuple(
        jnp.where(after[:, None] & jnp.isnan(x), 0.0, x) for x in per_step)


def _predicted(inputs: _Inputs, filtered: Array) -> Array:
    """(T, K) p(z_t | y_{0:t-1}) from the filtered probabilities."""
    if inputs.time_varying:
        rest = jnp.einsum("ti,tij->tj", filtered[:-1], inputs.transition)
    else:
        rest = filtered[:-1] @ inputs.transition
    return jnp.concatenate([inputs.initial[None], rest])


def _backward_sequential(inputs: _Inputs, lik: Array) -> tuple[Array, Array]:
    """Backward messages beta_t ∝ p(y_{t+1:T-1} | z_t), each normalised to sum 1, (T, K), and the
    (T-1,) sums s_t of A_t @ (lik_{t+1} * beta_{t+1}) they were divided by.

    Normalising (rather than dividing by the forward c_{t+1}) keeps beta bounded in float32 even when
    a filtered probability is tiny.
    """
    A = inputs.transition
    K = lik.shape[1]

    def step(beta_next, xs):
        lik_next, A_t = xs if inputs.time_varying else (xs, A)
        b = A_t @ (lik_next * beta_next)
        s = b.sum()
        b = _normalise_step(b, s)
        return b, (b, s)

    beta_last = jnp.full((K,), 1.0 / K, dtype=lik.dtype)
    xs = (lik[1:], A) if inputs.time_varying else lik[1:]
    _, (betas, sums) = lax.scan(step, beta_last, xs, reverse=True, unroll=_SCAN_UNROLL)
    return jnp.concatenate([betas, beta_last[None]]), sums


# ----------------------------------------------------------------------------------------------
# parallel (associative-scan) recursions
# ----------------------------------------------------------------------------------------------
# An element is a K x K non-negative matrix stored as (M, log_scale) with rows of M summing to one
# (or zero) and true matrix diag(exp(log_scale)) @ M. Per-row scales keep rows of very different
# magnitude representable. Element 0 has every row equal to initial * lik_0; element t >= 1 is
# A_{t-1}[i, j] * lik_t[j]. Prefix products give the (unnormalised) forward messages in every row;
# suffix products give the backward messages as their row sums.


def _finite_max(x: Array, axis=-1) -> Array:
    """max over ``axis`` (kept), 0 where that max is not finite (an all -inf row): a shift that never
    turns 0 into NaN."""
    top = jnp.max(x, axis=axis, keepdims=True)
    return jnp.where(jnp.isfinite(top), top, 0.0)


def _normalise_rows(M: Array, log_scale: Array) -> tuple[Array, Array]:
    r = M.sum(-1)
    ok = r > 0
    r_safe = jnp.where(ok, r, 1.0)
    return M / r_safe[..., None], log_scale + jnp.where(ok, jnp.log(r_safe), -jnp.inf)


def _sum_product_combine(earlier, later):
    M1, l1 = earlier
    M2, l2 = later
    top = _finite_max(l2)
    weights = jnp.exp(l2 - top)
    M = M1 @ (weights[..., :, None] * M2)
    return _normalise_rows(M, l1 + top)


def _sum_product_elements(inputs: _Inputs, lik: Array, shift: Array):
    T, K = lik.shape
    first = jnp.broadcast_to(inputs.initial * lik[0], (1, K, K))
    rest = _transition_steps(inputs) * lik[1:, None, :]
    M = jnp.concatenate([first, rest])
    return _normalise_rows(M, jnp.broadcast_to(shift[:, None], (T, K)))


def _apply_to_row(prefix, element):
    """Row-vector prefix (v (B, K) summing to one, log scale (B,)) times an element (M (B, K, K), per-row
    log scales (B, K)): the forward message one element later, renormalised."""
    v, lv = prefix
    M, lM = element
    top = _finite_max(lM)
    return _normalise_rows(jnp.einsum("bi,bij->bj", v * jnp.exp(lM - top), M), lv + top[:, 0])


def _apply_to_column(prefix, element):
    """An element (M, per-row log scales) times a column-vector prefix (v summing to one, log scale):
    the backward message one element earlier, renormalised."""
    v, lv = prefix
    M, lM = element
    log_out = lM + jnp.log(jnp.einsum("bij,bj->bi", M, v))
    top = _finite_max(log_out)
    return _normalise_rows(jnp.exp(log_out - top), lv + top[:, 0])


def _forward_parallel(inputs: _Inputs, lik: Array, shift: Array) -> tuple[Array, Array]:
    """Returns filtered (T, K) and the log normaliser (): the initial message (row 0 of element 0) scanned
    over elements 1..T-1 with :func:`seeded_prefix_scan` (vector-matrix products where it can)."""
    M, log_scale = _sum_product_elements(inputs, lik, shift)
    filtered, log_norms = seeded_prefix_scan(_sum_product_combine, _apply_to_row, (M[0, 0], log_scale[0, 0]),
                                             (M[1:], log_scale[1:]))
    return jnp.concatenate([M[:1, 0], filtered]), jnp.concatenate([log_scale[:1, 0], log_norms])[-1]


def _backward_parallel(inputs: _Inputs, lik: Array, shift: Array) -> tuple[Array, Array]:
    """Backward messages (T, K) from suffix products of the elements applied to the all-ones message,
    normalised to sum 1, and the (T-1,) sums s_t of A_t @ (lik_{t+1} * beta_{t+1}) (same contract as the
    sequential pass)."""
    T, K = lik.shape
    M, log_scale = _sum_product_elements(inputs, lik, shift)
    beta_last = jnp.full((K,), 1.0 / K, lik.dtype)
    # elements T-1, T-2, ..., 1; composing a later element with an earlier one is earlier @ later
    suffix, _ = seeded_prefix_scan(lambda later, earlier: _sum_product_combine(earlier, later), _apply_to_column,
                                   (beta_last, jnp.zeros((), lik.dtype)), (M[:0:-1], log_scale[:0:-1]))
    betas = jnp.concatenate([suffix[::-1], beta_last[None]])  # suffix[::-1][t] is beta_t
    sums = jnp.einsum("tij,tj->t", _transition_steps(inputs), lik[1:] * betas[1:])
    return betas, sums


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("parallel",))
def hmm_filter(
    initial_probs: Array,
    transition_matrix: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    parallel: bool = False,
) -> HMMFilterResult:
    """Forward filter: log p(y), p(z_t | y_{0:t}) and p(z_t | y_{0:t-1}).

    Args:
        initial_probs: (K,) initial state distribution.
        transition_matrix: (K, K) or time-varying (T-1, K, K); ``[.., i, j] = p(z_{t+1}=j | z_t=i)``.
        log_likelihoods: (T, K) emission log-likelihoods per step and state.
        mask: optional (T,) bool, False = step carries no observation (its likelihood is ignored).
        parallel: use a parallel prefix scan (O(log T) depth, O(T K^3) work) instead of ``lax.scan``
            (O(T K^2) work). Pays off on accelerators for long T.

    Returns:
        :class:`HMMFilterResult` (log_normalizer (), filtered_probs (T, K), predicted_probs (T, K)).
    """
    inputs = _check_inputs(initial_probs, transition_matrix, log_likelihoods, mask)
    lik, shift = _shifted_likelihoods(inputs.log_likelihoods)
    if _PREDICTED_FROM_SCAN and not parallel:
        filtered, c, predicted = _forward_sequential(inputs, lik, emit_predicted=True)
        return HMMFilterResult(_log_normalizer(c, shift), filtered, predicted)
    filtered, log_normalizer = _forward(inputs, lik, shift, parallel)
    return HMMFilterResult(log_normalizer, filtered, _predicted(inputs, filtered))


@partial(jax.jit, static_argnames=("parallel",))
def hmm_log_normalizer_from_logits(
    initial_logits: Array,
    transition_logits: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    parallel: bool = False,
) -> Array:
    """log p(y) for an HMM parameterised by unnormalised logits -- the entry point for models.

    ``initial_logits`` (K,) and ``transition_logits`` (K, K) or (T-1, K, K) are normalised with a
    (max-shifted) softmax over the last axis, so any real logits are valid and ``-inf`` encodes a
    structural zero. The gradient with respect to the logits is the usual "expected counts minus
    expected probabilities" and stays finite, also where probabilities underflow to 0 (the filter
    never takes the log of a probability). Other arguments as in :func:`hmm_filter`.

    Returns:
        () log normaliser.
    """
    inputs = _check_inputs(
        initial_logits, transition_logits, log_likelihoods, mask, "initial_logits", "transition_logits"
    )
    initial_probs = jax.nn.softmax(inputs.initial)
    transition_matrix = jax.nn.softmax(inputs.transition, axis=-1)
    return hmm_filter(initial_probs, transition_matrix, inputs.log_likelihoods, None, parallel).log_normalizer


def _forward(inputs: _Inputs, lik: Array, shift: Array, parallel: bool) -> tuple[Array, Array]:
    """Filtered probabilities (T, K) and the log normaliser ()."""
    if parallel:
        return _forward_parallel(inputs, lik, shift)
    filtered, c = _forward_sequential(inputs, lik)
    return filtered, _log_normalizer(c, shift)


def _log_normalizer(c: Array, shift: Array) -> Array:
    """log p(y) from the sequential pass's per-step normalisers c (T,) and the likelihoods' log shifts (T,)."""
    return jnp.sum(jnp.log(c)) + jnp.sum(shift)


def _smoothed_and_pair_factors(filtered: Array, betas: Array, sums: Array):
    """Smoothed marginals (T, K) and the (T-1, K) row factor of the pairwise marginals.

    smoothed_t ∝ filtered_t * beta_t with normaliser d_t = filtered_t . beta_t, and
    p(z_t=i, z_{t+1}=j | y) = row_t[i] A_t[i, j] (lik_{t+1} beta_{t+1})[j]: its total is
    filtered_t . (s_t beta_t) = s_t d_t, so row_t = filtered_t / (s_t d_t)."""
    weighted = filtered * betas
    d = weighted.sum(-1)
    smoothed = _safe_divide(weighted, d[:, None])
    row = _safe_divide(filtered[:-1], (sums * d[:-1])[:, None])
    return smoothed, row


def _smoothed_and_pairwise(inputs: _Inputs, lik: Array, filtered: Array, betas: Array, sums: Array):
    smoothed, row = _smoothed_and_pair_factors(filtered, betas, sums)
    # the (T-1, K, K) array is one fused product, no reduction
    pairwise = row[:, :, None] * _transition_steps(inputs) * (lik[1:] * betas[1:])[:, None, :]
    return smoothed, pairwise


@partial(jax.jit, static_argnames=("parallel",))
def hmm_smoother(
    initial_probs: Array,
    transition_matrix: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    parallel: bool = False,
) -> HMMSmootherResult:
    """Forward-backward smoother: posterior marginals p(z_t | y) and pairwise p(z_t, z_{t+1} | y).

    Arguments as in :func:`hmm_filter`; ``parallel=True`` runs both passes as parallel prefix scans.

    Returns:
        :class:`HMMSmootherResult` (log_normalizer, filtered_probs, smoothed_probs (T, K),
        pairwise_probs (T-1, K, K)).
    """
    inputs = _check_inputs(initial_probs, transition_matrix, log_likelihoods, mask)
    lik, filtered, log_normalizer, betas, sums = _forward_backward(inputs, parallel)
    smoothed, pairwise = _smoothed_and_pairwise(inputs, lik, filtered, betas, sums)
    return HMMSmootherResult(log_normalizer, filtered, smoothed, pairwise)


def _forward_backward(inputs: _Inputs, parallel: bool):
    """Both passes: scaled likelihoods (T, K), filtered (T, K), log normaliser (), normalised backward
    messages (T, K) and their (T-1,) sums."""
    lik, shift = _shifted_likelihoods(inputs.log_likelihoods)
    filtered, log_normalizer = _forward(inputs, lik, shift, parallel)
    betas, sums = _backward_parallel(inputs, lik, shift) if parallel else _backward_sequential(inputs, lik)
    return lik, filtered, log_normalizer, betas, sums


@partial(jax.jit, static_argnames=("parallel",))
def hmm_posterior_stats(
    initial_probs: Array,
    transition_matrix: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    pair_weights: Optional[Array] = None,
    parallel: bool = False,
) -> HMMPosteriorStats:
    """Forward-backward to the expected sufficient statistics of an EM: log p(y), p(z_t | y) and the
    expected transition counts, in O(T K + K^2) memory beyond the inputs.

    :func:`hmm_smoother` returns the (T-1, K, K) pairwise marginals; an M-step needs only their weighted
    sum over t. With a static transition matrix A that sum is ``A * (R' B)`` with R (T-1, K) the pairwise
    row factors times the weights and B (T-1, K) = lik_{t+1} * beta_{t+1}: one (K, T-1) x (T-1, K)
    product, so long series never hold T K^2 numbers (an HMM EM at T = 1e6, K = 50 would need 10 GB in
    float32 for them). A time-varying (T-1, K, K) transition already is that size; it is summed directly.

    Args:
        initial_probs, transition_matrix, log_likelihoods, mask, parallel: as in :func:`hmm_smoother`.
        pair_weights: optional (T-1,) weight of each pair t -> t+1 (e.g. 0 past a trial's end); default 1.

    Returns:
        :class:`HMMPosteriorStats` (log_normalizer (), smoothed_probs (T, K), transition_counts (K, K)).
    """
    inputs = _check_inputs(initial_probs, transition_matrix, log_likelihoods, mask)
    lik, filtered, log_normalizer, betas, sums = _forward_backward(inputs, parallel)
    smoothed, row = _smoothed_and_pair_factors(filtered, betas, sums)
    if pair_weights is not None:
        row = row * jnp.asarray(pair_weights, row.dtype)[:, None]
    later = lik[1:] * betas[1:]
    if inputs.time_varying:
        counts = jnp.einsum("ti,tij,tj->ij", row, inputs.transition, later)
    else:
        counts = inputs.transition * (row.T @ later)
    return HMMPosteriorStats(log_normalizer, smoothed, counts)


# ----------------------------------------------------------------------------------------------
# Viterbi
# ----------------------------------------------------------------------------------------------


def _max_product_combine(earlier, later):
    """Max-plus matrix product of (..., K, K) log matrices, looping over the inner index so the
    memory stays O(K^2) per element instead of O(K^3)."""
    K = earlier.shape[-1]

    def body(k, best):
        return jnp.maximum(best, earlier[..., :, k, None] + later[..., k, None, :])

    init = jnp.full(jnp.broadcast_shapes(earlier.shape, later.shape), -jnp.inf, earlier.dtype)
    return lax.fori_loop(0, K, body, init)


@partial(jax.jit, static_argnames=("parallel",))
def hmm_viterbi(
    initial_probs: Array,
    transition_matrix: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    parallel: bool = False,
) -> Array:
    """Most probable state path argmax_z p(z | y) (max-product in log space).

    Arguments as in :func:`hmm_filter`. ``parallel=True`` computes forward and backward max-marginals
    with max-plus parallel prefix scans and takes their per-step argmax; this equals the MAP path when it
    is unique (ties have probability zero for continuous likelihoods).

    Returns:
        (T,) int32 state path.
    """
    inputs = _check_inputs(initial_probs, transition_matrix, log_likelihoods, mask)
    ll = inputs.log_likelihoods
    T, K = ll.shape
    log_initial = jnp.log(inputs.initial)
    log_transition = jnp.log(inputs.transition)
    if parallel:
        return _viterbi_parallel(log_initial, log_transition, ll, inputs.time_varying)

    def forward(score_prev, xs):
        ll_t, logA = xs if inputs.time_varying else (xs, log_transition)
        candidates = score_prev[:, None] + logA
        best_prev = jnp.argmax(candidates, axis=0).astype(jnp.int32)
        score = jnp.max(candidates, axis=0) + ll_t
        return score - jnp.max(score), best_prev  # rescale: keeps float32 scores O(1)

    xs = (ll[1:], log_transition) if inputs.time_varying else ll[1:]
    final_score, backpointers = lax.scan(forward, log_initial + ll[0], xs)
    last = jnp.argmax(final_score).astype(jnp.int32)

    def backward(z_next, pointers_t):
        z = pointers_t[z_next]
        return z, z

    _, path = lax.scan(backward, last, backpointers, reverse=True)
    return jnp.concatenate([path, last[None]])


def _viterbi_parallel(log_initial, log_transition, ll, time_varying):
    T, K = ll.shape
    log_steps = log_transition if time_varying else jnp.broadcast_to(log_transition, (T - 1, K, K))
    first = jnp.broadcast_to(log_initial + ll[0], (1, K, K))
    elements = jnp.concatenate([first, log_steps + ll[1:, None, :]])

    def rescale(x):  # keeps float32 partial scores O(1); a constant shift does not change argmaxes
        return x - _finite_max(x, axis=(-2, -1))

    def forward_apply(score, element):  # max over z_{t-1} of score + element, per z_t
        best = jnp.max(score[:, :, None] + element, axis=1)
        return best - _finite_max(best)

    def backward_apply(score, element):  # max over z_t of element + score, per z_{t-1}
        best = jnp.max(element + score[:, None, :], axis=2)
        return best - _finite_max(best)

    # max over z_{0:t-1} of the log joint with z_t = j, and over z_{t+1:} given z_t = i (each up to a shift)
    forward_rest = seeded_prefix_scan(lambda a, b: rescale(_max_product_combine(a, b)), forward_apply,
                                      elements[0, 0], elements[1:])
    backward_rest = seeded_prefix_scan(lambda later, earlier: rescale(_max_product_combine(earlier, later)),
                                       backward_apply, jnp.zeros((K,), ll.dtype), elements[:0:-1])
    forward_scores = jnp.concatenate([elements[:1, 0], forward_rest])
    backward_scores = jnp.concatenate([backward_rest[::-1], jnp.zeros((1, K), ll.dtype)])
    return jnp.argmax(forward_scores + backward_scores, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# forward-filter backward-sample
# ----------------------------------------------------------------------------------------------


def _inverse_cdf(weights: Array, u: Array, axis: int = -1) -> Array:
    """Index drawn with probability ∝ weights (along ``axis``), from uniforms u in [0, 1)."""
    cdf = jnp.cumsum(weights, axis=axis)
    total = jnp.take(cdf, -1, axis=axis)
    threshold = jnp.expand_dims(u * total, axis)
    index = jnp.sum(cdf <= threshold, axis=axis)  # "<=" skips leading zero-weight states
    return jnp.minimum(index, weights.shape[axis] - 1).astype(jnp.int32)


def _backward_sample(key, filtered, inputs: _Inputs, parallel: bool) -> Array:
    T, K = filtered.shape
    key_last, key_rest = jax.random.split(key)
    z_last = _inverse_cdf(filtered[-1], jax.random.uniform(key_last, dtype=filtered.dtype))
    if not parallel:
        u = jax.random.uniform(key_rest, (T - 1,), dtype=filtered.dtype)
        A = inputs.transition

        def step(z_next, xs):
            (filtered_t, u_t, A_t) = xs if inputs.time_varying else (*xs, A)
            z = _inverse_cdf(filtered_t * A_t[:, z_next], u_t)
            return z, z

        xs = (filtered[:-1], u, A) if inputs.time_varying else (filtered[:-1], u)
        _, path = lax.scan(step, z_last, xs, reverse=True)
        return jnp.concatenate([path, z_last[None]])
    # Parallel: draw, for every t and every value j of z_{t+1}, z_t ~ p(z_t | z_{t+1}=j, y_{0:t}).
    # These maps j -> z_t compose associatively; composing them from the end gives the path.
    u = jax.random.uniform(key_rest, (T - 1, K), dtype=filtered.dtype)
    weights = filtered[:-1, :, None] * _transition_steps(inputs)  # (T-1, i, j)
    maps = _inverse_cdf(weights, u, axis=1)  # (T-1, j) -> i
    maps = jnp.concatenate([maps, jnp.full((1, K), z_last, jnp.int32)])
    # F_t = E_t o F_{t+1}, i.e. F_t[x] = E_t[F_{t+1}[x]]; reverse scan calls fn(later, earlier)
    composed = lax.associative_scan(
        lambda later, earlier: jnp.take_along_axis(earlier, later, axis=-1), maps, reverse=True
    )
    return composed[:, 0]


@partial(jax.jit, static_argnames=("parallel", "num_samples"))
def hmm_sample(
    key: Array,
    initial_probs: Array,
    transition_matrix: Array,
    log_likelihoods: Array,
    mask: Optional[Array] = None,
    parallel: bool = False,
    num_samples: Optional[int] = None,
) -> Array:
    """Draw state paths from p(z | y) by forward filtering, backward sampling.

    Arguments as in :func:`hmm_filter`; ``parallel=True`` runs the filter and the backward sampling
    with associative scans. With ``num_samples=n`` the filter runs once and n paths are drawn
    (equivalently, ``jax.vmap(lambda k: hmm_sample(k, ...))(jax.random.split(key, n))``).

    Returns:
        (T,) int32 path, or (num_samples, T) paths.
    """
    inputs = _check_inputs(initial_probs, transition_matrix, log_likelihoods, mask)
    filtered = hmm_filter(inputs.initial, inputs.transition, inputs.log_likelihoods, None, parallel).filtered_probs
    if num_samples is None:
        return _backward_sample(key, filtered, inputs, parallel)
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: _backward_sample(k, filtered, inputs, parallel))(keys)


def stationary_distribution(transition_matrix: Array) -> Array:
    """(K,) stationary distribution pi of a (K, K) row-stochastic matrix: pi P = pi, sum(pi) = 1.

    Solves the linear system (I - P + 1 1')' pi = 1, which is non-singular exactly when the chain has
    a unique stationary distribution (one recurrent class); differentiable in ``transition_matrix``.
    Batches over leading axes.
    """
    P = jnp.asarray(transition_matrix)
    if P.ndim < 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"transition_matrix must have shape (..., K, K), got shape {P.shape}")
    K = P.shape[-1]
    system = jnp.eye(K, dtype=P.dtype) - P + 1.0
    ones = jnp.ones(P.shape[:-1], P.dtype)
    return jnp.linalg.solve(jnp.swapaxes(system, -1, -2), ones[..., None])[..., 0]


__all__ = [
    "HMMFilterResult",
    "HMMPosteriorStats",
    "HMMSmootherResult",
    "hmm_filter",
    "hmm_posterior_stats",
    "hmm_smoother",
    "hmm_viterbi",
    "hmm_sample",
    "hmm_log_normalizer_from_logits",
    "stationary_distribution",
]
