"""Euler–Maruyama ops and grid likelihoods against dense-Gaussian, Kalman and scipy oracles."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import stats
from scipy.special import gammaln

from ppl_switch.models.gpslds import GPSLDS
from ppl_switch.ops.kalman import lgssm_filter, lgssm_joint_gaussian, lgssm_params
from ppl_switch.ops.sde import (
    affine_recursion,
    check_dt,
    euler_maruyama_simulate,
    euler_maruyama_transition_log_prob,
    point_process_log_prob,
    poisson_bin_log_prob,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

DT = 0.05
A = np.array([[-0.4, -1.5], [1.5, -0.4]])
CENTRE = np.array([0.7, -0.3])
OFFSET = np.array([0.2, 0.1])  # f(x) = A (x - c) + e


def _linear_model_and_params(N=3, seed=0):
    """A one-regime gpSLDS (f linear) and its parameters, Gaussian emissions."""
    rng = np.random.default_rng(seed)
    model = GPSLDS(num_states=1, latent_dim=2, obs_dim=N, dt=DT, emission="gaussian", kernel="linear", initial_scale=2.0)
    params = {
        "fixed_points": CENTRE[None],
        "regime_matrix": A[None],
        "regime_offset": OFFSET[None],
        "emission_matrix": rng.normal(size=(N, 2)),
        "emission_bias": rng.normal(size=N),
        "emission_scales": 0.3 + rng.random(N),
    }
    return model, {k: jnp.asarray(v) for k, v in params.items()}


def _as_lgssm(model, params, T):
    """The same system as an LGSSM: x_{t+1} = (I + dt A) x_t + dt (e - A c) + N(0, dt I)."""
    F = np.eye(2) + DT * A
    b = DT * (OFFSET - A @ CENTRE)
    return lgssm_params(
        np.zeros(2), model.initial_scale**2 * np.eye(2), F, DT * np.eye(2), np.asarray(params["emission_matrix"]),
        dynamics_bias=b, emission_bias=np.asarray(params["emission_bias"]),
        emission_cov_diag=np.asarray(params["emission_scales"]) ** 2, num_timesteps=T,
    )


def test_program_log_density_equals_dense_gaussian_for_linear_drift():
    """log p(x, y) of the program (path site + likelihood) = the dense joint Gaussian of the LGSSM."""
    T, N = 7, 3
    model, params = _linear_model_and_params(N)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, T, 2))
    y = rng.normal(size=(1, T, N))
    data = model.prepare(y)
    tr = handlers.trace(handlers.substitute(model.program, data={**params, "x": jnp.asarray(x)})).get_trace(data)
    log_joint = float(tr["x"]["fn"].log_prob(tr["x"]["value"]).sum() + tr["y"]["fn"].log_prob(tr["y"]["value"]).sum())
    mu, cov = lgssm_joint_gaussian(_as_lgssm(model, params, T), T)
    value = np.concatenate([x[0].ravel(), y[0].ravel()])
    np.testing.assert_allclose(log_joint, stats.multivariate_normal(mu, cov).logpdf(value), rtol=1e-9)


def test_extended_kalman_log_likelihood_is_exact_for_linear_drift():
    T, N = 9, 3
    model, params = _linear_model_and_params(N)
    rng = np.random.default_rng(2)
    y = rng.normal(size=(1, T, N))
    mask = rng.random((1, T, N)) > 0.3
    data = model.prepare(y, mask=mask)
    ll = np.asarray(model.log_likelihood(params, data))
    ref = lgssm_filter(_as_lgssm(model, params, T), jnp.asarray(y[0]), jnp.asarray(mask[0]))
    np.testing.assert_allclose(ll.sum(), float(ref.log_likelihood), rtol=1e-9)


def test_transition_log_prob_matches_scipy_and_honours_mask():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 2))
    drift = rng.normal(size=(2, 4, 2))
    L = np.array([[0.8, 0.0], [0.3, 0.5]])
    lp = np.asarray(euler_maruyama_transition_log_prob(jnp.asarray(x), jnp.asarray(drift), 0.1, jnp.asarray(L)))
    ref = [[stats.multivariate_normal(x[b, t] + 0.1 * drift[b, t], 0.1 * L @ L.T).logpdf(x[b, t + 1]) for t in range(4)]
           for b in range(2)]
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    tm = np.ones((2, 5), bool)
    tm[0, 3:] = False
    lp_m = np.asarray(euler_maruyama_transition_log_prob(jnp.asarray(x), jnp.asarray(drift), 0.1, jnp.asarray(L), jnp.asarray(tm)))
    np.testing.assert_array_equal(lp_m[0, 2:], 0.0)
    np.testing.assert_allclose(lp_m[1], lp[1])


def test_simulated_moments_follow_the_euler_recursion():
    """Mean and covariance of simulated paths at the last step = the Euler (LGSSM) moments."""
    num_paths, T = 4000, 20
    x0 = jnp.array([1.0, -1.0])
    drift = lambda x, u: jnp.asarray(A) @ (x - jnp.asarray(CENTRE)) + jnp.asarray(OFFSET)
    keys = jax.random.split(jax.random.PRNGKey(0), num_paths)
    paths = np.asarray(jax.jit(jax.vmap(lambda k: euler_maruyama_simulate(k, x0, drift, DT, T)))(keys))
    F, b = np.eye(2) + DT * A, DT * (OFFSET - A @ CENTRE)
    m, S = np.asarray(x0), np.zeros((2, 2))
    for _ in range(T - 1):
        m, S = F @ m + b, F @ S @ F.T + DT * np.eye(2)
    last = paths[:, -1]
    se = np.sqrt(np.diag(S) / num_paths)
    assert np.all(np.abs(last.mean(0) - m) < 4 * se)
    np.testing.assert_allclose(np.cov(last.T), S, rtol=0.1, atol=0.01)


def test_affine_recursion_matches_a_loop():
    rng = np.random.default_rng(4)
    F = rng.normal(size=(3, 10, 2, 2)) * 0.5
    h = rng.normal(size=(3, 10, 2))
    x0 = rng.normal(size=(3, 2))
    out = np.asarray(affine_recursion(jnp.asarray(x0), jnp.asarray(F), jnp.asarray(h)))
    x = x0.copy()
    ref = [x]
    for t in range(10):
        x = np.einsum("bij,bj->bi", F[:, t], x) + h[:, t]
        ref.append(x)
    np.testing.assert_allclose(out, np.stack(ref, 1), rtol=1e-10, atol=1e-12)


def test_poisson_bin_log_prob_matches_scipy():
    rng = np.random.default_rng(5)
    rate = rng.uniform(1, 40, size=(6, 4))
    y = rng.poisson(rate * 0.05).astype(float)
    mask = rng.random(y.shape) > 0.2
    lp = np.asarray(poisson_bin_log_prob(jnp.asarray(y), jnp.asarray(rate), 0.05, jnp.asarray(mask)))
    ref = np.where(mask, stats.poisson.logpmf(y, rate * 0.05), 0.0)
    np.testing.assert_allclose(lp, ref, rtol=1e-10)


def test_point_process_log_prob_is_the_poisson_process_density():
    """Homogeneous rate lam on [0, T]: log p(event times) = log Poisson(n | lam T) + log n! - n log T."""
    lam, dt, T_steps = 13.0, 0.001, 2000
    rng = np.random.default_rng(6)
    y = (rng.random(T_steps) < lam * dt).astype(float)
    n, T = y.sum(), T_steps * dt
    lp = float(jnp.sum(point_process_log_prob(jnp.asarray(y), jnp.full(T_steps, lam), dt)))
    ref = stats.poisson.logpmf(n, lam * T) + gammaln(n + 1) - n * math.log(T)
    np.testing.assert_allclose(lp, ref, rtol=1e-10)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), "x"])
def test_bad_dt_is_named(bad):
    with pytest.raises(ValueError, match="dt"):
        check_dt(bad)
    with pytest.raises(ValueError, match="dt"):
        GPSLDS(dt=bad)
