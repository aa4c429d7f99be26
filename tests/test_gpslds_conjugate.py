"""gpSLDS with the drift weights integrated out in closed form: the conjugate Gaussian against dense
Bayesian linear regression, the collapsed marginal against the dense Gaussian marginal and quadrature,
the guide's Bayes-rule identity against the model program's own densities, and a smoke fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy.stats import multivariate_normal, norm

from ppl_switch.data import SequenceData
from ppl_switch.guides.conjugate_weights import ConjugateWeightsGuide
from ppl_switch.models.gpslds import GPSDE, GPSLDS
from ppl_switch.ops.conjugate_drift import collapsed_log_marginal, regression_stats, weight_posterior

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _toy_regression(seed=0, n=9, D=4, K=2, dt=0.1):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, D))
    r = rng.normal(size=(n, K)) * 0.5
    mask = np.ones(n, bool)
    mask[[2, 6]] = False
    prior_prec = rng.uniform(0.3, 3.0, size=D)
    return phi, r, mask, prior_prec, dt


def test_weight_posterior_equals_dense_bayesian_linear_regression():
    """r_k = (dt Phi) w_k + N(0, dt): posterior from the normal equations on the unmasked rows only."""
    phi, r, mask, p0, dt = _toy_regression()
    stats = regression_stats(jnp.asarray(phi), jnp.asarray(r), jnp.asarray(mask))
    mean, precision, chol = weight_posterior(jnp.asarray(p0), stats, dt)
    X = dt * phi[mask]
    cov = np.linalg.inv(np.diag(p0) + X.T @ X / dt)
    for k in range(r.shape[1]):
        np.testing.assert_allclose(mean[:, k], cov @ X.T @ r[mask, k] / dt, rtol=1e-10)
    np.testing.assert_allclose(np.linalg.inv(precision), cov, rtol=1e-10)
    np.testing.assert_allclose(chol @ chol.T, precision, rtol=1e-12)
    # masked rows really are dropped: changing them changes nothing
    r2 = r.copy()
    r2[~mask] += 100.0
    mean2, _, _ = weight_posterior(jnp.asarray(p0), regression_stats(jnp.asarray(phi), jnp.asarray(r2), jnp.asarray(mask)), dt)
    np.testing.assert_allclose(mean2, mean, rtol=1e-12)


def test_collapsed_log_marginal_equals_dense_gaussian_marginal():
    """r_k ~ N(0, dt^2 Phi P0^{-1} Phi' + dt I) independently over k."""
    phi, r, mask, p0, dt = _toy_regression(seed=1)
    stats = regression_stats(jnp.asarray(phi), jnp.asarray(r), jnp.asarray(mask))
    got = collapsed_log_marginal(jnp.asarray(p0), stats, dt)
    X = dt * phi[mask]
    cov = X @ np.diag(1.0 / p0) @ X.T + dt * np.eye(mask.sum())
    ref = sum(multivariate_normal(np.zeros(mask.sum()), cov).logpdf(r[mask, k]) for k in range(r.shape[1]))
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_collapsed_log_marginal_equals_quadrature_one_weight():
    """D = K = 1: log of the integral over w of N(w; 0, 1/p0) prod_t N(r_t; dt phi_t w, dt) on a fine grid."""
    rng = np.random.default_rng(2)
    dt, p0 = 0.2, 0.8
    phi, r = rng.normal(size=(6, 1)), rng.normal(size=(6, 1))
    got = collapsed_log_marginal(jnp.asarray([p0]), regression_stats(jnp.asarray(phi), jnp.asarray(r)), dt)
    w = np.linspace(-30, 30, 200001)
    log_integrand = norm(0, 1 / np.sqrt(p0)).logpdf(w) + norm.logpdf(r[:, :1], dt * phi[:, :1] * w, np.sqrt(dt)).sum(0)
    top = log_integrand.max()
    ref = top + np.log(np.trapezoid(np.exp(log_integrand - top), w))
    np.testing.assert_allclose(got, ref, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# the guide against the model program


def _tiny(kernel="full_linear", input_dim=1):
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, input_dim=input_dim, dt=0.05, emission="gaussian", kernel=kernel)
    rng = np.random.default_rng(3)
    B, T = 2, 7
    lengths = np.array([7, 5])
    time_mask = np.arange(T)[None] < lengths[:, None]
    data = SequenceData(np.where(time_mask[..., None], rng.normal(size=(B, T, 3)), 0.0),
                        np.repeat(time_mask[..., None], 3, -1), lengths,
                        rng.normal(size=(B, T, input_dim)) if input_dim else None)
    params = {"partition_weights": jnp.asarray(rng.normal(size=(3, 1))), "temperature": jnp.asarray(0.7),
              "fixed_points": jnp.asarray(rng.normal(size=(2, 2))),
              "emission_matrix": jnp.asarray(rng.normal(size=(3, 2))), "emission_bias": jnp.zeros(3),
              "emission_scales": jnp.ones(3)}
    if kernel == "full_linear":
        params["slope_scales"], params["offset_scale"] = jnp.array([0.7, 1.6]), jnp.asarray(1.3)
    if input_dim:
        params["input_matrix"] = jnp.asarray(rng.normal(size=(2, input_dim)))
    x = jnp.asarray(rng.normal(size=(B, T, 2)) * 2.0)
    return model, data, params, x


def _model_log_density(model, data, values, sites):
    """Sum of the program's own log densities at ``sites`` with every latent substituted by ``values``."""
    tr = handlers.trace(handlers.substitute(handlers.seed(model.program, 0), data=values)).get_trace(data)
    return sum(jnp.sum(tr[s]["fn"].log_prob(tr[s]["value"])) for s in sites)


@pytest.mark.parametrize("kernel", ["full_linear", "linear"])
def test_guide_conditional_is_the_exact_posterior_of_the_program(kernel):
    """For any weights w: log p(w) + log p(x | w) - log q(w | x) (model program densities; ragged trials,
    inputs) is the same number, and equals the collapsed marginal plus the w-free x_0 / padding terms."""
    model, data, params, x = _tiny(kernel)
    guide = ConjugateWeightsGuide(model)

    @jax.jit  # one compilation instead of many eager ops
    def bayes_rule_total(key):
        q = guide.weight_conditional(params, x, data)
        w = q.sample(key)
        vals = dict(params, x=x, **model.weights_to_sites(w))
        return _model_log_density(model, data, vals, ("regime_matrix", "regime_offset", "x")) - q.log_prob(w)

    values = [float(bayes_rule_total(jax.random.PRNGKey(seed))) for seed in range(3)]
    np.testing.assert_allclose(values[1:], values[0], rtol=1e-9)
    # reference: collapsed increments + x_0 prior + N(0, 1) padding, computed independently
    stats = model.weight_regression_stats(params, x, data)
    tm = np.asarray(data.time_mask)
    x_np = np.asarray(x)
    init = norm(0, model.initial_scale).logpdf(x_np[:, 0]).sum()
    pad = norm.logpdf(x_np[~tm]).sum()
    ref = collapsed_log_marginal(model.weight_prior_precision(params), stats, model.dt) + init + pad
    np.testing.assert_allclose(values[0], ref, rtol=1e-9)


def test_conditional_mean_recovers_true_weights_on_a_long_path():
    """Simulate a long path from known weights; the conditional concentrates on them (within 4 sd)."""
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.01, emission="gaussian")
    data, truth = model.simulate(jax.random.PRNGKey(0), 4, 3000)
    p = truth["params"]
    q = ConjugateWeightsGuide(model).weight_conditional(p, p["x"], data)
    mean, sd = q.base_dist.loc, jnp.sqrt(jnp.diagonal(q.base_dist.covariance_matrix, axis1=-2, axis2=-1))
    true_sites = {"regime_matrix": p["regime_matrix"], "regime_offset": p["regime_offset"]}
    for name, m in model.weights_to_sites(mean).items():
        s = model.weights_to_sites(sd)[name]
        z = np.abs(np.asarray(m - true_sites[name])) / np.asarray(s)
        assert z.max() < 4.0, (name, z)
    assert float(sd.max()) < 1.0 and float(jnp.median(sd)) < 0.4  # and the data are informative (prior sd ~ 1)


@pytest.mark.slow  # ~36 s (2-core CPU, 2026-12-07), mostly eager ELBO and draws; the densities are checked above
def test_conjugate_guide_trace_loss_and_draws():
    """The guide runs under Trace_ELBO (finite loss; A and e come from the auxiliary weight draw, x from the
    path chain) and ``sample_parameters`` returns joint draws with the weights' shapes and spread.
    """
    from numpyro.infer import Trace_ELBO

    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.02, emission="gaussian")
    data, _ = model.simulate(jax.random.PRNGKey(1), 2, 40)
    guide = model.default_guide(data, weights="conjugate")
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(data)
    assert tr["_drift_weights"]["infer"]["is_auxiliary"] and tr["_drift_weights"]["value"].shape == (2, 6)
    np.testing.assert_allclose(tr["regime_matrix"]["value"], model.weights_to_sites(tr["_drift_weights"]["value"])["regime_matrix"])
    params = {k: v["value"] for k, v in tr.items() if v["type"] == "param"}
    assert np.isfinite(float(Trace_ELBO().loss(jax.random.PRNGKey(0), params, model.program, guide, data)))
    extra = guide.sample_parameters(jax.random.PRNGKey(2), params, 6, data=data)
    assert extra["regime_matrix"].shape == (6, 2, 2, 2) and extra["regime_offset"].shape == (6, 2, 2)
    assert "x" not in extra and "_drift_weights" not in extra and extra["fixed_points"].shape == (6, 2, 2)
    assert np.std(extra["regime_matrix"], 0).min() > 0


@pytest.mark.slow
def test_conjugate_guide_svi_loss_decreases():
    """A short SVI run with the conjugate guide: finite, decreasing losses."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.02, emission="gaussian")
    data, _ = model.simulate(jax.random.PRNGKey(1), 2, 40)
    guide = model.default_guide(data, weights="conjugate")
    result = SVI(model.program, guide, Adam(0.01), Trace_ELBO()).run(jax.random.PRNGKey(0), 60, data, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses)) and losses[-20:].mean() < losses[:20].mean()


def test_bad_arguments():
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.05, emission="gaussian")
    with pytest.raises(ValueError, match="weights"):
        model.default_guide(weights="mean_field")
    with pytest.raises(ValueError, match="model"):
        ConjugateWeightsGuide(GPSDE(latent_dim=2, obs_dim=3, dt=0.05))
    with pytest.raises(ValueError, match="data"):
        ConjugateWeightsGuide(model).sample_parameters(jax.random.PRNGKey(0), {}, 3)
