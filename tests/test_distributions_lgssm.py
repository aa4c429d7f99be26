"""LinearGaussianStateSpace: the Kalman-marginalised NumPyro distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density
from scipy.stats import multivariate_normal

from ppl_switch.distributions.lgssm import LinearGaussianStateSpace
from ppl_switch.ops import kalman

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

T, D, N = 5, 2, 3


def _params(scale=1.0):
    rng = np.random.default_rng(0)
    return kalman.lgssm_params(
        np.zeros(D),
        np.eye(D),
        0.9 * np.linalg.qr(rng.normal(size=(D, D)))[0],
        0.2 * np.eye(D),
        rng.normal(size=(N, D)),
        emission_cov_diag=scale * np.full(N, 0.3),
        emission_bias=rng.normal(size=N),
    )


@pytest.fixture(scope="module")
def data():
    params = _params()
    y = jax.jit(lambda k: LinearGaussianStateSpace(params, T).sample(k, (4,)))(jax.random.PRNGKey(0))
    return params, np.asarray(y)


def test_log_prob_equals_ops_and_dense_oracle(data):
    params, y = data
    mask = np.ones((T, N), bool)
    mask[2] = False
    mask[3, 1] = False
    d = LinearGaussianStateSpace(params, T, mask)
    lp = d.log_prob(y)
    assert lp.shape == (4,)
    ops = [kalman.lgssm_filter(params, yi, mask).log_likelihood for yi in y]
    np.testing.assert_allclose(lp, ops, rtol=1e-10)
    mu, Sigma = kalman.lgssm_joint_gaussian(params, T)
    iy = T * D + np.flatnonzero(mask.reshape(-1))
    dense = multivariate_normal(mu[iy], Sigma[np.ix_(iy, iy)]).logpdf(y.reshape(4, -1)[:, mask.reshape(-1)])
    np.testing.assert_allclose(lp, dense, rtol=1e-8)


def test_batch_and_sample_shapes(data):
    params, y = data
    d = LinearGaussianStateSpace(params, T)
    assert d.batch_shape == () and d.event_shape == (T, N)
    assert d.sample(jax.random.PRNGKey(1)).shape == (T, N)
    x, ys = d.sample_with_states(jax.random.PRNGKey(1), (2, 3))
    assert x.shape == (2, 3, T, D) and ys.shape == (2, 3, T, N)
    assert d.log_prob(ys).shape == (2, 3)
    assert d.filter(y).filtered_means.shape == (4, T, D)
    sm = d.smoother(y[0])
    assert sm.smoothed_cross_covs.shape == (T - 1, D, D)
    assert d.posterior_sample(jax.random.PRNGKey(2), y[0], (7,)).shape == (7, T, D)
    with pytest.raises(ValueError, match="y must have trailing shape"):
        d.log_prob(np.zeros((T, N + 1)))
    with pytest.raises(ValueError, match="mask must have shape"):
        LinearGaussianStateSpace(params, T, np.ones((T, N + 1), bool))


def test_samples_have_model_moments():
    """Sampled y have the dense oracle's mean and covariance (loose Monte Carlo tolerance)."""
    params = _params()
    d = LinearGaussianStateSpace(params, 3)
    ys = np.asarray(d.sample(jax.random.PRNGKey(3), (4000,))).reshape(4000, -1)
    mu, Sigma = kalman.lgssm_joint_gaussian(params, 3)
    sd = np.sqrt(np.diag(Sigma)[3 * D :])
    np.testing.assert_allclose(ys.mean(0), mu[3 * D :], atol=0.07 * sd.max())
    np.testing.assert_allclose(np.cov(ys.T), Sigma[3 * D :, 3 * D :], atol=0.12 * sd.max() ** 2)


def test_from_fields_and_parallel_agree(data):
    params, y = data
    a = LinearGaussianStateSpace(params, T).log_prob(y)
    b = LinearGaussianStateSpace(num_timesteps=T, parallel=True, **params._asdict()).log_prob(y)
    np.testing.assert_allclose(a, b, rtol=1e-8)


def test_gradient_is_finite(data):
    params, y = data

    def loss(log_r, A):
        p = params._replace(emission_cov_diag=jnp.exp(log_r), dynamics_matrix=A)
        return LinearGaussianStateSpace(p, T).log_prob(y).sum()

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.log(params.emission_cov_diag), params.dynamics_matrix)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
    assert np.abs(np.asarray(g[0])).sum() > 0


def test_numpyro_model_log_density(data):
    params, y = data
    mask = np.ones((T, N), bool)
    mask[4, 0] = False

    def model(y):
        r = numpyro.sample("r", dist.LogNormal(0.0, 1.0).expand([N]).to_event(1))
        p = params._replace(emission_cov_diag=r)
        with numpyro.plate("trials", y.shape[0]):
            numpyro.sample("y", LinearGaussianStateSpace(p, T, mask), obs=y)

    r = jnp.full(N, 0.5)
    lp = jax.jit(lambda r: log_density(model, (y,), {}, {"r": r})[0])(r)
    expected = dist.LogNormal(0.0, 1.0).log_prob(r).sum() + sum(
        kalman.lgssm_filter(params._replace(emission_cov_diag=r), yi, mask).log_likelihood for yi in y
    )
    np.testing.assert_allclose(lp, expected, rtol=1e-10)
