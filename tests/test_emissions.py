"""The masked Gaussian emission density against scipy on each step's observed block, on the path that
factorises once per pattern of observed entries (D > UNROLL_MAX, more steps than patterns)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from ppl_switch.models._emissions import masked_mvn_log_prob_cov
from ppl_switch.ops.mask_patterns import mask_patterns, worth_deduplicating


def _observed_block_log_pdf(y, mask, mean, cov):
    """log N(y_o; mean_o, cov_oo) per step by scipy (0 for a step with nothing observed)."""
    out = np.zeros(mask.shape[:-1])
    for index in np.ndindex(*mask.shape[:-1]):
        o = mask[index]
        if o.any():
            out[index] = multivariate_normal.logpdf(y[index][o], mean[index][o], cov[index][np.ix_(o, o)])
    return out


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    N, T, D, K = 2, 40, 5, 3  # 80 steps > 2^5 patterns: the per-pattern path
    y = rng.normal(size=(N, T, D))
    mask = rng.random((N, T, D)) > 0.3
    mask[0, 0], mask[0, 1] = False, True  # a step with nothing and one with everything observed
    A = rng.normal(size=(K, D, D))
    cov = A @ np.swapaxes(A, -1, -2) + D * np.eye(D)
    return y, mask, rng.normal(size=(K, D)), rng.normal(size=(N, T, K, D)), cov


@pytest.mark.float64
def test_per_pattern_density_equals_scipy_on_the_observed_block(problem):
    y, mask, state_means, step_means, cov = problem
    N, T, D = y.shape
    K = cov.shape[0]
    assert worth_deduplicating(N * T, D)
    steps = np.broadcast_to(y[..., None, :], (N, T, K, D))
    masks = np.broadcast_to(mask[..., None, :], (N, T, K, D))
    covs = np.broadcast_to(cov, (N, T, K, D, D))
    for means in (np.broadcast_to(state_means, (N, T, K, D)), step_means):  # the HMM's and the ARHMM's means
        args = (jnp.asarray(y)[..., None, :], jnp.asarray(mask)[..., None, :], jnp.asarray(means), jnp.asarray(cov))
        want = _observed_block_log_pdf(steps, masks, means, covs)
        for shared in (True, False):  # per pattern, and per step
            np.testing.assert_allclose(masked_mvn_log_prob_cov(*args, shared_over_steps=shared), want, rtol=1e-10, atol=1e-10)
    # one covariance for every step (the SLDS's emission)
    got = masked_mvn_log_prob_cov(jnp.asarray(y), jnp.asarray(mask), jnp.asarray(step_means[..., 0, :]), jnp.asarray(cov[0]),
                                  shared_over_steps=True)
    want = _observed_block_log_pdf(y, mask, step_means[..., 0, :], np.broadcast_to(cov[0], (N, T, D, D)))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"mask: expected \(\*steps, 1, D\) against a covariance \(3, 5, 5\)"):
        masked_mvn_log_prob_cov(jnp.asarray(y), jnp.asarray(mask), jnp.asarray(state_means), jnp.asarray(cov), shared_over_steps=True)


@pytest.mark.float64
def test_per_pattern_gradients_equal_the_per_step_path(problem):
    """The same gradients with respect to the means and covariances as a factorisation per step."""
    y, mask, state_means, _, cov = problem
    y, m = jnp.asarray(y)[..., None, :], jnp.asarray(mask)[..., None, :]

    def per_step(mean, cov):
        both = m[..., :, None] & m[..., None, :]
        chol = jnp.linalg.cholesky(jnp.where(both, cov, jnp.eye(cov.shape[-1])))
        white = jax.scipy.linalg.solve_triangular(chol, jnp.where(m, y - mean, 0.0)[..., None], lower=True)[..., 0]
        log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
        return jnp.sum(-0.5 * jnp.sum(white**2, -1) - log_det - 0.5 * jnp.sum(m, -1) * np.log(2 * np.pi))

    def per_pattern(mean, cov):
        return jnp.sum(masked_mvn_log_prob_cov(y, m, mean, cov, shared_over_steps=True))

    args = (jnp.asarray(state_means), jnp.asarray(cov))
    np.testing.assert_allclose(per_pattern(*args), per_step(*args), rtol=1e-12)
    for got, want in zip(jax.grad(per_pattern, (0, 1))(*args), jax.grad(per_step, (0, 1))(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_mask_patterns_index_every_step_and_dedup_only_where_it_pays():
    rng = np.random.default_rng(1)
    mask = rng.random((3, 50, 4)) > 0.5
    patterns, index = mask_patterns(jnp.asarray(mask))
    assert patterns.shape == (16, 4) and index.shape == (3, 50)
    np.testing.assert_array_equal(np.asarray(patterns)[np.asarray(index)], mask)
    few = mask[:, :3]  # 9 steps <= 16 patterns: each step its own
    patterns, index = mask_patterns(jnp.asarray(few))
    assert patterns.shape == (9, 4)
    np.testing.assert_array_equal(np.asarray(patterns)[np.asarray(index)], few)
    assert not worth_deduplicating(10**6, 21) and worth_deduplicating(1025, 10) and not worth_deduplicating(1024, 10)
