"""MarginalHMM against the ops and against funsor enumeration of the same HMM in a NumPyro program."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.funsor import config_enumerate, enum, log_density as enum_log_density, markov
from numpyro.infer.util import log_density

from ppl_switch.distributions.hmm import MarginalHMM
from ppl_switch.ops.hmm import hmm_filter, hmm_smoother, hmm_viterbi

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

B, T, K = 2, 6, 3


def random_batch(seed, time_varying=False):
    rng = np.random.default_rng(seed)
    initial = rng.dirichlet(np.ones(K), size=B)
    shape = (B, T - 1, K) if time_varying else (B, K)
    transition = rng.dirichlet(np.ones(K), size=shape)
    ll = rng.normal(size=(B, T, K)) * 2.0
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False  # trial 1 is padded after 4 steps
    mask[0, 2] = False  # trial 0 misses one step
    return initial, transition, ll, mask


def enumerated_log_density(initial, transition, ll, mask):
    """log p(y) of one trial from a NumPyro program with an explicit, funsor-enumerated state chain."""

    @config_enumerate
    def program():
        z = None
        for t in markov(range(T)):
            probs = initial if t == 0 else (transition[t - 1] if transition.ndim == 3 else transition)[z]
            z = numpyro.sample(f"z_{t}", dist.Categorical(probs))
            with numpyro.handlers.mask(mask=bool(mask[t])):
                numpyro.factor(f"y_{t}", jnp.asarray(ll[t])[z])

    value, _ = enum_log_density(enum(program, first_available_dim=-1), (), {}, {})
    return value


@pytest.mark.parametrize("time_varying", [False, True])
def test_log_prob_matches_ops_and_funsor_enumeration(time_varying):
    initial, transition, ll, mask = random_batch(0, time_varying)
    hmm = MarginalHMM(initial, transition, ll, mask=mask)
    assert hmm.batch_shape == (B,) and hmm.event_shape == (T,)
    log_prob = hmm.log_prob(np.zeros((B, T)))
    assert log_prob.shape == (B,)
    for b in range(B):
        expected_ops = hmm_filter(initial[b], transition[b], ll[b], mask=mask[b]).log_normalizer
        expected_enum = enumerated_log_density(initial[b], transition[b], ll[b], mask[b])
        np.testing.assert_allclose(log_prob[b], expected_ops, rtol=1e-10)
        np.testing.assert_allclose(log_prob[b], expected_enum, rtol=1e-5)
    # the one-step predictive terms sum to the marginal, and are 0 where masked
    steps = hmm.step_log_likelihoods()
    assert steps.shape == (B, T)
    np.testing.assert_allclose(steps.sum(-1), log_prob, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(steps)[~mask], 0.0)


def test_logits_parameterisation_and_parallel():
    initial, transition, ll, mask = random_batch(1)
    reference = MarginalHMM(initial, transition, ll, mask=mask).log_prob_marginal()
    from_logits = MarginalHMM(
        initial_logits=np.log(initial) + 1.7, transition_logits=np.log(transition) - 0.3, log_likelihoods=ll, mask=mask
    )
    np.testing.assert_allclose(from_logits.log_prob_marginal(), reference, rtol=1e-10)
    parallel = MarginalHMM(initial, transition, ll, mask=mask, parallel=True)
    np.testing.assert_allclose(parallel.log_prob_marginal(), reference, rtol=1e-10)


def test_shared_parameters_broadcast_over_trials():
    initial, transition, ll, mask = random_batch(2)
    hmm = MarginalHMM(initial[0], transition[0], ll, mask=mask)  # one chain shared by both trials
    assert hmm.batch_shape == (B,)
    for b in range(B):
        np.testing.assert_allclose(
            hmm.log_prob_marginal()[b], hmm_filter(initial[0], transition[0], ll[b], mask=mask[b]).log_normalizer
        )
    # a shared time-varying chain needs time_varying=True (its leading dim is time, not trials)
    tv = np.random.default_rng(3).dirichlet(np.ones(K), size=(T - 1, K))
    hmm_tv = MarginalHMM(initial[0], tv, ll, time_varying=True)
    np.testing.assert_allclose(hmm_tv.log_prob_marginal()[1], hmm_filter(initial[0], tv, ll[1]).log_normalizer)


def test_inside_a_model_with_nuts_style_gradients():
    initial, transition, ll, mask = random_batch(4)
    y = np.random.default_rng(5).normal(size=(B, T))

    def model():
        logits = numpyro.sample("transition_logits", dist.Normal(0.0, 1.0).expand([K, K]).to_event(2))
        means = numpyro.sample("means", dist.Normal(0.0, 3.0).expand([K]).to_event(1))
        emission_ll = dist.Normal(means, 1.0).log_prob(y[..., None])  # (B, T, K)
        hmm = MarginalHMM(initial_logits=jnp.zeros(K), transition_logits=logits, log_likelihoods=emission_ll, mask=mask)
        with numpyro.plate("trials", B):
            numpyro.sample("y", hmm, obs=mask)  # placeholder observation of shape (B, T)

    params = {"transition_logits": jnp.asarray(np.log(transition[0])), "means": jnp.array([-1.0, 0.0, 2.0])}
    value, trace = log_density(model, (), {}, params)
    emission_ll = dist.Normal(params["means"], 1.0).log_prob(y[..., None])
    prior = dist.Normal(0.0, 1.0).log_prob(params["transition_logits"]).sum() + dist.Normal(0.0, 3.0).log_prob(
        params["means"]
    ).sum()
    marginal = sum(
        hmm_filter(np.ones(K) / K, transition[0], emission_ll[b], mask=mask[b]).log_normalizer for b in range(B)
    )
    np.testing.assert_allclose(value, prior + marginal, rtol=1e-10)
    grads = jax.grad(lambda p: log_density(model, (), {}, p)[0])(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    # d log p / d means equals the smoothed-posterior-weighted emission score (Fisher's identity)
    smoothed = np.stack(
        [hmm_smoother(np.ones(K) / K, transition[0], emission_ll[b], mask=mask[b]).smoothed_probs for b in range(B)]
    )
    score = (smoothed * mask[..., None] * (y[..., None] - np.asarray(params["means"]))).sum((0, 1))
    np.testing.assert_allclose(grads["means"], score - np.asarray(params["means"]) / 9.0, rtol=1e-8)


def test_decoding_helpers_match_ops():
    initial, transition, ll, mask = random_batch(6)
    hmm = MarginalHMM(initial, transition, ll, mask=mask)
    smooth = hmm.smoother()
    assert smooth.smoothed_probs.shape == (B, T, K) and smooth.pairwise_probs.shape == (B, T - 1, K, K)
    assert hmm.filter().filtered_probs.shape == (B, T, K)
    paths = hmm.viterbi()
    for b in range(B):
        expected = hmm_smoother(initial[b], transition[b], ll[b], mask=mask[b])
        np.testing.assert_allclose(smooth.smoothed_probs[b], expected.smoothed_probs, atol=1e-12)
        np.testing.assert_array_equal(paths[b], hmm_viterbi(initial[b], transition[b], ll[b], mask=mask[b]))
    draws = hmm.sample_states(jax.random.PRNGKey(0), num_samples=4000)
    assert draws.shape == (4000, B, T)
    # empirical marginals from FFBS match the smoother (4000 draws: standard error <= 0.008)
    empirical = np.stack([(np.asarray(draws) == k).mean(0) for k in range(K)], -1)
    np.testing.assert_allclose(empirical, smooth.smoothed_probs, atol=0.04)
    assert hmm.sample_states(jax.random.PRNGKey(1)).shape == (B, T)
    # different trials get different randomness
    single = MarginalHMM(initial[0], transition[0], np.stack([ll[0], ll[0]]))
    two = single.sample_states(jax.random.PRNGKey(2), num_samples=50)
    assert not np.array_equal(two[:, 0], two[:, 1])


def test_validation_errors():
    initial, transition, ll, mask = random_batch(7)
    with pytest.raises(ValueError, match="exactly one of initial_probs or initial_logits"):
        MarginalHMM(None, transition, ll)
    with pytest.raises(ValueError, match="transition_matrix must have shape"):
        MarginalHMM(initial, transition[..., :2], ll)
    with pytest.raises(ValueError, match="initial_probs must have shape"):
        MarginalHMM(initial[..., :2], transition, ll)
    with pytest.raises(ValueError, match="mask must have shape"):
        MarginalHMM(initial, transition, ll, mask=mask[:, :3])
    with pytest.raises(ValueError, match="mask must be a boolean"):
        MarginalHMM(initial, transition, ll, mask=mask.astype(float))
    with pytest.raises(ValueError, match="batch dims do not broadcast"):
        MarginalHMM(initial, transition, np.concatenate([ll, ll, ll]))
    hmm = MarginalHMM(initial, transition, ll)
    with pytest.raises(ValueError, match="placeholder"):
        hmm.log_prob(np.zeros((B, T + 1)))
    with pytest.raises(NotImplementedError, match="sample_states"):
        hmm.sample(jax.random.PRNGKey(0))
