"""Gauss–Markov path guide: moments, log density and entropy against the dense Gaussian it defines,
ragged-trial decoupling, and SVI recovering an exact linear-Gaussian posterior (which the family contains)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro
from scipy.stats import multivariate_normal

from ppl_switch.distributions.switching_chain import SwitchingLinearChain
from ppl_switch.guides.gauss_markov import GaussMarkovChain, chain_precision_blocks, gauss_markov_chain
from ppl_switch.ops.kalman import LGSSMParams, lgssm_smoother
import pytest

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _random_chain(B=2, T=4, D=2, seed=0):
    rng = np.random.default_rng(seed)

    def tril(*shape):
        L = np.tril(rng.normal(size=shape + (D, D)) * 0.3)
        idx = np.arange(D)
        L[..., idx, idx] = np.abs(L[..., idx, idx]) + 0.5
        return jnp.asarray(L)

    return GaussMarkovChain(
        jnp.asarray(rng.normal(size=(B, D))), tril(B), jnp.asarray(rng.normal(size=(B, T - 1, D, D)) * 0.5),
        jnp.asarray(rng.normal(size=(B, T - 1, D))), tril(B, T - 1),
    )


def test_log_prob_entropy_and_mean_match_the_dense_gaussian():
    chain = _random_chain()
    mean, prec = chain_precision_blocks(chain)
    ref = multivariate_normal(mean, np.linalg.inv(prec))
    x = chain.sample(jax.random.PRNGKey(0), (3,))
    np.testing.assert_allclose(jax.jit(chain.log_prob)(x)[:, 0], ref.logpdf(np.asarray(x[:, 0]).reshape(3, -1)), rtol=1e-10)
    np.testing.assert_allclose(chain.entropy()[0], ref.entropy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(chain.mean[0]).ravel(), mean, atol=1e-12)


def test_samples_have_the_dense_moments_and_precision_is_block_tridiagonal():
    chain = _random_chain(seed=1)
    mean, prec = chain_precision_blocks(chain)
    x = np.asarray(jax.jit(lambda k: chain.sample(k, (40000,)))(jax.random.PRNGKey(1)))[:, 0].reshape(40000, -1)
    cov = np.linalg.inv(prec)
    assert np.abs(x.mean(0) - mean).max() < 0.05
    assert np.abs(np.cov(x.T) - cov).max() < 0.05 * np.abs(cov).max() + 0.02
    D = 2
    far = np.abs(prec[:D, 2 * D :]).max()  # x_1 and x_3.. are conditionally independent given x_2
    assert far < 1e-10


def test_padded_steps_are_decoupled_from_the_trial():
    T, D = 5, 2

    def guide():
        return gauss_markov_chain("x", 1, T, D, init_loc=np.ones((1, T, D)), time_mask=np.array([[1, 1, 1, 0, 0]], bool))

    with numpyro.handlers.seed(rng_seed=0):
        chain = guide()
    # give the transition matrices non-zero values: masked rows must still be ignored
    chain = GaussMarkovChain(chain.initial_loc, chain.initial_scale_tril,
                             jnp.ones((1, T - 1, D, D)) * jnp.array([1, 1, 0, 0])[None, :, None, None],
                             chain.transition_offsets, chain.transition_scale_trils)
    _, prec = chain_precision_blocks(chain)
    np.testing.assert_allclose(prec[: 3 * D, 3 * D :], 0.0, atol=1e-12)


def test_svi_with_the_chain_guide_recovers_the_exact_kalman_posterior():
    T, D = 5, 2
    A = 0.9 * np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    Lq = 0.3 * np.eye(D)
    r = 0.5
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(1, T, D)))
    prior = SwitchingLinearChain(
        jnp.ones(1), jnp.ones((1, 1)), jnp.zeros(D), jnp.eye(D), jnp.asarray(A)[None], jnp.asarray(Lq)[None],
        jnp.zeros((1, T - 1, 1, D)), jnp.ones((1, T), bool),
    )

    def model(y):
        with numpyro.plate("trial", 1):
            x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, r).to_event(3), obs=y)

    def guide(y):
        chain = gauss_markov_chain("x", 1, T, D, init_scale=0.3)
        with numpyro.plate("trial", 1):
            numpyro.sample("x", chain)

    svi = SVI(model, guide, optax_to_numpyro(optax.adam(optax.cosine_decay_schedule(0.05, 3000, alpha=0.01))), Trace_ELBO(num_particles=16))
    result = svi.run(jax.random.PRNGKey(0), 3000, y, progress_bar=False)
    params = result.params
    with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=params):
        q = gauss_markov_chain("x", 1, T, D)
    lg = LGSSMParams(jnp.zeros(D), jnp.eye(D), jnp.asarray(A), jnp.zeros(D), jnp.asarray(Lq @ Lq.T), jnp.eye(D), jnp.zeros(D), r**2 * jnp.eye(D))
    exact = lgssm_smoother(lg, y[0])
    mean, prec = chain_precision_blocks(q)
    sd = np.sqrt(np.diag(np.linalg.inv(prec)))
    exact_sd = np.sqrt(np.stack([np.diag(c) for c in np.asarray(exact.smoothed_covs)]).ravel())
    err_mean = np.abs(mean - np.asarray(exact.smoothed_means).ravel()).max()
    err_sd = np.abs(sd / exact_sd - 1).max()
    assert err_mean < 0.05 and err_sd < 0.1, (err_mean, err_sd)
