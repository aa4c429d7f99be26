"""The baseline models (HMM, ARHMM, LDS) against brute-force and dense-Gaussian oracles.

Oracles are written here from the definitions, independently of the models' code paths:
enumeration over every state path (K^T of them) with SciPy densities, and the dense joint Gaussian
of an LDS built by stacking the latent path.
"""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from ppl_switch.data import DataError
from ppl_switch.models import ARHMM, HMM, LDS, MODELS, get_model

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

T_SMALL = 5


def _mask_with_gaps(shape, seed):
    """A mask with one fully missing step and some missing entries, never hiding a whole trial."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) > 0.25
    mask[:, 0] = True
    mask[:, 2] = False
    return mask


def _emission_logpdf(model: HMM, params, y_t, m_t, k):
    """log p(observed entries of y_t | z_t = k), by SciPy."""
    if not m_t.any():
        return 0.0
    if model.emission == "poisson":
        return stats.poisson.logpmf(y_t[m_t], np.asarray(params["rates"])[k][m_t]).sum()
    mean = np.asarray(params["means"])[k]
    if model.emission == "diag_gaussian":
        return stats.norm.logpdf(y_t[m_t], mean[m_t], np.asarray(params["scales"])[k][m_t]).sum()
    L = np.asarray(params["scale_tril"])[k]
    cov = (L @ L.T)[np.ix_(m_t, m_t)]
    return stats.multivariate_normal.logpdf(y_t[m_t], mean[m_t], cov)


def _brute_force_hmm(model, params, y, mask, step_logpdf):
    """log p(y_{0:t}) for every prefix t, posterior marginals (T, K) and the MAP path, by enumeration."""
    K, T = model.num_states, y.shape[0]
    pi, P = np.asarray(params["initial_probs"]), np.asarray(params["transition_matrix"])
    emis = np.array([[step_logpdf(t, k) for k in range(K)] for t in range(T)])
    paths = np.array(list(itertools.product(range(K), repeat=T)))
    log_prior = np.log(pi[paths[:, 0]]) + np.log(P[paths[:, :-1], paths[:, 1:]]).sum(1)
    log_joint_steps = emis[np.arange(T), paths]  # (paths, T)
    prefix = []
    for t in range(T):
        # marginal of the prefix: sum over paths of the first t+1 states (others sum to one)
        sub = np.array(list(itertools.product(range(K), repeat=t + 1)))
        lp = np.log(pi[sub[:, 0]]) + (np.log(P[sub[:, :-1], sub[:, 1:]]).sum(1) if t else 0.0)
        lp = lp + emis[np.arange(t + 1), sub].sum(1)
        prefix.append(np.logaddexp.reduce(lp))
    log_joint = log_prior + log_joint_steps.sum(1)
    w = np.exp(log_joint - np.logaddexp.reduce(log_joint))
    marginals = np.stack([np.bincount(paths[:, t], weights=w, minlength=K) for t in range(T)])
    return np.array(prefix), marginals, paths[np.argmax(log_joint)]


@pytest.mark.parametrize("emission", ["gaussian", "diag_gaussian", "poisson"])
def test_hmm_matches_enumeration(emission):
    model = HMM(num_states=3, obs_dim=3, emission=emission)
    data, truth = model.simulate(jax.random.PRNGKey(1), 2, T_SMALL)
    params = truth["params"]
    mask = _mask_with_gaps(data.y.shape, 0)
    data = model.prepare(data.y, mask=mask)
    ll = np.asarray(jax.jit(model.log_likelihood)(params, data))
    post = jax.jit(model.state_posterior)(params, data)
    for n in range(2):
        y, m = np.asarray(data.y[n]), mask[n]
        prefix, marginals, map_path = _brute_force_hmm(
            model, params, y, m, lambda t, k: _emission_logpdf(model, params, y[t], m[t], k)
        )
        # per-step predictive log-likelihoods accumulate to every prefix's marginal likelihood
        np.testing.assert_allclose(np.cumsum(ll[n]), prefix, rtol=1e-9, atol=1e-9)
        assert ll[n, 2] == 0.0  # the fully missing step
        np.testing.assert_allclose(np.asarray(post["state_probs"][n]), marginals, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(post["viterbi"][n]), map_path)


def test_arhmm_matches_enumeration():
    model = ARHMM(num_states=2, obs_dim=2, lags=2, input_dim=1)
    data, truth = model.simulate(jax.random.PRNGKey(2), 1, T_SMALL + 1)
    params = truth["params"]
    mask = np.ones(data.y.shape, bool)
    mask[0, 3, 1] = False  # partly observed step: step 3 is scored on coordinate 0; 4 and 5 lose a predictor
    data = model.prepare(data.y, mask=mask, inputs=data.inputs)
    y, u = np.asarray(data.y[0]), np.asarray(data.inputs[0])
    A, b, V = (np.asarray(params[k]) for k in ("ar_weights", "biases", "input_weights"))
    L = np.asarray(params["scale_tril"])

    def step_logpdf(t, k):
        m_t = mask[0, t]
        if t < model.lags:
            return stats.norm.logpdf(y[t], params["initial_mean"], params["initial_scales"]).sum()
        if not mask[0, t - model.lags : t].all():
            return 0.0  # documented: a step with a missing predictor is not scored
        mean = sum(A[k, l] @ y[t - 1 - l] for l in range(model.lags)) + b[k] + V[k] @ u[t]
        cov = (L[k] @ L[k].T)[np.ix_(m_t, m_t)]
        return stats.multivariate_normal.logpdf(y[t][m_t], mean[m_t], cov)

    prefix, marginals, _ = _brute_force_hmm(model, params, y, mask[0], step_logpdf)
    ll = np.asarray(jax.jit(model.log_likelihood)(params, data))[0]
    np.testing.assert_allclose(np.cumsum(ll), prefix, rtol=1e-9)
    assert ll[4] == 0.0 and ll[5] == 0.0 and ll[3] != 0.0
    np.testing.assert_allclose(np.asarray(jax.jit(model.state_posterior)(params, data)["state_probs"][0]), marginals, atol=1e-9)


def _dense_lds_logpdf(params, y, mask, inputs):
    """log p(observed y) of one trial from the dense joint Gaussian of the stacked path (numpy)."""
    A, b, C, d = (np.asarray(params[k]) for k in ("dynamics_matrix", "dynamics_bias", "emission_matrix", "emission_bias"))
    m0, r = np.asarray(params["initial_mean"]), np.asarray(params["emission_scales"])
    T, H = y.shape[0], A.shape[0]
    B = np.asarray(params.get("dynamics_input_weights", np.zeros((H, 0))))
    F = np.asarray(params.get("emission_input_weights", np.zeros((y.shape[1], 0))))
    u = np.zeros((T, 0)) if inputs is None else inputs
    # x_t = mean_t + sum_{s<=t} A^{t-s} w_s with w ~ N(0, I) (w_0 is the initial noise)
    means = [m0]
    for t in range(1, T):
        means.append(A @ means[-1] + b + B @ u[t])
    mean_x = np.concatenate(means)
    G = np.zeros((T * H, T * H))
    for t in range(T):
        for s in range(t + 1):
            G[t * H : (t + 1) * H, s * H : (s + 1) * H] = np.linalg.matrix_power(A, t - s)
    Cbig = np.kron(np.eye(T), C)
    mean_y = Cbig @ mean_x + np.tile(d, T) + (u @ F.T).reshape(-1)
    cov_y = Cbig @ G @ G.T @ Cbig.T + np.diag(np.tile(r**2, T))
    keep = mask.reshape(-1)
    return stats.multivariate_normal.logpdf(y.reshape(-1)[keep], mean_y[keep], cov_y[np.ix_(keep, keep)])


@pytest.mark.parametrize("input_dim", [0, 2])
def test_lds_matches_dense_gaussian(input_dim):
    model = LDS(latent_dim=2, obs_dim=3, input_dim=input_dim)
    data, truth = model.simulate(jax.random.PRNGKey(3), 2, 6)
    params = truth["params"]
    mask = _mask_with_gaps(data.y.shape, 1)
    data = model.prepare(data.y, mask=mask, inputs=data.inputs)
    ll = np.asarray(jax.jit(model.log_likelihood)(params, data))
    for n in range(2):
        u = None if data.inputs is None else np.asarray(data.inputs[n])
        for t in range(1, 7):  # every prefix: the per-step terms are the one-step predictive densities
            dense = _dense_lds_logpdf(params, np.asarray(data.y[n, :t]), mask[n, :t], None if u is None else u[:t])
            np.testing.assert_allclose(ll[n, :t].sum(), dense, rtol=1e-9)
    np.testing.assert_allclose(ll.sum(1), np.asarray(jax.jit(model.marginal_log_likelihood)(params, data)), rtol=1e-9)


def test_lds_latent_posterior_matches_dense_conditioning():
    model = LDS(latent_dim=2, obs_dim=2)
    data, truth = model.simulate(jax.random.PRNGKey(4), 1, 5)
    params = truth["params"]
    post = jax.jit(model.latent_posterior)(params, data)
    A, C, m0 = (np.asarray(params[k]) for k in ("dynamics_matrix", "emission_matrix", "initial_mean"))
    d, r = np.asarray(params["emission_bias"]), np.asarray(params["emission_scales"])
    T, H = 5, 2
    G = np.zeros((T * H, T * H))
    for t in range(T):
        for s in range(t + 1):
            G[t * H : (t + 1) * H, s * H : (s + 1) * H] = np.linalg.matrix_power(A, t - s)
    mean_x = np.concatenate([np.linalg.matrix_power(A, t) @ m0 for t in range(T)])
    Sxx = G @ G.T
    Cbig = np.kron(np.eye(T), C)
    Syy = Cbig @ Sxx @ Cbig.T + np.diag(np.tile(r**2, T))
    gain = Sxx @ Cbig.T @ np.linalg.inv(Syy)
    post_mean = mean_x + gain @ (np.asarray(data.y[0]).reshape(-1) - Cbig @ mean_x - np.tile(d, T))
    post_cov = Sxx - gain @ Cbig @ Sxx
    np.testing.assert_allclose(np.asarray(post["means"][0]).reshape(-1), post_mean, atol=1e-8)
    for t in range(T):
        np.testing.assert_allclose(np.asarray(post["covs"][0, t]), post_cov[t * H : (t + 1) * H, t * H : (t + 1) * H], atol=1e-8)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("hmm", dict(num_states=3, obs_dim=2), "states"),
        ("hmm", dict(num_states=2, obs_dim=4, emission="poisson"), "states"),
        ("arhmm", dict(num_states=2, obs_dim=3, lags=2, input_dim=1), "states"),
        ("lds", dict(latent_dim=3, obs_dim=4, input_dim=2), "latents"),
    ],
)
def test_simulators_give_documented_shapes(name, kwargs, key):
    model = get_model(name, **kwargs)
    data, truth = model.simulate(jax.random.PRNGKey(0), 3, 7)
    assert data.y.shape == (3, 7, kwargs["obs_dim"])
    assert data.mask.all() and list(data.lengths) == [7, 7, 7]
    assert (data.inputs is None) == (model.input_dim == 0)
    if model.input_dim:
        assert data.inputs.shape == (3, 7, model.input_dim)
    expected = (3, 7) if key == "states" else (3, 7, kwargs["latent_dim"])
    assert truth[key].shape == expected
    if key == "states":
        assert truth[key].min() >= 0 and truth[key].max() < kwargs["num_states"]
    replicate = jax.jit(model.posterior_predictive)(jax.random.PRNGKey(1), truth["params"], data)
    assert replicate.shape == data.y.shape and np.isfinite(np.asarray(replicate)).all()
    # same seed, same numbers
    again, _ = model.simulate(jax.random.PRNGKey(0), 3, 7)
    np.testing.assert_array_equal(again.y, data.y)


def test_poisson_simulation_gives_counts_and_validates_data():
    model = HMM(num_states=2, obs_dim=3, emission="poisson")
    data, _ = model.simulate(jax.random.PRNGKey(0), 2, 30)
    assert np.all(data.y == np.round(data.y)) and data.y.min() >= 0
    with pytest.raises(DataError, match="Poisson"):
        model.prepare(data.y + 0.5)
    with pytest.raises(DataError, match="Poisson"):
        model.prepare(-data.y - 1)


def test_permute_states_relabels_consistently():
    for model in (HMM(num_states=3, obs_dim=2), ARHMM(num_states=3, obs_dim=2)):
        data, truth = model.simulate(jax.random.PRNGKey(5), 2, 12)
        params, perm = truth["params"], np.array([2, 0, 1])
        relabelled = model.permute_states(params, perm)
        ll_fn, post_fn = jax.jit(model.log_likelihood), jax.jit(model.state_posterior)
        np.testing.assert_allclose(ll_fn(relabelled, data), ll_fn(params, data), rtol=1e-10)
        probs = post_fn(params, data)["state_probs"]
        probs_new = post_fn(relabelled, data)["state_probs"]
        np.testing.assert_allclose(probs_new, np.asarray(probs)[..., perm], atol=1e-10)
        np.testing.assert_allclose(model.state_features(relabelled), model.state_features(params)[perm])


def test_lds_invariants_are_rotation_invariant():
    model = LDS(latent_dim=2, obs_dim=3, input_dim=1)
    _, truth = model.simulate(jax.random.PRNGKey(6), 1, 4)
    p = truth["params"]
    th = 0.7
    O = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    rotated = dict(p)
    rotated["dynamics_matrix"] = O @ p["dynamics_matrix"] @ O.T
    rotated["dynamics_bias"] = O @ p["dynamics_bias"]
    rotated["initial_mean"] = O @ p["initial_mean"]
    rotated["emission_matrix"] = p["emission_matrix"] @ O.T
    rotated["dynamics_input_weights"] = O @ p["dynamics_input_weights"]
    data, _ = model.simulate(jax.random.PRNGKey(7), 2, 8, params=p)
    ll_fn = jax.jit(model.log_likelihood)
    np.testing.assert_allclose(ll_fn(rotated, data), ll_fn(p, data), rtol=1e-9)
    a, b = model.invariants(p), model.invariants(rotated)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12)


def test_registry_and_constructor_errors():
    assert set(MODELS) >= {"hmm", "arhmm", "lds"}
    with pytest.raises(ValueError, match="valid names are"):
        get_model("nope", num_states=2)
    with pytest.raises(ValueError, match="latent_dim: not an option of model 'hmm'"):
        get_model("hmm", num_states=2, latent_dim=3)
    with pytest.raises(ValueError, match="num_states"):
        HMM(num_states=0)
    with pytest.raises(ValueError, match="num_states"):
        ARHMM(num_states=1.5)
    with pytest.raises(ValueError, match="latent_dim"):
        LDS(latent_dim=0)
    with pytest.raises(ValueError, match="emission"):
        HMM(num_states=2, emission="gamma")
    with pytest.raises(ValueError, match="lags"):
        ARHMM(num_states=2, lags=0)
    with pytest.raises(ValueError, match="sticky"):
        HMM(num_states=2, sticky=-1.0)
    with pytest.raises(ValueError, match="obs_dim"):
        HMM(num_states=2).simulate(jax.random.PRNGKey(0), 1, 5)
    for name, cls in MODELS.items():
        model = get_model(name, **{k: v for k, v in cls(**_minimal(name)).config().items()})
        assert model.config() == cls(**_minimal(name)).config()


def _minimal(name):
    minimal = {
        "lds": dict(latent_dim=2, obs_dim=3),
        "clds": dict(latent_dim=2, obs_dim=3, input_dim=1),
        "slds": dict(num_states=2, latent_dim=2, obs_dim=3),
        "gdm": dict(num_states=2, latent_dim=2, obs_dim=3),
        "gpslds": dict(num_states=2, latent_dim=2, obs_dim=3),
        "gpsde": dict(latent_dim=2, obs_dim=3),
        "rslds": dict(num_states=2, latent_dim=2, obs_dim=3),
    }
    return minimal.get(name, dict(num_states=2, obs_dim=2))
