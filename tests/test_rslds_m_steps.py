"""The rSLDS Laplace EM's closed-form Bernoulli readout M-step maximises its objective: the gradient of the
expected Jaakkola-Jordan bound plus the readout's log prior, computed independently with jax.grad, is zero
at the step's output (a step that drops the posterior covariance of x from E[x x'] leaves a gradient of
order one there)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.infer.rslds_laplace_em import bernoulli_emission_log_prior, bernoulli_emission_m_step, jj_bound

pytestmark = pytest.mark.float64  # a stationarity check at 1e-8


class _Posterior(NamedTuple):
    means: jax.Array  # (B, T, D)
    covs: jax.Array  # (B, T, D, D)


def _problem(seed=0, B=2, T=30, D=2, N=4):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(B, T, D))
    roots = rng.normal(size=(B, T, D, D)) * 0.7
    covs = roots @ np.swapaxes(roots, -1, -2) + 0.1 * np.eye(D)  # posterior covariances well away from 0
    y = (rng.random((B, T, N)) < 0.4).astype(float)
    mask = rng.random((B, T, N)) < 0.8
    xi = 0.5 + rng.random((B, T, N))
    params = {"emission_matrix": rng.normal(size=(N, D)), "emission_bias": rng.normal(size=N)}
    return _Posterior(jnp.asarray(means), jnp.asarray(covs)), jnp.asarray(y), jnp.asarray(mask), jnp.asarray(xi), params


@pytest.mark.parametrize("learn", [frozenset({"emission_matrix", "emission_bias"}), frozenset({"emission_bias"})])
def test_bernoulli_readout_m_step_is_a_stationary_point(learn):
    posts, y, mask, xi, params = _problem()
    scales = (2.0, 3.0)
    new = bernoulli_emission_m_step(params, posts, xi, y, mask, learn, scales)

    def objective(C, d):
        p = {"emission_matrix": C, "emission_bias": d}
        bound = sum(jj_bound(p, _Posterior(posts.means[b], posts.covs[b]), y[b], mask[b], xi[b]) for b in range(y.shape[0]))
        return bound + bernoulli_emission_log_prior(p, scales, "emission_matrix" in learn)

    grad_C, grad_d = jax.grad(objective, argnums=(0, 1))(new["emission_matrix"], new["emission_bias"])
    np.testing.assert_allclose(grad_d, 0.0, atol=1e-8)
    if "emission_matrix" in learn:
        np.testing.assert_allclose(grad_C, 0.0, atol=1e-8)
    else:
        np.testing.assert_array_equal(new["emission_matrix"], params["emission_matrix"])
    # and it is an ascent from the start (the objective is concave in the readout)
    assert objective(new["emission_matrix"], new["emission_bias"]) > objective(params["emission_matrix"], params["emission_bias"])
