"""Tests of the 3-level mixture GDM (paper eq. 2.2 with latent noise / App. C): program vs a NumPy
oracle, the one-hot (SLDS) limit, simulate -> fit_svi, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy.special import gammaln, logsumexp, softmax
from scipy.stats import norm

from ppl_switch.data import DataError
from ppl_switch.guides.gdm_guides import MixtureGuide
from ppl_switch.models import get_model
from ppl_switch.models.gdm_mixture import GDMMixture

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def concrete_logpdf(z, logits, tau):
    k = len(z)
    logits = logits - logsumexp(logits)
    return gammaln(k) + (k - 1) * np.log(tau) + np.sum(logits - (tau + 1) * np.log(z)) - k * logsumexp(logits - tau * np.log(z))


def program_log_joint(model, data, values, tau):
    """log p(params, z, x, y) of the program, one compiled call (eager op-by-op dispatch is slow)."""
    return float(jax.jit(lambda v, t: log_density(model.program, (data,), {"temperature": t}, v)[0])(values, tau))


def numpy_log_joint(model, params, z, x, y, obs_mask, lengths, tau):
    """Oracle, a loop over trials and steps of eq. 2.2 with latent noise:
    log p(params) + sum_t [log GS(z_t | pi_t) + log N(x_t | sum_k z_tk (A_k x_{t-1} + c_k), Q(z_t))
    + log N(y_t | C x_t + d, R)], N(0, I) on padded x."""
    p = {k: np.asarray(v, dtype=float) for k, v in params.items()}
    total = 0.0
    for name, value in p.items():
        loc, scale = model._prior_loc_scale(name)
        total += norm.logpdf(value, loc, scale).sum()
    gamma = float(p["stickiness"]) if model.sticky else 0.0
    q = np.exp(p["log_latent_var"])
    for i in range(y.shape[0]):
        for t in range(y.shape[1]):
            if t >= lengths[i]:
                total += norm.logpdf(x[i, t]).sum()
                continue
            if t == 0:
                logits, mean = p["init_logits"], z[i, 0] @ p["init_mean"]
            else:
                logits = (1 - gamma) * (p["transition_weights"] @ x[i, t - 1] + p["transition_bias"]) + gamma * z[i, t - 1]
                mean = sum(z[i, t, k] * (p["dynamics"][k] @ x[i, t - 1] + p["offsets"][k]) for k in range(model.num_states))
            var = z[i, t] @ q if model.state_noise else q
            total += concrete_logpdf(z[i, t], logits, tau)
            total += norm.logpdf(x[i, t], mean, np.sqrt(var)).sum()
            y_mean = p["emission_matrix"] @ x[i, t] + p["emission_bias"]
            lp = norm.logpdf(y[i, t], y_mean, np.exp(0.5 * p["log_obs_var"]))
            total += lp[obs_mask[i, t]].sum()
    return total


@pytest.fixture(scope="module")
def tiny():
    """2 trials, T = 4 (the second of length 3), one missing entry; K = 2, D = 2, N = 3."""
    rng = np.random.default_rng(0)
    model = GDMMixture(num_states=2, latent_dim=2, obs_dim=3, temperature=0.7)
    params = {k: jnp.asarray(v + 0.3 * rng.standard_normal(np.shape(v))) for k, v in model.init_params(rng, 3).items()}
    y = rng.standard_normal((2, 4, 3))
    mask = np.ones_like(y, bool)
    mask[0, 2, 1] = False
    data = model.prepare(y, mask=mask, lengths=np.array([4, 3]))
    z = rng.dirichlet(np.ones(2), (2, 4))
    x = rng.standard_normal((2, 4, 2))
    return model, params, data, z, x


def test_program_log_joint_matches_numpy_equations(tiny):
    model, params, data, z, x = tiny
    for tau in (0.7, 0.3):
        lp = program_log_joint(model, data, dict(params, z=jnp.asarray(z), x=jnp.asarray(x)), tau)
        oracle = numpy_log_joint(model, params, z, x, np.asarray(data.y), np.asarray(data.mask), np.asarray(data.lengths), tau)
        np.testing.assert_allclose(lp, oracle, rtol=1e-9)


def test_shared_noise_and_nonsticky_variant_match_numpy(tiny):
    _, _, data, z, x = tiny
    rng = np.random.default_rng(1)
    model = GDMMixture(num_states=2, latent_dim=2, obs_dim=3, sticky=False, state_noise=False)
    params = {k: jnp.asarray(v) for k, v in model.init_params(rng, 3).items()}
    assert params["log_latent_var"].shape == (2,) and "stickiness" not in params
    lp = program_log_joint(model, data, dict(params, z=jnp.asarray(z), x=jnp.asarray(x)), 0.99)
    oracle = numpy_log_joint(model, params, z, x, np.asarray(data.y), np.asarray(data.mask), np.asarray(data.lengths), 0.99)
    np.testing.assert_allclose(lp, oracle, rtol=1e-9)


def test_one_hot_states_give_the_slds_dynamics_density(tiny):
    """With one-hot z (the tau -> 0 limit) log p(x | z) is the SLDS density
    N(x_1 | mu_s1, Q_s1) prod_t N(x_t | A_st x_{t-1} + c_st, Q_st), written here with full-covariance
    NumPy Gaussians (scipy multivariate_normal) and no mixing."""
    from scipy.stats import multivariate_normal

    model, params, data, _, x = tiny
    p = {k: np.asarray(v) for k, v in params.items()}
    states = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
    z = np.eye(2)[states]
    got = np.asarray(model.latent_log_prob(params, jnp.asarray(z), jnp.asarray(x), jnp.ones((2, 4), bool)))
    for i in range(2):
        want = 0.0
        for t in range(4):
            s = states[i, t]
            mean = p["init_mean"][s] if t == 0 else p["dynamics"][s] @ x[i, t - 1] + p["offsets"][s]
            want += multivariate_normal(mean, np.diag(np.exp(p["log_latent_var"][s]))).logpdf(x[i, t])
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_small_temperature_transitions_become_the_recurrent_categorical(tiny):
    """As tau -> 0 the argmax of z_t ~ GS(pi_t, tau) is Categorical(softmax(pi_t)) with
    pi_t = (1 - gamma)(R x_{t-1} + r) + gamma e_{s_{t-1}}: the recurrent-SLDS transition; samples are one-hot."""
    model, params, data, _, x = tiny
    z_prev = np.eye(2)[np.array([[0, 1, 0, 1], [1, 0, 1, 0]])]
    chain = model.state_prior(params, jnp.asarray(x), data.time_mask, temperature=0.02)
    logits = np.asarray(chain.logits(jnp.asarray(z_prev)))
    draw = jax.jit(jax.vmap(lambda k: model.state_prior(params, jnp.asarray(x), data.time_mask, 0.02).sample(k)))
    samples = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 4000)))
    assert np.mean(samples.max(-1) > 0.99) > 0.95
    # one step at a time with the previous state pinned: rebuild each step's logits from the model's formula
    gamma = float(params["stickiness"])
    drive = x[:, :-1] @ np.asarray(params["transition_weights"]).T + np.asarray(params["transition_bias"])
    want_logits = (1 - gamma) * drive + gamma * z_prev[:, :-1]
    np.testing.assert_allclose(logits[:, 1:], want_logits, rtol=1e-10)
    # Gumbel-max frequencies of the first step (no coupling) match softmax(pi_1)
    freq = np.mean(samples[:, 0, 0].argmax(-1) == 0)
    assert abs(freq - softmax(np.asarray(params["init_logits"]))[0]) < 0.03


def test_simulate_shapes_and_input_errors():
    model = get_model("gdm_mixture", num_states=3, latent_dim=2, obs_dim=4)
    data, truth = model.simulate(jax.random.PRNGKey(1), 2, 25)
    assert data.y.shape == (2, 25, 4) and truth["latents"].shape == (2, 25, 2) and truth["soft_states"].shape == (2, 25, 3)
    np.testing.assert_allclose(np.asarray(truth["soft_states"]).sum(-1), 1.0, atol=1e-6)
    # y really is C x + d + noise: residual variance close to sigma^2 = exp(-2)
    resid = np.asarray(data.y) - np.asarray(truth["latents"]) @ np.asarray(truth["params"]["emission_matrix"]).T
    assert 0.6 < resid.var() / np.exp(-2.0) < 1.6
    with pytest.raises(DataError, match="inputs"):
        model.prepare(np.zeros((1, 5, 4)), inputs=np.zeros((1, 5, 1)))
    with pytest.raises(ValueError, match="emission"):
        GDMMixture(emission="bernoulli")
    with pytest.raises(DataError, match="num_states"):
        GDMMixture(num_states=0)
    with pytest.raises(ValueError, match="obs_dim"):
        GDMMixture(obs_dim=None).simulate(jax.random.PRNGKey(0), 1, 5)
    with pytest.raises(ValueError, match="not an option"):
        get_model("gdm_mixture", input_dim=1)


def test_simulate_then_fit_svi_gives_finite_losses_and_inference_data():
    from ppl_switch.infer.svi import fit_svi

    model = GDMMixture(num_states=2, latent_dim=2, obs_dim=3)
    data, _ = model.simulate(jax.random.PRNGKey(0), 2, 20)
    fit = fit_svi(model, data, num_steps=30, num_draws=4, progress_bar=False, seed=0)
    assert fit.losses.shape == (30,) and np.all(np.isfinite(fit.losses))
    assert fit.losses[-5:].mean() < fit.losses[:5].mean()
    post = fit.idata.posterior
    assert post["x"].dims[-3:] == ("trial", "time", "latent") and post["x"].shape[-3:] == (2, 20, 2)
    np.testing.assert_allclose(post["z"].sum("state").values, 1.0, atol=1e-6)
    assert "log_likelihood" in fit.idata.groups() and "posterior_predictive" in fit.idata.groups()


def test_mixture_guide_encodes_new_trials_without_optimisation(tiny):
    model, params, data, _, _ = tiny
    guide = MixtureGuide(model)
    svi_params = {k: jnp.asarray(v) for k, v in guide.init_values(3).items()}
    z = guide.encode(svi_params, data, jax.random.PRNGKey(0), num_samples=3)
    assert z.shape == (3, 2, 4, 2)
    np.testing.assert_allclose(np.asarray(z).sum(-1), 1.0, atol=1e-6)


@pytest.mark.slow
def test_standard_nascar_recovery():
    """Standard NASCAR (train generator seed 0, test seed 1, same C), K = 4, D = 2, GS-BBVI settings of
    the 2-level model; the test trial is encoded with x = pinv(C)(y - d), no optimisation."""
    from ppl_switch.analysis.gdm_metrics import inferred_state_accuracy
    from ppl_switch.datasets.nascar import nascar
    from ppl_switch.infer.gdm_svi import fit_gdm_svi, soft_states

    tr = nascar(0)
    te = nascar(1, emission_matrix=tr.params["emission_matrix"])
    model = GDMMixture(num_states=4, latent_dim=2, obs_dim=10)
    fit = fit_gdm_svi(model, tr.y, guide=MixtureGuide(model, seed=0), seed=0)
    dte = model.prepare(te.y)
    acc = inferred_state_accuracy(soft_states(fit)[0], tr.states, soft_states(fit, dte)[0], te.states)
    assert acc > 0.75


def test_latent_mean_path_is_eq_2_2_deterministic_x(tiny):
    """Given z only, x is eq. 2.2's deterministic path x_1 = z_1 . mu, x_t = sum_k z_tk (A_k x_{t-1} + c_k)."""
    model, params, _, z, _ = tiny
    p = {k: np.asarray(v) for k, v in params.items()}
    got = np.asarray(model.latent_mean_path(params, jnp.asarray(z)))
    for i in range(z.shape[0]):
        x = z[i, 0] @ p["init_mean"]
        np.testing.assert_allclose(got[i, 0], x, rtol=1e-10)
        for t in range(1, z.shape[1]):
            x = sum(z[i, t, k] * (p["dynamics"][k] @ x + p["offsets"][k]) for k in range(model.num_states))
            np.testing.assert_allclose(got[i, t], x, rtol=1e-10)
