"""Kalman filter / RTS smoother / FFBS against a dense joint-Gaussian oracle (float64, see conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from ppl_switch.ops.kalman import (
    LGSSMParams,
    lgssm_filter,
    lgssm_joint_gaussian,
    lgssm_params,
    lgssm_sample,
    lgssm_simulate,
    lgssm_smoother,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _spd(rng, n, scale=1.0):
    X = rng.normal(size=(n, n))
    return scale * (X @ X.T / n + 0.5 * np.eye(n))


def make_params(seed, D=2, N=3, T=4, time_varying=False, noise="full"):
    """Random stable model. noise: 'full' (N,N), 'diag' (emission_cov_diag), 'vec' ((N,) emission_cov)."""
    rng = np.random.default_rng(seed)
    lead_dyn = (T - 1,) if time_varying else ()
    lead_em = (T,) if time_varying else ()

    def stack(fn, lead):
        return np.stack([fn() for _ in range(lead[0])]) if lead else fn()

    A = stack(lambda: 0.9 * np.linalg.qr(rng.normal(size=(D, D)))[0], lead_dyn)
    Q = stack(lambda: _spd(rng, D, 0.3), lead_dyn)
    C = rng.normal(size=lead_em + (N, D))
    R_full = stack(lambda: _spd(rng, N, 0.5), lead_em)
    R_diag = rng.uniform(0.2, 1.0, size=lead_em + (N,))
    kwargs = dict(
        dynamics_bias=rng.normal(size=lead_dyn + (D,)) * 0.3,
        emission_bias=rng.normal(size=lead_em + (N,)),
    )
    if noise == "full":
        kwargs["emission_cov"] = R_full
    elif noise == "diag":
        kwargs["emission_cov_diag"] = R_diag
    else:
        kwargs["emission_cov"] = R_diag
    return lgssm_params(rng.normal(size=D), _spd(rng, D), A, Q, C, num_timesteps=T, **kwargs)


def dense_posterior(params, y, mask=None):
    """Log-likelihood and posterior mean/cov of stacked x given the observed entries of y."""
    T, N = y.shape
    D = params.initial_mean.shape[0]
    mu, Sigma = map(np.asarray, lgssm_joint_gaussian(params, T))
    obs = np.ones((T, N), bool) if mask is None else np.asarray(mask)
    iy = T * D + np.flatnonzero(obs.reshape(-1))
    ix = np.arange(T * D)
    yo = np.asarray(y).reshape(-1)[obs.reshape(-1)]
    ll = multivariate_normal(mu[iy], Sigma[np.ix_(iy, iy)]).logpdf(yo) if len(iy) else 0.0
    if len(iy):
        K = np.linalg.solve(Sigma[np.ix_(iy, iy)], Sigma[np.ix_(iy, ix)]).T
        mean = mu[ix] + K @ (yo - mu[iy])
        cov = Sigma[np.ix_(ix, ix)] - K @ Sigma[np.ix_(iy, ix)]
    else:
        mean, cov = mu[ix], Sigma[np.ix_(ix, ix)]
    return ll, mean.reshape(T, D), cov


def dense_filtered(params, y, mask=None):
    """Filtered means/covs: condition on y_{1:t} only (dense, one conditioning per t)."""
    T, N = y.shape
    D = params.initial_mean.shape[0]
    obs = np.ones((T, N), bool) if mask is None else np.asarray(mask)
    means, covs = [], []
    for t in range(T):
        m = obs.copy()
        m[t + 1 :] = False
        _, mean, cov = dense_posterior(params, y, m)
        means.append(mean[t])
        covs.append(cov[t * D : (t + 1) * D, t * D : (t + 1) * D])
    return np.stack(means), np.stack(covs)


def check_against_dense(params, y, mask, parallel):
    T, _ = y.shape
    D = params.initial_mean.shape[0]
    ll, mean, cov = dense_posterior(params, y, mask)
    res = lgssm_smoother(params, y, mask, parallel=parallel)
    np.testing.assert_allclose(res.log_likelihood, ll, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(res.smoothed_means, mean, rtol=1e-7, atol=1e-8)
    blocks = lambda s, t: cov[s * D : (s + 1) * D, t * D : (t + 1) * D]  # noqa: E731
    np.testing.assert_allclose(res.smoothed_covs, np.stack([blocks(t, t) for t in range(T)]), atol=1e-8)
    np.testing.assert_allclose(
        res.smoothed_cross_covs, np.stack([blocks(t + 1, t) for t in range(T - 1)]), atol=1e-8
    )
    fm, fc = dense_filtered(params, y, mask)
    np.testing.assert_allclose(res.filtered_means, fm, atol=1e-8)
    np.testing.assert_allclose(res.filtered_covs, fc, atol=1e-8)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "time_varying,noise", [(False, "full"), (False, "diag"), (False, "vec"), (True, "full"), (True, "diag")]
)
def test_matches_dense_oracle(time_varying, noise, parallel):
    params = make_params(0, time_varying=time_varying, noise=noise)
    _, y = lgssm_simulate(jax.random.PRNGKey(1), params, 4)
    check_against_dense(params, y, None, parallel)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("noise,D", [("full", 2), ("diag", 2), ("diag", 4)])
def test_partial_and_fully_masked_steps_match_dense_subset(noise, D, parallel):
    # D=4 >= N=3 takes the sequential filter's covariance-form branch, D=2 its information form.
    params = make_params(2, D=D, T=5, noise=noise, time_varying=noise == "full")
    _, y = lgssm_simulate(jax.random.PRNGKey(3), params, 5)
    mask = np.array(
        [[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1]], bool
    )  # step 2 fully masked
    y = np.where(mask, y, np.nan)  # NaN placeholders must not leak
    check_against_dense(params, y, mask, parallel)


def test_all_masked_is_prior():
    params = make_params(4)
    y = np.full((4, 3), np.nan)
    res = lgssm_smoother(params, y, np.zeros((4, 3), bool))
    mu, Sigma = lgssm_joint_gaussian(params, 4)
    assert float(res.log_likelihood) == 0.0
    np.testing.assert_allclose(res.smoothed_means.reshape(-1), mu[:8], atol=1e-10)
    np.testing.assert_allclose(res.smoothed_covs[3], Sigma[6:8, 6:8], atol=1e-10)


@pytest.mark.parametrize("T", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_parallel_equals_sequential_long(T):
    params = make_params(5, D=3, N=4, T=T, noise="diag")
    _, y = lgssm_simulate(jax.random.PRNGKey(6), params, T)
    mask = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(7), 0.8, (T, 4)))
    smooth = lgssm_smoother
    a = smooth(params, y, mask, parallel=False)
    b = smooth(params, y, mask, parallel=True)
    for name in a._fields:
        x, z = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        np.testing.assert_allclose(z, x, rtol=1e-6, atol=1e-6 * np.abs(x).max(), err_msg=name)
    key = jax.random.PRNGKey(8)
    np.testing.assert_allclose(
        lgssm_sample(key, params, y, mask, parallel=True), lgssm_sample(key, params, y, mask), atol=1e-6
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_posterior_sample_moments(parallel):
    T, D = 4, 2
    params = make_params(9, time_varying=True, noise="diag")
    _, y = lgssm_simulate(jax.random.PRNGKey(10), params, T)
    mask = np.ones((T, 3), bool)
    mask[1, :2] = False
    _, mean, cov = dense_posterior(params, y, mask)
    keys = jax.random.split(jax.random.PRNGKey(11), 4000)
    draws = jax.jit(jax.vmap(lambda k: lgssm_sample(k, params, y, mask, parallel=parallel)))(keys)
    flat = np.asarray(draws).reshape(len(keys), T * D)
    sd = np.sqrt(np.diag(cov))
    # Monte Carlo error of a mean is sd/sqrt(4000) ~ 0.016 sd; of a covariance ~ 0.02-0.03 sd_i sd_j.
    np.testing.assert_allclose(flat.mean(0), mean.reshape(-1), atol=0.07 * sd.max())
    np.testing.assert_allclose(np.cov(flat.T), cov, atol=0.1 * sd.max() ** 2)
    # and a wrong posterior (the prior) would be rejected by the same check
    mu_prior = np.asarray(lgssm_joint_gaussian(params, T)[0][: T * D])
    assert np.abs(mu_prior - mean.reshape(-1)).max() > 0.07 * sd.max()


@pytest.mark.parametrize("parallel", [False, True])
def test_ragged_batch_via_vmap(parallel):
    params = make_params(12, noise="diag")
    lengths = [6, 3, 3]
    Tmax = max(lengths)
    ys = [lgssm_simulate(jax.random.PRNGKey(20 + i), params, n)[1] for i, n in enumerate(lengths)]
    Y = np.zeros((3, Tmax, 3))
    M = np.zeros((3, Tmax, 3), bool)
    for i, (yi, n) in enumerate(zip(ys, lengths)):
        Y[i, :n], M[i, :n] = yi, True
    M[0, 2, 1] = False  # one missing entry inside a trial too
    batched = jax.vmap(lambda y, m: lgssm_filter(params, y, m, parallel=parallel).log_likelihood)(Y, M)
    separate = [lgssm_filter(params, Y[i, :n], M[i, :n]).log_likelihood for i, n in enumerate(lengths)]
    np.testing.assert_allclose(batched, separate, rtol=1e-10)
    sm = jax.vmap(lambda y, m: lgssm_smoother(params, y, m, parallel=parallel).smoothed_means)(Y, M)
    np.testing.assert_allclose(sm[1, :3], lgssm_smoother(params, Y[1, :3]).smoothed_means, atol=1e-10)


@pytest.mark.parametrize("T", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("parallel", [False, True])
def test_float32_long_rotation_is_finite(parallel, T):
    D, N = 2, 2
    th = 0.05
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    params = lgssm_params(
        f32(np.zeros(D)),
        f32(np.eye(D)),
        f32(0.999 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])),
        f32(1e-3 * np.eye(D)),
        f32(np.eye(N, D)),
        emission_cov_diag=f32(0.01 * np.ones(N)),
    )
    x, y = lgssm_simulate(jax.random.PRNGKey(0), params, T)
    res = lgssm_smoother(params, y, parallel=parallel)
    assert res.smoothed_means.dtype == jnp.float32
    for name in res._fields:
        assert np.isfinite(np.asarray(getattr(res, name))).all(), name
    assert np.sqrt(np.mean((res.smoothed_means - x) ** 2)) < 0.1
    samples = lgssm_sample(jax.random.PRNGKey(1), params, y, parallel=parallel)
    assert np.isfinite(np.asarray(samples)).all()


def test_gradient_through_masked_nan_is_finite():
    params = make_params(13, noise="diag")
    _, y = lgssm_simulate(jax.random.PRNGKey(14), params, 4)
    mask = np.ones((4, 3), bool)
    mask[2, 0] = False
    y = jnp.where(mask, y, jnp.nan)
    grad = jax.jit(jax.grad(lambda p: lgssm_filter(p, y, mask).log_likelihood))(params)
    for leaf in jax.tree_util.tree_leaves(grad):
        assert np.isfinite(np.asarray(leaf)).all()


def test_invalid_shapes_name_the_argument():
    p = make_params(15)
    y = np.zeros((4, 3))
    with pytest.raises(ValueError, match="y must have shape"):
        lgssm_filter(p, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="mask must have shape"):
        lgssm_filter(p, y, np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="dynamics_matrix"):
        lgssm_filter(p._replace(dynamics_matrix=np.zeros((5, 2, 2))), y)
    with pytest.raises(ValueError, match="emission_bias"):
        lgssm_filter(p._replace(emission_bias=np.zeros(2)), y)
    with pytest.raises(ValueError, match="emission_cov"):
        lgssm_filter(p._replace(emission_cov=np.eye(2)), y)
    with pytest.raises(ValueError, match="initial_cov"):
        lgssm_params(np.zeros(2), np.eye(3), np.eye(2), np.eye(2), np.zeros((3, 2)), np.eye(3))
    with pytest.raises(ValueError, match="exactly one"):
        lgssm_params(np.zeros(2), np.eye(2), np.eye(2), np.eye(2), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="emission_cov_diag"):
        lgssm_filter(LGSSMParams(*p[:7], None, np.ones((5, 3))), y)
    # under jit the error is raised at trace time, before compilation
    with pytest.raises(ValueError, match="emission_matrix"):
        lgssm_filter(p._replace(emission_matrix=np.zeros((3, 5))), y)
