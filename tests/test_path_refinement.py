"""MAP path refinement for latent-SDE fits: the L-BFGS path against the exact mode of a linear-Gaussian
case, and the SVI -> MAP path -> SVI runner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.infer.path_refinement import fit_svi_with_path_refinement, map_path, split_step_optimizer
from ppl_switch.models.gpslds import GPSLDS
from ppl_switch.models.hmm import HMM

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


@pytest.fixture(scope="module")
def linear_gaussian():
    """One regime (f linear) with Gaussian emissions: the log joint is quadratic in the path."""
    model = GPSLDS(num_states=1, latent_dim=2, obs_dim=3, dt=0.05, emission="gaussian")
    data, truth = model.simulate(jax.random.PRNGKey(0), 2, 25)
    params = {k: np.asarray(v) for k, v in truth["params"].items() if k != "x"}
    return model, data, params, np.asarray(truth["latents"])


def test_map_path_is_the_exact_mode_of_a_linear_gaussian_path(linear_gaussian):
    model, data, params, latents = linear_gaussian
    jd = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    theta = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}

    def negative_log_joint(flat):
        x = flat.reshape(latents.shape)
        return -(jnp.sum(model.path_distribution(theta, jd).log_prob(x)) + jnp.sum(model.emission_log_prob(theta, x, jd)))

    # quadratic: one Newton step from anywhere is the mode
    start = np.zeros(latents.size)
    mode = start - np.linalg.solve(jax.hessian(negative_log_joint)(start), jax.grad(negative_log_joint)(start))
    path, info = map_path(model, params, data, np.zeros_like(latents), tolerance=1e-12, max_iters=3000)
    np.testing.assert_allclose(path.reshape(-1), mode, atol=1e-5)
    assert info["log_joint"] > info["start_log_joint"]
    np.testing.assert_allclose(info["log_joint"], -negative_log_joint(mode), rtol=1e-9)


def test_map_path_rejects_bad_input(linear_gaussian):
    model, data, params, latents = linear_gaussian
    with pytest.raises(ValueError, match="init_path"):
        map_path(model, params, data, latents[:, :-1])
    with pytest.raises(TypeError, match="latent-SDE model"):
        map_path(HMM(num_states=2), params, data, latents)
    with pytest.raises(ValueError, match="max_iters"):
        map_path(model, params, data, latents, max_iters=0)


def test_refinement_runner_stages(linear_gaussian):
    """SVI, one MAP path step (which raises the log joint above the fitted mean path's), SVI again from
    that path; the history says so."""
    model, data, _, _ = linear_gaussian
    fit, guide, history = fit_svi_with_path_refinement(model, data, num_steps=40, refine_steps=20, num_rounds=1,
                                                       num_draws=5, map_iters=200)
    assert [h["stage"] for h in history] == ["svi", "map_path", "svi"]
    assert history[1]["log_joint"] >= history[1]["start_log_joint"]
    assert np.all(np.isfinite(np.asarray(fit.losses))) and len(fit.losses) == 20
    assert guide.init_values["x"].shape == (2, 25, 2)


def test_split_step_optimizer_moves_the_mean_path_at_its_own_step_size():
    """Adam's first step moves every coordinate by its step size (the gradient's sign): x_mean by the path
    step, every other guide parameter by the common one."""
    params = {"x_mean": jnp.zeros((2, 5, 2)), "x_drift_matrices": jnp.zeros((2, 4, 2, 2)), "auto_loc": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01), params)  # small: no clipping
    opt = split_step_optimizer(0.02, 0.002)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["x_mean"], -0.002, rtol=1e-4)
    np.testing.assert_allclose(updates["x_drift_matrices"], -0.02, rtol=1e-4)
    np.testing.assert_allclose(updates["auto_loc"], -0.02, rtol=1e-4)


def test_refinement_runner_with_a_path_step_size(linear_gaussian):
    model, data, _, _ = linear_gaussian
    with pytest.raises(ValueError, match="path_learning_rate"):
        fit_svi_with_path_refinement(model, data, num_steps=10, path_learning_rate=-1.0)
    fit, guide, history = fit_svi_with_path_refinement(model, data, num_steps=40, refine_steps=20, num_rounds=1,
                                                       path_learning_rate=0.0005, num_draws=5, map_iters=200)
    assert [h["stage"] for h in history] == ["svi", "map_path", "svi"]
    assert np.all(np.isfinite(np.asarray(fit.losses)))
    # Adam moves a coordinate by at most about (1 - b1) / sqrt(1 - b2) ~ 3.2 step sizes per step: the mean
    # path stays within 20 * 3.2 * 0.0005 of the MAP path it started from (0.14 with one step size of 0.02)
    moved = np.abs(np.asarray(fit.params["x_mean"]) - guide.init_values["x"]).max()
    assert moved < 20 * 3.2 * 0.0005
