"""HMM message passing (ppl_switch.ops.hmm) against brute-force enumeration of all K^T paths."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.ops.hmm import (
    hmm_filter,
    hmm_log_normalizer_from_logits,
    hmm_posterior_stats,
    hmm_sample,
    hmm_smoother,
    hmm_viterbi,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

K, T = 3, 5


@pytest.fixture
def filter_layout(monkeypatch):
    """``set_layout(predicted_from_scan)``: the sequential filter's loop layout for this test. The public kernels
    are jitted, so their traces are dropped when the layout is set and after the test: a trace made under one
    layout would otherwise serve the other."""
    import ppl_switch.ops.hmm as ops_hmm

    def set_layout(predicted_from_scan):
        monkeypatch.setattr(ops_hmm, "_PREDICTED_FROM_SCAN", predicted_from_scan)
        jax.clear_caches()

    yield set_layout
    jax.clear_caches()


def random_hmm(seed, num_states=K, num_steps=T, time_varying=False, zeros=False):
    rng = np.random.default_rng(seed)
    initial = rng.dirichlet(np.ones(num_states))
    shape = (num_steps - 1, num_states, num_states) if time_varying else (num_states, num_states)
    transition = rng.dirichlet(np.ones(num_states), size=shape[:-1])
    if zeros:  # structural zeros: a left-to-right-ish chain, rows renormalised
        transition = transition * (rng.uniform(size=shape) > 0.4)
        transition[..., np.arange(num_states), np.arange(num_states)] += 0.1
        transition /= transition.sum(-1, keepdims=True)
        initial[0] = 0.0
        initial /= initial.sum()
    log_likelihoods = rng.normal(size=(num_steps, num_states)) * 2.0
    return initial, transition, log_likelihoods


def brute_force(initial, transition, log_likelihoods, mask=None):
    """Exact posterior over all K^T paths: (log Z, paths (K^T, T), path probabilities (K^T,))."""
    num_steps, num_states = log_likelihoods.shape
    ll = log_likelihoods if mask is None else np.where(np.asarray(mask)[:, None], log_likelihoods, 0.0)
    paths = np.array(list(itertools.product(range(num_states), repeat=num_steps)))
    with np.errstate(divide="ignore"):
        log_joint = np.log(initial[paths[:, 0]]) + ll[0, paths[:, 0]]
        for t in range(1, num_steps):
            A = transition[t - 1] if transition.ndim == 3 else transition
            log_joint = log_joint + np.log(A[paths[:, t - 1], paths[:, t]]) + ll[t, paths[:, t]]
    log_z = np.logaddexp.reduce(log_joint)
    return log_z, paths, np.exp(log_joint - log_z)


def marginals(paths, probs, num_states):
    num_steps = paths.shape[1]
    smoothed = np.stack([np.bincount(paths[:, t], weights=probs, minlength=num_states) for t in range(num_steps)])
    pairwise = np.zeros((num_steps - 1, num_states, num_states))
    for t in range(num_steps - 1):
        np.add.at(pairwise[t], (paths[:, t], paths[:, t + 1]), probs)
    return smoothed, pairwise


def brute_force_filtered(initial, transition, log_likelihoods):
    """p(z_t | y_{0:t}) by enumerating the prefix y_{0:t} for every t."""
    num_steps = log_likelihoods.shape[0]
    rows = []
    for t in range(num_steps):
        trans_t = transition[:t] if transition.ndim == 3 else transition
        _, paths, probs = brute_force(initial, trans_t, log_likelihoods[: t + 1])
        rows.append(np.bincount(paths[:, t], weights=probs, minlength=log_likelihoods.shape[1]))
    return np.stack(rows)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("zeros", [False, True])
def test_filter_and_smoother_match_brute_force(parallel, time_varying, zeros):
    initial, transition, ll = random_hmm(1, time_varying=time_varying, zeros=zeros)
    log_z, paths, probs = brute_force(initial, transition, ll)
    smoothed, pairwise = marginals(paths, probs, K)

    filt = hmm_filter(initial, transition, ll, parallel=parallel)
    np.testing.assert_allclose(filt.log_normalizer, log_z, rtol=1e-10)
    np.testing.assert_allclose(filt.filtered_probs, brute_force_filtered(initial, transition, ll), atol=1e-10)
    # predicted_t = filtered_{t-1} @ A_{t-1}
    A = transition if time_varying else np.broadcast_to(transition, (T - 1, K, K))
    expected_predicted = np.concatenate([initial[None], np.einsum("ti,tij->tj", filt.filtered_probs[:-1], A)])
    np.testing.assert_allclose(filt.predicted_probs, expected_predicted, atol=1e-12)

    smooth = hmm_smoother(initial, transition, ll, parallel=parallel)
    np.testing.assert_allclose(smooth.log_normalizer, log_z, rtol=1e-10)
    np.testing.assert_allclose(smooth.smoothed_probs, smoothed, atol=1e-10)
    np.testing.assert_allclose(smooth.pairwise_probs, pairwise, atol=1e-10)
    np.testing.assert_allclose(smooth.filtered_probs, filt.filtered_probs, atol=1e-10)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("time_varying", [False, True])
def test_posterior_stats_are_weighted_brute_force_transition_counts(parallel, time_varying):
    """The EM statistics without pairwise marginals: counts = sum_t w_t p(z_t, z_{t+1} | y) (weights that
    differ per pair, one of them 0), smoothed marginals and log Z, all from enumeration; a masked step too."""
    initial, transition, ll = random_hmm(4, zeros=True, time_varying=time_varying)
    mask = np.array([True, True, False, True, True])
    log_z, paths, probs = brute_force(initial, transition, ll, mask)
    smoothed, pairwise = marginals(paths, probs, K)
    weights = np.array([1.0, 0.0, 2.5, 0.5])
    stats = hmm_posterior_stats(initial, transition, ll, mask, weights, parallel=parallel)
    np.testing.assert_allclose(stats.log_normalizer, log_z, rtol=1e-10)
    np.testing.assert_allclose(stats.smoothed_probs, smoothed, atol=1e-10)
    np.testing.assert_allclose(stats.transition_counts, np.einsum("t,tij->ij", weights, pairwise), atol=1e-10)
    unweighted = hmm_posterior_stats(initial, transition, ll, mask, parallel=parallel)
    np.testing.assert_allclose(unweighted.transition_counts, pairwise.sum(0), atol=1e-10)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("time_varying", [False, True])
def test_viterbi_matches_brute_force(parallel, time_varying):
    for seed in range(4):
        initial, transition, ll = random_hmm(10 + seed, time_varying=time_varying, zeros=seed % 2 == 1)
        _, paths, probs = brute_force(initial, transition, ll)
        path = hmm_viterbi(initial, transition, ll, parallel=parallel)
        np.testing.assert_array_equal(path, paths[np.argmax(probs)])


@pytest.mark.parametrize("parallel", [False, True])
def test_ffbs_frequencies_match_exact_posterior(parallel):
    initial, transition, ll = random_hmm(3, time_varying=parallel)  # static for one, time-varying for the other
    _, paths, probs = brute_force(initial, transition, ll)
    samples = np.asarray(
        hmm_sample(jax.random.PRNGKey(0), initial, transition, ll, parallel=parallel, num_samples=20_000)
    )
    assert samples.shape == (20_000, T)
    codes = samples @ (K ** np.arange(T)[::-1])  # path -> its row in itertools.product order
    empirical = np.bincount(codes, minlength=K**T) / len(codes)
    total_variation = 0.5 * np.abs(empirical - probs).sum()
    assert total_variation < 0.05, total_variation


def test_sample_respects_structural_zeros():
    initial, transition, ll = random_hmm(4, zeros=True)
    for parallel in (False, True):
        samples = np.asarray(hmm_sample(jax.random.PRNGKey(1), initial, transition, ll, parallel=parallel, num_samples=2000))
        assert np.all(initial[samples[:, 0]] > 0)
        assert np.all(transition[samples[:, :-1], samples[:, 1:]] > 0)


def test_mask_equals_zero_log_likelihood_rows():
    initial, transition, ll = random_hmm(5)
    mask = np.array([True, False, True, True, False])
    deleted = np.where(mask[:, None], ll, 0.0)
    garbage = np.where(mask[:, None], ll, np.nan)  # masked rows may hold anything, NaN included
    log_z, paths, probs = brute_force(initial, transition, deleted)
    smoothed, _ = marginals(paths, probs, K)
    for parallel in (False, True):
        masked = hmm_smoother(initial, transition, garbage, mask=mask, parallel=parallel)
        np.testing.assert_allclose(masked.log_normalizer, log_z, rtol=1e-10)
        np.testing.assert_allclose(masked.smoothed_probs, smoothed, atol=1e-10)
        np.testing.assert_array_equal(
            hmm_viterbi(initial, transition, garbage, mask=mask, parallel=parallel),
            hmm_viterbi(initial, transition, deleted, parallel=parallel),
        )


def test_padding_a_trial_keeps_its_log_normalizer():
    initial, transition, ll = random_hmm(6)
    padded = np.concatenate([ll, np.full((4, K), np.nan)])
    mask = np.arange(T + 4) < T
    short = hmm_filter(initial, transition, ll).log_normalizer
    for parallel in (False, True):
        long = hmm_filter(initial, transition, padded, mask=mask, parallel=parallel).log_normalizer
        np.testing.assert_allclose(long, short, rtol=1e-12)
    # batched over trials with vmap: two trials, one padded
    lls = np.stack([padded, np.nan_to_num(padded)])
    masks = np.stack([mask, np.ones(T + 4, bool)])
    batched = jax.vmap(lambda l, m: hmm_filter(initial, transition, l, mask=m).log_normalizer)(lls, masks)
    np.testing.assert_allclose(batched[0], short, rtol=1e-12)
    np.testing.assert_allclose(
        batched[1], hmm_filter(initial, transition, np.nan_to_num(padded)).log_normalizer, rtol=1e-12
    )


@pytest.mark.parametrize("num_steps", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_parallel_equals_sequential_long_series(num_steps):
    rng = np.random.default_rng(7)
    num_states = 4
    initial = rng.dirichlet(np.ones(num_states))
    transition = 0.9 * np.eye(num_states) + 0.1 * rng.dirichlet(np.ones(num_states), size=num_states)
    ll = rng.normal(size=(num_steps, num_states)) * 3.0
    mask = rng.uniform(size=num_steps) > 0.1

    @jax.jit
    def both():
        seq = hmm_smoother(initial, transition, ll, mask=mask, parallel=False)
        par = hmm_smoother(initial, transition, ll, mask=mask, parallel=True)
        return seq, par

    seq, par = both()
    np.testing.assert_allclose(par.log_normalizer, seq.log_normalizer, rtol=1e-10)
    for name in ("filtered_probs", "smoothed_probs", "pairwise_probs"):
        np.testing.assert_allclose(getattr(par, name), getattr(seq, name), atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(hmm_viterbi(initial, transition, ll, mask=mask, parallel=True),
                                  hmm_viterbi(initial, transition, ll, mask=mask, parallel=False))


def test_float32_long_series_is_finite_and_consistent():
    rng = np.random.default_rng(8)
    num_states, num_steps = 5, 2000
    initial = jnp.asarray(rng.dirichlet(np.ones(num_states)), jnp.float32)
    transition = jnp.asarray(0.95 * np.eye(num_states) + 0.01, jnp.float32)
    transition = transition / transition.sum(-1, keepdims=True)
    ll = jnp.asarray(rng.normal(size=(num_steps, num_states)) * 20.0, jnp.float32)  # very informative
    seq = hmm_smoother(initial, transition, ll)
    par = hmm_smoother(initial, transition, ll, parallel=True)
    assert seq.log_normalizer.dtype == jnp.float32
    exact = hmm_filter(*(np.asarray(x, np.float64) for x in (initial, transition, ll))).log_normalizer
    for result in (seq, par):
        assert np.all(np.isfinite(result.smoothed_probs)) and np.isfinite(result.log_normalizer)
        np.testing.assert_allclose(result.log_normalizer, exact, rtol=1e-5)


def test_zero_transitions_give_finite_values_and_gradients():
    initial, transition, ll = random_hmm(9, num_steps=6, zeros=True)
    assert (transition == 0).any() and (initial == 0).any()

    def log_z(params, parallel):
        p, A, l = params
        return hmm_filter(p, A, l, parallel=parallel).log_normalizer

    for parallel in (False, True):
        value, grads = jax.value_and_grad(log_z)((initial, transition, ll), parallel)
        assert np.isfinite(value)
        for g in grads:
            assert np.all(np.isfinite(g))
        # d log Z / d ll_t = smoothed marginals (exactly, also through the max-shift)
        np.testing.assert_allclose(grads[2], hmm_smoother(initial, transition, ll).smoothed_probs, atol=1e-10)
    smooth = hmm_smoother(initial, transition, ll, parallel=True)
    assert all(np.all(np.isfinite(x)) for x in smooth)


def test_logits_entry_point_matches_and_has_stable_gradients():
    rng = np.random.default_rng(11)
    initial_logits = rng.normal(size=K)
    transition_logits = rng.normal(size=(K, K)) * 3.0
    transition_logits[0, 1] = -np.inf  # structural zero
    ll = rng.normal(size=(T, K))
    expected = hmm_filter(
        jax.nn.softmax(initial_logits), jax.nn.softmax(transition_logits, -1), ll
    ).log_normalizer
    log_z, _, _ = brute_force(np.asarray(jax.nn.softmax(initial_logits)), np.asarray(jax.nn.softmax(transition_logits, -1)), ll)
    for parallel in (False, True):
        value = hmm_log_normalizer_from_logits(initial_logits, transition_logits, ll, parallel=parallel)
        np.testing.assert_allclose(value, expected, rtol=1e-10)
        np.testing.assert_allclose(value, log_z, rtol=1e-10)
        grads = jax.grad(hmm_log_normalizer_from_logits, argnums=(0, 1, 2))(
            initial_logits, transition_logits, ll, None, parallel
        )
        assert all(np.all(np.isfinite(g)) for g in grads)
    # gradient w.r.t. initial logits = posterior of z_0 minus prior
    _, paths, probs = brute_force(np.asarray(jax.nn.softmax(initial_logits)), np.asarray(jax.nn.softmax(transition_logits, -1)), ll)
    posterior0 = np.bincount(paths[:, 0], weights=probs, minlength=K)
    grad0 = jax.grad(hmm_log_normalizer_from_logits)(initial_logits, transition_logits, ll)
    np.testing.assert_allclose(grad0, posterior0 - jax.nn.softmax(initial_logits), atol=1e-10)


@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("predicted_from_scan", [False, True])  # both loop layouts of the sequential filter
def test_impossible_step_gives_minus_inf_and_zero_marginals_not_nan(predicted_from_scan, time_varying, filter_layout):
    filter_layout(predicted_from_scan)
    # state 1 is unreachable from state 0 and step 1 rules out state 0: p(y) = 0 exactly
    initial = jnp.array([1.0, 0.0])
    transition = jnp.broadcast_to(jnp.eye(2), (3, 2, 2)) if time_varying else jnp.eye(2)
    ll = jnp.array([[0.0, 0.0], [-jnp.inf, 0.0], [0.0, 0.0], [0.0, -1.0]])
    for parallel in (False, True):
        filtered = hmm_filter(initial, transition, ll, parallel=parallel)
        smoothed = hmm_smoother(initial, transition, ll, parallel=parallel)
        assert filtered.log_normalizer == -np.inf and smoothed.log_normalizer == -np.inf
        np.testing.assert_array_equal(filtered.filtered_probs, [[1.0, 0.0]] + [[0.0, 0.0]] * 3)
        np.testing.assert_array_equal(filtered.predicted_probs, [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
        np.testing.assert_array_equal(smoothed.smoothed_probs, np.zeros((4, 2)))


def test_single_step_series():
    initial, transition, ll = random_hmm(12, num_steps=1)
    log_z, _, probs = brute_force(initial, transition, ll)
    for parallel in (False, True):
        result = hmm_smoother(initial, transition, ll, parallel=parallel)
        np.testing.assert_allclose(result.log_normalizer, log_z, rtol=1e-12)
        assert result.pairwise_probs.shape == (0, K, K)
        np.testing.assert_allclose(result.smoothed_probs[0], probs, atol=1e-12)
        assert hmm_viterbi(initial, transition, ll, parallel=parallel).shape == (1,)
        assert hmm_sample(jax.random.PRNGKey(0), initial, transition, ll, parallel=parallel).shape == (1,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(log_likelihoods=np.zeros((T, K, 1))), "log_likelihoods must have shape \\(T, K\\)"),
        (dict(initial_probs=np.ones(K + 1) / (K + 1)), "initial_probs must have shape \\(K,\\)"),
        (dict(transition_matrix=np.eye(K + 1)), "transition_matrix must have shape"),
        (dict(transition_matrix=np.ones((T, K, K)) / K), "transition_matrix must have shape"),
        (dict(mask=np.ones(T + 1, bool)), "mask must have shape \\(T,\\)"),
        (dict(mask=np.ones(T)), "mask must be a boolean"),
        (dict(log_likelihoods=np.zeros((T, K), int)), "log_likelihoods must be a floating-point"),
    ],
)
def test_input_validation(kwargs, match):
    initial, transition, ll = random_hmm(0)
    args = dict(initial_probs=initial, transition_matrix=transition, log_likelihoods=ll, mask=None)
    args.update(kwargs)
    for fn in (hmm_filter, hmm_smoother, hmm_viterbi):
        with pytest.raises(ValueError, match=match):
            fn(**args)
    with pytest.raises(ValueError, match=match):
        hmm_sample(jax.random.PRNGKey(0), **args)
    # errors are raised at trace time, also under jit
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda a: hmm_filter(**a))(args)


def test_logits_validation_names_the_logits():
    with pytest.raises(ValueError, match="transition_logits must have shape"):
        hmm_log_normalizer_from_logits(np.zeros(K), np.zeros((K, K + 1)), np.zeros((T, K)))
    with pytest.raises(ValueError, match="initial_logits must have shape"):
        hmm_log_normalizer_from_logits(np.zeros(K + 2), np.zeros((K, K)), np.zeros((T, K)))


def numpy_forward(initial, transition, log_likelihoods):
    """Oracle: the forward algorithm in float64 numpy, one step at a time (log p(y), filtered, predicted)."""
    predicted, filtered, log_z = [initial], [], 0.0
    for t, ll_t in enumerate(log_likelihoods):
        alpha = predicted[-1] * np.exp(ll_t - ll_t.max())
        log_z += np.log(alpha.sum()) + ll_t.max()
        filtered.append(alpha / alpha.sum())
        if t + 1 < len(log_likelihoods):
            predicted.append(filtered[-1] @ (transition[t] if transition.ndim == 3 else transition))
    return log_z, np.stack(filtered), np.stack(predicted)


@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("predicted_from_scan", [False, True])
@pytest.mark.parametrize("num_states", [3, 40])  # both step forms: broadcast (K <= 32) and dot
def test_sequential_filter_step_forms_match_a_numpy_forward_pass(num_states, predicted_from_scan, time_varying,
                                                                  filter_layout):
    filter_layout(predicted_from_scan)
    rng = np.random.default_rng(num_states)
    num_steps = 30
    transition = rng.random((num_steps - 1 if time_varying else 1, num_states, num_states)) + 3 * np.eye(num_states)
    transition /= transition.sum(-1, keepdims=True)
    transition = transition if time_varying else transition[0]
    initial = rng.dirichlet(np.ones(num_states))
    ll = 2 * rng.normal(size=(num_steps, num_states))
    log_z, filtered, predicted = numpy_forward(initial, transition, ll)
    out = hmm_filter(initial, transition, ll)
    np.testing.assert_allclose(out.log_normalizer, log_z, rtol=1e-12)
    np.testing.assert_allclose(out.filtered_probs, filtered, atol=1e-12)
    np.testing.assert_allclose(out.predicted_probs, predicted, atol=1e-12)


@pytest.mark.parametrize("predicted_from_scan", [False, True])
def test_a_nan_likelihood_gives_a_nan_log_normalizer_not_zeros(predicted_from_scan, filter_layout):
    # the impossible-step clean-up must not hide a NaN from a broken emission model as a probability of 0
    filter_layout(predicted_from_scan)
    initial, transition, ll = random_hmm(3)
    ll = jnp.asarray(ll).at[4, 1].set(jnp.nan)
    out = hmm_filter(initial, transition, ll)
    assert np.isnan(out.log_normalizer)
    np.testing.assert_array_equal(np.isnan(out.filtered_probs).any(1), np.arange(len(ll)) >= 4)
