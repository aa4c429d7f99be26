"""Metropolis-within-Gibbs over p(x, theta | y) for the gpSLDS (``infer.path_gibbs``): the whole sampler against
the dense-Gaussian posterior of a one-regime (linear) model, the partition block against a dense oracle of the
collapsed increments, and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.infer.path_gibbs import _PartitionBlock, _proposal_cholesky, sample_path_gibbs
from ppl_switch.models.gpslds import GPSDE, GPSLDS

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

DT = 0.1


def _batch_means_se(draws, num_batches=20):
    """Monte Carlo standard error of the mean of a correlated chain (non-overlapping batch means)."""
    batches = np.asarray(draws)[: len(draws) // num_batches * num_batches].reshape(num_batches, -1).mean(1)
    return batches.std(ddof=1) / np.sqrt(num_batches)


def _dense_log_evidence(a, e, params, y, dt, initial_scale):
    """log p(y | a, e) of the one-regime linear SDE x_{t+1} = x_t + dt (a (x_t - c) + e) + sqrt(dt) eps, K = 1,
    from the joint Gaussian of the stacked observations (per trial, T x N)."""
    B, T, N = y.shape
    c = float(params["fixed_points"][0, 0])
    C, d, s = (np.asarray(params[k]) for k in ("emission_matrix", "emission_bias", "emission_scales"))
    phi = 1.0 + dt * a
    # x_t = phi^t x_0 + sum_{i<t} phi^(t-1-i) (dt (e - a c) + sqrt(dt) eps_i)
    powers = phi ** np.arange(T)
    mean_x = np.cumsum(np.concatenate([[0.0], powers[:-1]])) * dt * (e - a * c)
    G = np.zeros((T, T))  # x = G [x_0, eps_0 .. eps_{T-2}]
    G[:, 0] = powers
    for t in range(1, T):
        G[t, 1:t + 1] = np.sqrt(dt) * phi ** np.arange(t - 1, -1, -1)
    var_in = np.concatenate([[initial_scale**2], np.ones(T - 1)])
    cov_x = (G * var_in) @ G.T
    CC = np.kron(np.eye(T), C)  # (T N, T)
    cov_y = CC @ cov_x @ CC.T + np.diag(np.tile(s**2, T))
    mean_y = (CC @ mean_x) + np.tile(d, T)
    L = np.linalg.cholesky(cov_y)
    total = 0.0
    for b in range(B):
        z = np.linalg.solve(L, y[b].reshape(-1) - mean_y)
        total += -0.5 * z @ z - np.sum(np.log(np.diag(L))) - 0.5 * len(z) * np.log(2 * np.pi)
    return total


def test_sampler_matches_the_dense_posterior_of_a_linear_model():
    """One regime, K = 1, Gaussian emissions: p(x | theta, y) is Gaussian, so every Laplace proposal is accepted,
    and the chain's joint marginal of the weights (a, e) matches quadrature of the dense-Gaussian posterior. The
    path sits near x = 2 while the centre is held at 0, so a and e are strongly correlated a posteriori."""
    model = GPSLDS(num_states=1, latent_dim=1, obs_dim=2, dt=DT, emission="gaussian", initial_scale=1.0)
    true = {"fixed_points": jnp.zeros((1, 1)), "slope_scales": jnp.ones(1), "offset_scale": jnp.asarray(1.0),
            "regime_matrix": jnp.full((1, 1, 1), -1.0), "regime_offset": jnp.full((1, 1), 2.0),
            "emission_matrix": jnp.asarray([[1.0], [-0.7]]), "emission_bias": jnp.asarray([0.2, -0.1]),
            "emission_scales": jnp.asarray([0.3, 0.4])}
    data, sim = model.simulate(jax.random.PRNGKey(3), 3, 40, params=true)
    gibbs = sample_path_gibbs(model, data, true, np.asarray(sim["latents"]), num_draws=3000, burn_in=50, thin=1,
                              hold=("fixed_points", "slope_scales", "offset_scale"), seed=1)
    assert gibbs.path_acceptance.mean() == 1.0
    assert gibbs.partition_acceptance.size == 0 and gibbs.trace == {}

    draws = np.stack([gibbs.samples["regime_matrix"][:, 0, 0, 0], gibbs.samples["regime_offset"][:, 0, 0]], 1)
    lo, hi = draws.mean(0) - 8 * draws.std(0), draws.mean(0) + 8 * draws.std(0)
    a_grid, e_grid = np.linspace(lo[0], hi[0], 121), np.linspace(lo[1], hi[1], 121)
    y = np.asarray(data.y)
    log_post = np.array([[_dense_log_evidence(a, e, true, y, DT, 1.0) - 0.5 * a**2 - 0.5 * e**2 for e in e_grid]
                         for a in a_grid])
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    assert w[[0, -1], :].sum() + w[:, [0, -1]].sum() < 1e-6  # the grid holds the posterior
    A, E = np.meshgrid(a_grid, e_grid, indexing="ij")
    mean = np.array([np.sum(w * A), np.sum(w * E)])
    d = np.stack([A - mean[0], E - mean[1]])
    cov = np.einsum("iab,jab,ab->ij", d, d, w)
    sd = np.sqrt(np.diag(cov))
    assert cov[0, 1] / (sd[0] * sd[1]) < -0.5  # the case is informative about the weights' joint covariance
    for i, name in enumerate(("a", "e")):
        se = _batch_means_se(draws[:, i])
        assert abs(draws[:, i].mean() - mean[i]) < 4 * se + 0.01 * sd[i], (name, draws[:, i].mean(), mean[i], se)
        assert 0.85 < draws[:, i].std() / sd[i] < 1.15, (name, draws[:, i].std(), sd[i])
    np.testing.assert_allclose(np.corrcoef(draws.T)[0, 1], cov[0, 1] / (sd[0] * sd[1]), atol=0.05)


def _dense_collapsed_log_marginal(model, theta, x):
    """log p(increments of x | partition, scales) with the weights integrated out, from the dense Gaussian
    r_k ~ N(0, dt I + dt^2 Phi Lambda0^{-1} Phi') per output dimension k (one trial)."""
    phi = np.asarray(model.weight_features(theta, jnp.asarray(x[:-1])))
    phi = phi.reshape(len(phi), -1)
    r = np.diff(x, axis=0)
    prior_var = 1.0 / np.asarray(model.weight_prior_precision(theta))
    cov = model.dt * np.eye(len(r)) + model.dt**2 * (phi * prior_var) @ phi.T
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, r)
    return float(-0.5 * np.sum(z**2) - r.shape[1] * (np.sum(np.log(np.diag(L))) + 0.5 * len(r) * np.log(2 * np.pi)))


def test_partition_block_samples_the_collapsed_conditional_of_the_temperature():
    """The partition block alone, the path fixed and only tau free: its draws match quadrature of
    prior(tau) x p(increments | tau) built from the dense Gaussian of the increments (weights integrated out)."""
    model = GPSLDS(num_states=2, latent_dim=1, obs_dim=2, dt=DT, emission="gaussian")
    theta = {"partition_weights": jnp.asarray([[0.0], [1.0]]), "temperature": jnp.asarray(0.5),
             "fixed_points": jnp.asarray([[-1.0], [1.0]]), "slope_scales": jnp.ones(1), "offset_scale": jnp.asarray(1.0),
             "regime_matrix": jnp.asarray([[[-2.0]], [[-2.0]]]), "regime_offset": jnp.zeros((2, 1))}
    x = np.cumsum(np.random.default_rng(0).normal(0.0, 0.5, size=(40, 1)), 0)[None]  # (1, T, 1)
    data = model.prepare(np.zeros((1, 40, 2)))
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    import numpyro.distributions as dist

    prior = dist.LogNormal(np.log(0.5), 0.5)
    block = _PartitionBlock(model, jdata, {"temperature": ()}, {"temperature": prior})
    u = block.flatten(theta)
    chol = 1.5 * jnp.asarray(_proposal_cholesky(np.asarray(block.neg_hessian(u, theta, jnp.asarray(x)))))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws, accepted = [], 0
    for key in keys:
        u, n = block.steps(10, u, theta, jnp.asarray(x), chol, key)
        accepted += int(n)
        draws.append(float(block.unpack(u)["temperature"]))
    draws = np.asarray(draws)
    assert 0.2 < accepted / 4000 < 0.9

    taus = np.linspace(0.02, 3.0, 600)
    log_post = np.array([_dense_collapsed_log_marginal(model, {**theta, "temperature": jnp.asarray(t)}, x[0])
                         + float(prior.log_prob(t)) for t in taus])
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = np.sum(w * taus)
    sd = np.sqrt(np.sum(w * (taus - mean) ** 2))
    assert abs(draws.mean() - mean) < 4 * _batch_means_se(draws) + 0.01 * sd, (draws.mean(), mean)
    assert 0.85 < draws.std() / sd < 1.15, (draws.std(), sd)


def test_sampler_runs_the_partition_block_and_rejects_bad_arguments():
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.05, emission="gaussian")
    data, sim = model.simulate(jax.random.PRNGKey(0), 2, 15)
    params = {k: np.asarray(v) for k, v in sim["params"].items() if k != "x"}
    path = np.asarray(sim["latents"])
    gibbs = sample_path_gibbs(model, data, params, path, num_draws=3, burn_in=4, thin=2, partition_steps=3)
    assert gibbs.samples["regime_matrix"].shape == (3, 2, 2, 2) and gibbs.path_mean.shape == path.shape
    assert gibbs.trace["temperature"].shape == (10,) and gibbs.partition_acceptance.shape == (10,)
    np.testing.assert_array_equal(gibbs.samples["emission_matrix"], np.broadcast_to(params["emission_matrix"], (3, 3, 2)))
    assert np.all(np.isfinite(gibbs.samples["fixed_points"]))

    with pytest.raises(ValueError, match="params: missing parameter sites.*temperature"):
        sample_path_gibbs(model, data, {k: v for k, v in params.items() if k != "temperature"}, path)
    with pytest.raises(ValueError, match="path: expected shape"):
        sample_path_gibbs(model, data, params, path[:, :-1])
    with pytest.raises(ValueError, match="hold: unknown parameter sites"):
        sample_path_gibbs(model, data, params, path, hold=("tau",))
    with pytest.raises(ValueError, match="burn_in"):
        sample_path_gibbs(model, data, params, path, burn_in=-1)
    with pytest.raises(TypeError, match="model: expected a GPSLDS"):
        sample_path_gibbs(GPSDE(latent_dim=2, obs_dim=3, dt=0.05, emission="gaussian"), data, params, path)


def test_draws_write_inference_data_with_named_dims():
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.05, emission="gaussian")
    data, sim = model.simulate(jax.random.PRNGKey(1), 2, 10)
    params = {k: np.asarray(v) for k, v in sim["params"].items() if k != "x"}
    gibbs = sample_path_gibbs(model, data, params, np.asarray(sim["latents"]), num_draws=4, burn_in=2, thin=1,
                              partition_steps=2)
    np.testing.assert_array_equal(gibbs.kept_sweeps, [2, 3, 4, 5])
    assert gibbs.path_sd.shape == gibbs.path_mean.shape and np.all(gibbs.path_sd >= 0)
    from ppl_switch.results import get_group

    idata = gibbs.to_inference_data(model, data)
    post = get_group(idata, "posterior")
    assert post["regime_matrix"].shape == (1, 4, 2, 2, 2)
    np.testing.assert_allclose(post["temperature"].values[0], gibbs.samples["temperature"])
    assert get_group(idata, "path")["x_mean"].dims == ("trial", "time", "latent")
    np.testing.assert_allclose(get_group(idata, "sample_stats")["path_acceptance"].values[0],
                               gibbs.path_acceptance[2:].mean(-1))
