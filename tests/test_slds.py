"""SLDS: the collapsed path density against brute-force enumeration and funsor, the structured
mean-field EM (exactness in the degenerate cases, monotone objective, accuracy on the tutorial system),
the collapsed Gaussian-sum filter against exact enumeration, decoding, SVI/NUTS smoke runs, and errors."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.funsor import log_density as enum_log_density
from numpyro.contrib.funsor import enum, markov

from ppl_switch.data import DataError
from ppl_switch.datasets.slds_tutorial import simulate_slds_tutorial, tutorial_params
from ppl_switch.infer.slds_em import slds_em
from ppl_switch.models.slds import SLDS
from ppl_switch.ops import switching as sw
from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

def _accuracy(z_true, z_hat, K):
    return max(np.mean(np.asarray(perm)[z_hat] == z_true) for perm in itertools.permutations(range(K)))


def _random_params(model, seed=0):
    """A random (not default) parameter set in the model's site form (NumPy, no compilation)."""
    rng = np.random.default_rng(seed)
    K, D, N, U = model.num_states, model.latent_dim, model.obs_dim, model.input_dim
    p = {
        "initial_probs": rng.dirichlet(np.ones(K)),
        "transition_matrix": rng.dirichlet(np.ones(K) + 3 * np.eye(K)[0], size=K),
        "dynamics_matrix": np.eye(D) + 0.3 * rng.normal(size=(K, D, D)),
        "dynamics_bias": 0.3 * rng.normal(size=(K, D)),
        "dynamics_scales": rng.uniform(0.3, 1.0, size=(K, D)),
        "initial_mean": rng.normal(size=D),
        "initial_scales": rng.uniform(0.5, 1.5, size=D),
        "emission_bias": rng.normal(size=N),
        "emission_matrix": rng.normal(size=(N, D)),
        "emission_scales": rng.uniform(0.3, 1.0, size=N),
    }
    if D > 1:
        corr = [np.linalg.cholesky(np.corrcoef(rng.normal(size=(D, 3 * D)))) for _ in range(K)]
        p["dynamics_corr_chol"] = np.stack(corr)
    if U:
        p["dynamics_input_weights"] = rng.normal(size=(K, D, U))
    return p


def _brute_force_path_log_prob(model, params, x, data, trial):
    """log sum_z p(z) p(x | z), summing every regime path explicitly (valid steps only)."""
    T = int(data.lengths[trial])
    K = model.num_states
    A = np.asarray(params["dynamics_matrix"])
    L = np.asarray(model.dynamics_scale_trils(params))
    b = np.asarray(model._dynamics_biases(params, data))[trial]
    m0 = np.asarray(params["initial_mean"])
    S0 = np.diag(np.asarray(params["initial_scales"]) ** 2)
    from scipy.stats import multivariate_normal as mvn

    xt = np.asarray(x[trial])
    base = mvn(m0, S0).logpdf(xt[0])
    terms = []
    for path in itertools.product(range(K), repeat=T):
        lp = np.log(params["initial_probs"][path[0]])
        for t in range(1, T):
            k = path[t]
            lp += np.log(params["transition_matrix"][path[t - 1], k])
            lp += mvn(A[k] @ xt[t - 1] + b[t - 1, k], L[k] @ L[k].T).logpdf(xt[t])
        terms.append(lp)
    pad = -0.5 * np.sum(xt[T:] ** 2) - 0.5 * xt[T:].size * np.log(2 * np.pi)
    return base + np.logaddexp.reduce(terms) + pad


def test_path_density_equals_enumeration_over_all_regime_paths():
    model = SLDS(num_states=3, latent_dim=2, obs_dim=2, input_dim=1)
    params = _random_params(model, seed=1)
    rng = np.random.default_rng(0)
    T = 5
    data = model.prepare([rng.normal(size=(T, 2)), rng.normal(size=(3, 2))], inputs=[rng.normal(size=(T, 1)), rng.normal(size=(3, 1))])
    x = rng.normal(size=(2, T, 2))
    got = np.asarray(jax.jit(lambda p, d, x: model.path_distribution(p, d).log_prob(x))(params, data, jnp.asarray(x)))
    want = [_brute_force_path_log_prob(model, params, x, data, n) for n in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_path_density_equals_funsor_enumerated_program():
    model = SLDS(num_states=2, latent_dim=2, obs_dim=2)
    params = _random_params(model, seed=2)
    T = 4
    x = jnp.asarray(np.random.default_rng(1).normal(size=(T, 2)))
    A = jnp.asarray(params["dynamics_matrix"])
    b = jnp.asarray(params["dynamics_bias"])
    L = model.dynamics_scale_trils(params)

    def enumerated_program():  # z_t as enumerated discrete sites, the path observed
        numpyro.sample(
            "x_0", dist.MultivariateNormal(params["initial_mean"], scale_tril=jnp.diag(params["initial_scales"])), obs=x[0]
        )
        z = None
        for t in markov(range(T)):
            probs = params["initial_probs"] if t == 0 else jnp.asarray(params["transition_matrix"])[z]
            z = numpyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            if t > 0:
                loc = jnp.einsum("...ij,j->...i", A[z], x[t - 1]) + b[z]
                numpyro.sample(f"x_{t}", dist.MultivariateNormal(loc, scale_tril=L[z]), obs=x[t])

    want, _ = enum_log_density(enum(enumerated_program, first_available_dim=-1), (), {}, {})
    data = model.prepare(np.zeros((T, 2)))
    got = jax.jit(lambda p, d, x: model.path_distribution(p, d).log_prob(x))(params, data, x[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_program_log_density_is_priors_plus_path_plus_emissions():
    model = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    data, truth = model.simulate(jax.random.PRNGKey(0), 2, 6)
    params = truth["params"]
    from numpyro.infer.util import log_density

    @jax.jit
    def parts(params, data):
        total, trace = log_density(model.program, (data,), {}, params)
        path = jnp.sum(model.path_distribution(params, data).log_prob(params["x"]))
        emis = jnp.sum(model.emission_log_prob(params, params["x"], data))
        priors = sum(jnp.sum(site["fn"].log_prob(site["value"])) for name, site in trace.items()
                     if site["type"] == "sample" and name not in ("x", "y"))
        return total, priors + path + emis

    total, want = parts(params, data)
    np.testing.assert_allclose(total, want, rtol=1e-10)


def test_gamma_scale_prior_changes_only_the_dynamics_scale_term():
    from numpyro.infer.util import log_density

    half = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    gamma = SLDS(num_states=2, latent_dim=2, obs_dim=3, dynamics_scale_prior=("gamma", 4.0, 16.0))
    data, truth = half.simulate(jax.random.PRNGKey(1), 1, 5)
    params = truth["params"]
    s = jnp.asarray(params["dynamics_scales"])
    want = jnp.sum(dist.Gamma(4.0, 16.0).log_prob(s) - dist.HalfNormal(0.5).log_prob(s))
    got = log_density(gamma.program, (data,), {}, params)[0] - log_density(half.program, (data,), {}, params)[0]
    np.testing.assert_allclose(got, want, rtol=1e-8)
    # the choice survives the JSON sidecar (tuples come back as lists)
    assert SLDS(**json.loads(json.dumps(gamma.config()))).dynamics_scale_prior == ("gamma", 4.0, 16.0)
    # zero density at s = 0 is the point of the option: shape <= 1 is refused, by name
    with pytest.raises(ValueError, match="dynamics_scale_prior"):
        SLDS(num_states=2, latent_dim=2, dynamics_scale_prior=("gamma", 1.0, 2.0))
    with pytest.raises(ValueError, match="dynamics_scale_prior"):
        SLDS(num_states=2, latent_dim=2, dynamics_scale_prior="inverse_gamma")


def test_state_posterior_given_path_matches_enumeration():
    model = SLDS(num_states=2, latent_dim=1, obs_dim=1)
    params = _random_params(model, seed=3)
    T = 5
    rng = np.random.default_rng(2)
    data = model.prepare(rng.normal(size=(T, 1)))
    x = rng.normal(size=(1, T, 1))
    params["x"] = x
    out = jax.jit(model.state_posterior)(params, data)
    ll = np.asarray(jax.jit(model._regime_log_likelihoods)(params, data))[0]
    paths = sw.regime_paths(2, T)
    logw = np.asarray(sw.path_log_prior(jnp.asarray(paths), params["initial_probs"], params["transition_matrix"]))
    logw = logw + ll[np.arange(T), paths].sum(1)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    marg = np.stack([(w[:, None] * (paths == k)).sum(0) for k in range(2)], -1)
    np.testing.assert_allclose(out["state_probs"][0], marg, atol=1e-10)
    np.testing.assert_array_equal(out["viterbi"][0], paths[np.argmax(logw)])
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: model.sample_states(k, params, data)[0]))(keys))
    assert np.abs(draws.mean(0) - marg[:, 1]).max() < 0.15


# ---------------------------------------------------------------------------------------------------
# collapsed Gaussian-sum filter


def _switching_params(seed, K=2, D=2, N=3, same_regimes=False):
    rng = np.random.default_rng(seed)
    from ppl_switch.datasets.slds_tutorial import rotation

    A = np.stack([rotation(0.3 * (k + 1) * (-1) ** k, 0.9) for k in range(K)])
    Q = np.stack([(0.05 + 0.2 * k) * np.eye(D) for k in range(K)])
    b = rng.normal(size=(K, D)) * 0.3
    if same_regimes:
        A, Q, b = np.broadcast_to(A[0], A.shape), np.broadcast_to(Q[0], Q.shape), np.broadcast_to(b[0], b.shape)
    P = np.full((K, K), 0.2 / (K - 1))
    np.fill_diagonal(P, 0.8)
    return sw.SwitchingParams(
        jnp.full(K, 1.0 / K), jnp.asarray(P), jnp.array([1.0, 0.0]), 0.3 * jnp.eye(D), jnp.asarray(A), jnp.asarray(b),
        jnp.asarray(Q), jnp.asarray(rng.normal(size=(N, D))), jnp.zeros(N), jnp.diag(jnp.array([0.2, 0.3, 0.4])),
    )


@pytest.mark.parametrize("T", [1, 2])
def test_gaussian_sum_filter_is_exact_for_two_steps(T):
    p = _switching_params(0)
    rng = np.random.default_rng(T)
    y = jnp.asarray(rng.normal(size=(T, 3)))
    mask = jnp.asarray(rng.random((T, 3)) > 0.3)
    both = jax.jit(lambda y, m: (sw.gaussian_sum_filter(p, y, m).log_likelihood, sw.exact_log_likelihood_by_enumeration(p, y, m)))
    np.testing.assert_allclose(*both(y, mask), atol=1e-10)


def test_gaussian_sum_filter_is_exact_when_regimes_share_dynamics():
    p = _switching_params(1, same_regimes=True)
    y = jnp.asarray(np.random.default_rng(3).normal(size=(7, 3)))
    both = jax.jit(lambda y: (sw.gaussian_sum_filter(p, y).log_likelihood, sw.exact_log_likelihood_by_enumeration(p, y)))
    np.testing.assert_allclose(*both(y), atol=1e-9)


def test_gaussian_sum_filter_is_close_to_exact_enumeration():
    """On short series drawn from the tutorial system the collapse costs < 1% of log p(y)."""
    tp = tutorial_params()
    p = sw.SwitchingParams(*[jnp.asarray(tp[f]) for f in sw.SwitchingParams._fields])
    worst = 0.0
    gsf = jax.jit(lambda y: sw.gaussian_sum_filter(p, y).log_likelihood)
    exact_fn = jax.jit(lambda y: sw.exact_log_likelihood_by_enumeration(p, y))
    for seed in range(4):
        y = jnp.asarray(simulate_slds_tutorial(seed=seed, num_timesteps=8)["y"][0])
        approx, exact = float(gsf(y)), float(exact_fn(y))
        worst = max(worst, abs(approx - exact) / abs(exact))
    assert worst < 0.01


# ---------------------------------------------------------------------------------------------------
# structured mean-field EM


def test_chain_posterior_matches_dense_inverse():
    rng = np.random.default_rng(0)
    T, D = 5, 2
    J = np.zeros((T * D, T * D))
    for t in range(T):
        J[t * D : (t + 1) * D, t * D : (t + 1) * D] = 3 * np.eye(D)
    for t in range(T - 1):
        blk = rng.normal(size=(D, D)) * 0.5
        J[(t + 1) * D : (t + 2) * D, t * D : (t + 1) * D] = blk
        J[t * D : (t + 1) * D, (t + 1) * D : (t + 2) * D] = blk.T
    h = rng.normal(size=T * D)
    Jd = np.stack([J[t * D : (t + 1) * D, t * D : (t + 1) * D] for t in range(T)])
    Jl = np.stack([J[(t + 1) * D : (t + 2) * D, t * D : (t + 1) * D] for t in range(T - 1)])
    post = sw.gaussian_chain_posterior(jnp.asarray(Jd), jnp.asarray(Jl), jnp.asarray(h.reshape(T, D)))
    S = np.linalg.inv(J)
    np.testing.assert_allclose(post.means.ravel(), S @ h, atol=1e-12)
    np.testing.assert_allclose(post.covs, np.stack([S[t * D : (t + 1) * D, t * D : (t + 1) * D] for t in range(T)]), atol=1e-12)
    np.testing.assert_allclose(
        post.cross_covs, np.stack([S[(t + 1) * D : (t + 2) * D, t * D : (t + 1) * D] for t in range(T - 1)]), atol=1e-12
    )
    logZ = 0.5 * h @ S @ h - 0.5 * np.linalg.slogdet(J)[1] + 0.5 * T * D * np.log(2 * np.pi)
    np.testing.assert_allclose(post.log_normalizer, logZ, atol=1e-10)
    draws = jax.vmap(lambda k: sw.gaussian_chain_sample(k, jnp.asarray(Jd), jnp.asarray(Jl), jnp.asarray(h.reshape(T, D))))(
        jax.random.split(jax.random.PRNGKey(0), 4000)
    ).reshape(4000, -1)
    assert np.abs(np.cov(np.asarray(draws).T) - S).max() < 0.03


def test_q_x_potentials_are_the_expected_log_joint():
    """-x'Jx/2 + h'x differs from E_q(z)[log p(x, y | z)] by a constant in x (checks the q(z)-averaged
    precision form, including the extra precision sum_k g A_k'Q_k^-1 A_k - ...)."""
    from scipy.stats import multivariate_normal as mvn

    p = _switching_params(4)
    K, T = 2, 4
    rng = np.random.default_rng(5)
    gamma = rng.dirichlet(np.ones(K), size=T)
    y = rng.normal(size=(T, 3))
    mask = rng.random((T, 3)) > 0.3
    tm = np.ones(T, bool)
    b = jnp.broadcast_to(p.dynamics_biases, (T - 1, K, 2))
    sp = p._replace(dynamics_biases=b)
    Jd, Jl, h = sw.smf_x_potentials(sp, jnp.asarray(gamma), jnp.asarray(y), jnp.asarray(mask), jnp.asarray(tm))

    def expected_log_joint(x):
        lp = mvn(np.asarray(p.initial_mean), np.asarray(p.initial_cov)).logpdf(x[0])
        for t in range(T):
            o = mask[t]
            if o.any():
                C, R = np.asarray(p.emission_matrix)[o], np.asarray(p.emission_cov)[np.ix_(o, o)]
                lp += mvn(C @ x[t], R).logpdf(y[t, o])
            if t > 0:
                for k in range(K):
                    lp += gamma[t, k] * mvn(np.asarray(p.dynamics_matrices[k]) @ x[t - 1] + np.asarray(b[t - 1, k]), np.asarray(p.dynamics_covs[k])).logpdf(x[t])
        return lp

    def quadratic(x):
        val = -0.5 * np.einsum("ti,tij,tj->", x, Jd, x) - np.einsum("ti,tij,tj->", x[1:], Jl, x[:-1]) + np.sum(np.asarray(h) * x)
        return val

    diffs = [expected_log_joint(x) - quadratic(x) for x in rng.normal(size=(4, T, 2)) * 2]
    np.testing.assert_allclose(diffs, diffs[0], atol=1e-9)


def test_em_objective_is_exact_log_likelihood_when_inference_is_exact():
    """With K = 1 (or regimes sharing their dynamics) q(z) q(x) is the exact posterior, so the ELBO
    equals the Kalman marginal likelihood."""
    model = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    params = model.default_params(jax.random.PRNGKey(1))
    params["dynamics_matrix"] = np.broadcast_to(params["dynamics_matrix"][0], (2, 2, 2)).copy()
    data, _ = model.simulate(jax.random.PRNGKey(2), 1, 30, params=params)
    out, hist = slds_em(model, data, params=params, num_iters=3)
    sp = model.switching_params(params, data)
    lg = LGSSMParams(sp.initial_mean[0], sp.initial_cov[0], sp.dynamics_matrices[0, 0], sp.dynamics_biases[0, 0, 0],
                     sp.dynamics_covs[0, 0], sp.emission_matrix[0], sp.emission_bias[0], sp.emission_cov[0])
    exact = lgssm_filter(lg, jnp.asarray(data.y[0]), jnp.asarray(data.mask[0])).log_likelihood
    prior = model.em_log_prior_value(params, data.obs_dim)
    np.testing.assert_allclose(hist["log_likelihoods"][-1] - prior, exact, rtol=1e-9)


def test_em_objective_is_non_decreasing_and_padding_invariant():
    model = SLDS(num_states=2, latent_dim=2, obs_dim=3, input_dim=1)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(30, 1)), rng.normal(size=(20, 1))]
    data, _ = model.simulate(jax.random.PRNGKey(3), 2, 30, inputs=np.stack([inputs[0], np.r_[inputs[1], np.zeros((10, 1))]]), lengths=[30, 20])
    mask = np.asarray(data.mask).copy()
    mask[0, 5:9, 1] = False
    data = data._replace(mask=mask, y=np.where(mask, data.y, 0.0))
    _, hist = slds_em(model, data, key=jax.random.PRNGKey(0), num_iters=10, num_restarts=2)
    trace = hist["log_likelihoods"]
    assert np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1])), np.diff(trace).min()
    assert trace[-1] > trace[0]
    # the same trials unpadded give the same objective
    params = model.params_from_em(model.params_to_em(model.default_params(jax.random.PRNGKey(0))))
    padded = slds_em(model, data, params=params, num_iters=2)[1]["log_likelihoods"]
    ragged = model.prepare([data.y[0], data.y[1, :20]], mask=None, inputs=[data.inputs[0], data.inputs[1, :20]])
    ragged = ragged._replace(mask=np.asarray(ragged.mask) & np.asarray(mask[:, : ragged.y.shape[1]]))
    unpadded = slds_em(model, ragged, params=params, num_iters=2)[1]["log_likelihoods"]
    np.testing.assert_allclose(padded, unpadded, rtol=1e-10)


def test_em_start_fits_one_shared_lds_first():
    """The restarts' base: EM of one LDS (equal regimes, uniform q(z)); its objective never decreases and
    it moves the observation noise out of Q, where the least-squares start puts it."""
    from ppl_switch.infer.slds_em import _compiled_em, _single_lds_fit
    from ppl_switch.models.slds import em_initial_params

    sim = simulate_slds_tutorial(seed=0, num_timesteps=150)
    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2))
    data = model.prepare(sim["y"])
    base = {k: jnp.asarray(v) for k, v in em_initial_params(model, data, np.random.default_rng(0)).items()}
    learn = frozenset(sw.EM_GROUPS) - {"emission_matrix"}
    run = _compiled_em(learn, 30, True, True, False)
    args = (jnp.asarray(data.y), jnp.asarray(data.mask), jnp.asarray(data.time_mask), jnp.zeros((1, 150, 0)), model.em_prior(2))
    uniform = jnp.full((1, 1, 150, 2), 0.5)
    trace = run(jax.tree.map(lambda a: a[None], base), uniform, *args)[1]
    trace = np.asarray(trace[0])
    assert np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1])), np.diff(trace).min()
    fitted = _single_lds_fit(run, base, *args)
    for name in ("dynamics_matrices", "dynamics_biases", "dynamics_covs"):
        np.testing.assert_allclose(fitted[name][0], fitted[name][1], rtol=1e-12, atol=1e-12)
    # truth: Q = 0.03 I, R = 0.2 I; the least-squares start has Q ~ 0.35 I (noise in the dynamics)
    q0, q1 = np.trace(np.asarray(base["dynamics_covs"][0])) / 2, np.trace(np.asarray(fitted["dynamics_covs"][0])) / 2
    r1 = np.trace(np.asarray(fitted["emission_cov"])) / 2
    assert q0 > 0.2 and q1 < 0.1 and 0.1 < r1 < 0.3, (q0, q1, r1)


def test_em_known_parameters_recovers_tutorial_states():
    sim = simulate_slds_tutorial(seed=0, num_timesteps=150)
    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2))
    tp = tutorial_params()
    params = model.params_from_em({**tp, "input_matrices": np.zeros((2, 2, 0))})
    out, hist = slds_em(model, model.prepare(sim["y"]), params=params, num_iters=40)
    assert np.all(np.diff(hist["log_likelihoods"]) >= -1e-9)
    acc = _accuracy(sim["states"][0], out["q_state_probs"][0].argmax(-1), 2)
    assert acc > 0.85, acc


@pytest.mark.slow
def test_em_learned_parameters_segment_the_tutorial_series():
    """Learned parameters, tutorial T = 150 (seed 0): 0.78 measured (the single-LDS start); 0.53 without it."""
    sim = simulate_slds_tutorial(seed=0, num_timesteps=150)
    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2))
    out, hist = slds_em(model, model.prepare(sim["y"]), key=jax.random.PRNGKey(0), num_iters=100, num_restarts=4)
    trace = hist["log_likelihoods"]
    assert np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1]))
    assert _accuracy(sim["states"][0], out["q_state_probs"][0].argmax(-1), 2) > 0.7


@pytest.mark.slow
def test_em_learned_parameters_objective_is_monotone_and_beats_the_start():
    sim = simulate_slds_tutorial(seed=1, num_timesteps=150)
    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2))
    out, hist = slds_em(model, model.prepare(sim["y"]), key=jax.random.PRNGKey(0), num_iters=40, num_restarts=2)
    trace = hist["log_likelihoods"]
    assert np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1]))
    assert trace[-1] > trace[0]
    assert np.all(np.isfinite(out["x"])) and out["q_state_probs"].shape == (1, 150, 2)


def test_fit_em_returns_fit_with_states():
    from ppl_switch.infer import fit_em

    model = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    data, _ = model.simulate(jax.random.PRNGKey(5), 2, 20)
    fit = fit_em(model, data, num_iters=5, num_restarts=1, x64=True)
    assert fit.samples["x"].shape == (1, 1, 2, 20, 2)
    assert fit.samples["q_state_probs"].shape == (1, 1, 2, 20, 2)
    assert np.isfinite(fit.losses).all()


# ---------------------------------------------------------------------------------------------------
# runners (smoke) and errors


@pytest.mark.slow
@pytest.mark.parametrize("path_parameterisation", ["centred", "whitened", "anchored"])
def test_svi_with_gauss_markov_guide_runs_and_decodes(path_parameterisation):
    from ppl_switch.infer import fit_svi

    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2), path_parameterisation=path_parameterisation)
    sim = simulate_slds_tutorial(seed=2, num_timesteps=40)
    guide = model.default_guide(sim["y"])
    fit = fit_svi(model, sim["y"], guide=guide, num_steps=200, learning_rate=0.02, num_draws=20, x64=True, progress_bar=False)
    assert np.isfinite(fit.losses).all()
    assert fit.losses[-20:].mean() < fit.losses[:20].mean()
    assert fit.samples["x"].shape == (1, 20, 1, 40, 2)


@pytest.mark.slow
@pytest.mark.parametrize("path_parameterisation, scale_coordinates",
                         [("centred", "direct"), ("whitened", "direct"), ("anchored", "direct"), ("anchored", "path_relative")])
def test_nuts_smoke(path_parameterisation, scale_coordinates):
    from ppl_switch.infer import fit_nuts

    model = SLDS(num_states=2, latent_dim=2, obs_dim=2, emission_matrix=np.eye(2), path_parameterisation=path_parameterisation,
                 dynamics_scale_coordinates=scale_coordinates)
    sim = simulate_slds_tutorial(seed=2, num_timesteps=30)
    init = model.init_values(sim["y"])
    fit = fit_nuts(model, sim["y"], num_warmup=50, num_samples=50, init_params={k: v for k, v in init.items()}, progress_bar=False, x64=True)
    assert fit.samples["x"].shape == (2, 50, 1, 30, 2)  # fit_nuts's default: 2 chains
    # the path (and the scales) are deterministic images of the sampled coordinates
    data = model.prepare(sim["y"])
    draw = {k: v[0, -1] for k, v in fit.samples.items()}
    for name, value in model.coordinate_site_values(draw, data).items():
        np.testing.assert_allclose(value, draw[name], atol=1e-8)
    assert "dynamics_scales" in fit.idata.posterior


def test_whitened_path_is_an_exact_change_of_variables():
    """x = f(e) is invertible, log|det df/de| matches the dense Jacobian, and the whitened program's
    density is the centred one plus that log-determinant (ragged trials, inputs, K = 3)."""
    from numpyro.infer.util import log_density

    from ppl_switch.distributions.switching_chain import WhitenedSwitchingChain

    centred = SLDS(num_states=3, latent_dim=2, obs_dim=2, input_dim=1)
    whitened = SLDS(num_states=3, latent_dim=2, obs_dim=2, input_dim=1, path_parameterisation="whitened")
    params = _random_params(centred, seed=4)
    data, truth = centred.simulate(jax.random.PRNGKey(1), 3, 5, params=params, lengths=[5, 3, 1])
    p = {k: jnp.asarray(v) for k, v in truth["params"].items()}
    chain = WhitenedSwitchingChain(centred.path_distribution(p, data))
    x = jnp.asarray(truth["latents"])
    e = chain.to_site(x)
    np.testing.assert_allclose(chain.to_path(e), x, atol=1e-12)
    jac = jax.jacfwd(chain.to_path)(e)  # (B, T, D, B, T, D)
    for b in range(3):
        dense = np.asarray(jac[b, :, :, b]).reshape(10, 10)
        np.testing.assert_allclose(chain.log_abs_det_jacobian()[b], np.linalg.slogdet(dense)[1], rtol=1e-10)
    lw = jax.jit(lambda v: log_density(whitened.program, (data,), {}, v)[0])({**p, "x_innovations": e})
    lc = jax.jit(lambda v: log_density(centred.program, (data,), {}, v)[0])(p)
    np.testing.assert_allclose(lw - lc, jnp.sum(chain.log_abs_det_jacobian()), rtol=1e-10)
    # the start values and the SVI guide use the innovations site
    start = whitened.latent_site_values(dict(truth["params"]), data)
    np.testing.assert_allclose(start["x_innovations"], e, atol=1e-12)
    guide = whitened.default_guide(data, init_values=truth["params"])
    assert guide.path_site == "x_innovations"
    np.testing.assert_allclose(guide.init_values["x_innovations"], e, atol=1e-12)


def test_anchored_path_is_the_same_model_and_translation_moves_d_alone():
    """The anchored program's density equals the centred one at the matching values (unit Jacobian; ragged
    trials, inputs, learned C, K = 3), and in anchored coordinates the unidentified translation (x + c,
    m0 + c, b_k + (I - A_k) c, d - C c) is a move of d alone whose density change is that of the priors
    of m0, b_k and d only: the path and emission terms do not move."""
    from numpyro.infer.util import log_density

    centred = SLDS(num_states=3, latent_dim=2, obs_dim=3, input_dim=1)
    anchored = SLDS(num_states=3, latent_dim=2, obs_dim=3, input_dim=1, path_parameterisation="anchored")
    params = _random_params(centred, seed=5)
    data, truth = centred.simulate(jax.random.PRNGKey(2), 3, 5, params=params, lengths=[5, 3, 1])
    p = {k: jnp.asarray(v) for k, v in truth["params"].items()}
    p["x"] = jnp.asarray(truth["latents"])
    sites = anchored.coordinate_site_values(p, data)
    assert set(sites) == {"x_anchored", "initial_mean_anchored", "dynamics_bias_anchored"}
    anchor = -np.linalg.pinv(np.asarray(p["emission_matrix"])) @ np.asarray(p["emission_bias"])
    inside = np.asarray(data.time_mask)[..., None]
    np.testing.assert_allclose(sites["x_anchored"], np.where(inside, p["x"] - anchor, p["x"]), atol=1e-12)
    np.testing.assert_allclose(sites["initial_mean_anchored"], p["initial_mean"] - anchor, atol=1e-12)
    a_values = {k: jnp.asarray(v) for k, v in {**p, **sites}.items() if k not in ("x", "initial_mean", "dynamics_bias")}
    la = jax.jit(lambda v: log_density(anchored.program, (data,), {}, v)[0])
    lc = jax.jit(lambda v: log_density(centred.program, (data,), {}, v)[0])
    np.testing.assert_allclose(la(a_values), lc(p), rtol=1e-12)
    # the deterministic sites give back x, m0 and b_k
    _, trace = log_density(anchored.program, (data,), {}, a_values)
    for name in ("x", "initial_mean", "dynamics_bias"):
        np.testing.assert_allclose(trace[name]["value"], p[name], atol=1e-12)

    # the translation by c: in anchored coordinates d - C c with every other site fixed
    c = jnp.array([0.7, -1.3])
    A, C = p["dynamics_matrix"], p["emission_matrix"]
    moved = dict(p, initial_mean=p["initial_mean"] + c, dynamics_bias=p["dynamics_bias"] + c - A @ c,
                 emission_bias=p["emission_bias"] - C @ c, x=jnp.where(inside, p["x"] + c, p["x"]))
    moved_anchored = dict(a_values, emission_bias=a_values["emission_bias"] - C @ c)
    np.testing.assert_allclose(la(moved_anchored), lc(moved), rtol=1e-12)

    def prior_terms(v):
        return (dist.Normal(0, 3.0).log_prob(v["initial_mean"]).sum() + dist.Normal(0, 1.0).log_prob(v["dynamics_bias"]).sum()
                + dist.Normal(0, 5.0).log_prob(v["emission_bias"]).sum())

    np.testing.assert_allclose(lc(moved) - lc(p), prior_terms(moved) - prior_terms(p), rtol=1e-10)
    # start values and the SVI guide use the anchored sites
    guide = anchored.default_guide(data, init_values=dict(p))
    assert guide.path_site == "x_anchored"
    np.testing.assert_allclose(guide.init_values["x_anchored"], sites["x_anchored"], atol=1e-12)


def test_path_relative_scales_are_an_exact_change_of_variables():
    """With dynamics_scale_coordinates="path_relative" the joint site u = (anchored path, eta, zeta) maps to
    (x, s, m0); the program's density is the centred one plus log|det d(x, s, m0)/du| (checked against the
    dense Jacobian), the deterministic sites give back x, s, m0, b_k, the program samples generatively,
    and the option is recorded in the config and refused where it cannot apply."""
    from numpyro.infer import Predictive
    from numpyro.infer.util import log_density

    centred = SLDS(num_states=3, latent_dim=2, obs_dim=3, input_dim=1)
    relative = SLDS(num_states=3, latent_dim=2, obs_dim=3, input_dim=1, path_parameterisation="anchored",
                    dynamics_scale_coordinates="path_relative")
    params = _random_params(centred, seed=5)
    data, truth = centred.simulate(jax.random.PRNGKey(2), 3, 5, params=params, lengths=[5, 3, 1])
    p = {k: jnp.asarray(v) for k, v in truth["params"].items()}
    p["x"] = jnp.asarray(truth["latents"])
    sites = relative.coordinate_site_values(p, data)
    assert set(sites) == {"path_and_relative_parameters", "dynamics_bias_anchored"}
    values = {k: jnp.asarray(v) for k, v in {**p, **sites}.items()
              if k not in ("x", "initial_mean", "dynamics_bias", "dynamics_scales")}
    lr, trace = log_density(relative.program, (data,), {}, values)
    lc, _ = log_density(centred.program, (data,), {}, p)
    joint = trace["path_and_relative_parameters"]["fn"]

    def x_s_m0(u):
        return jnp.concatenate([v.ravel() for v in joint.path_scales_and_initial_mean(u)])

    jac = np.asarray(jax.jacfwd(x_s_m0)(values["path_and_relative_parameters"]))
    np.testing.assert_allclose(lr - lc, np.linalg.slogdet(jac)[1], rtol=1e-10)
    np.testing.assert_allclose(lr - lc, jnp.sum(jnp.log(p["dynamics_scales"])) + jnp.sum(jnp.log(p["initial_scales"] / np.sqrt(3))),
                               rtol=1e-10)
    for name in ("x", "dynamics_scales", "initial_mean", "dynamics_bias"):
        np.testing.assert_allclose(trace[name]["value"], p[name], atol=1e-12)
    # relabelling the states of a draw permutes the regime rows of the joint site: the relabelled value is
    # the site value of the relabelled parameters
    perm = np.array([2, 0, 1])
    draw = {k: np.asarray(v) for k, v in values.items()}
    relabelled = relative.permute_states(draw, perm)
    permuted = relative.permute_states({k: np.asarray(v) for k, v in p.items()}, perm)
    expected = relative.coordinate_site_values(permuted, data)["path_and_relative_parameters"]
    np.testing.assert_allclose(relabelled["path_and_relative_parameters"], expected, atol=1e-12)
    prior = Predictive(relative.program, num_samples=2)(jax.random.PRNGKey(0), data)
    assert prior["dynamics_scales"].shape == (2, 3, 2) and np.all(prior["dynamics_scales"] > 0)
    assert SLDS(**json.loads(json.dumps(relative.config()))).dynamics_scale_coordinates == "path_relative"
    with pytest.raises(ValueError, match="dynamics_scale_coordinates"):
        SLDS(num_states=2, latent_dim=2, path_parameterisation="whitened", dynamics_scale_coordinates="path_relative")
    with pytest.raises(ValueError, match="dynamics_scale_coordinates"):
        SLDS(num_states=2, latent_dim=2, dynamics_scale_coordinates="relative")
    with pytest.raises(ValueError, match="dynamics_scale_coordinates"):
        relative.default_guide(data)


def test_bad_arguments_are_named():
    with pytest.raises(DataError, match="num_states"):
        SLDS(num_states=0, latent_dim=2)
    with pytest.raises(ValueError, match="path_parameterisation"):
        SLDS(num_states=2, latent_dim=2, path_parameterisation="noncentered")
    with pytest.raises(ValueError, match="emission"):
        SLDS(num_states=2, latent_dim=2, emission="bernoulli")
    with pytest.raises(ValueError, match="emission_matrix"):
        SLDS(num_states=2, latent_dim=2, emission_matrix=np.eye(3))
    with pytest.raises(ValueError, match="link"):
        SLDS(num_states=2, latent_dim=2, emission="poisson", link="relu")
    model = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    with pytest.raises(DataError, match="obs_dim=3"):
        model.prepare(np.zeros((10, 2)))
    with pytest.raises(NotImplementedError, match="Gaussian"):
        slds_em(SLDS(num_states=2, latent_dim=2, obs_dim=2, emission="poisson"), model.prepare(np.zeros((5, 3))))
    with pytest.raises(ValueError, match="learn"):
        slds_em(model, model.prepare(np.zeros((5, 3))), learn=("dynamics", "everything"))


def test_poisson_emissions_simulate_and_score():
    model = SLDS(num_states=2, latent_dim=2, obs_dim=4, emission="poisson", link="softplus", bin_size=0.5)
    data, truth = model.simulate(jax.random.PRNGKey(0), 1, 20)
    assert np.all(data.y == np.round(data.y)) and np.all(data.y >= 0)
    params = truth["params"]
    from scipy.stats import poisson

    rate = 0.5 * np.log1p(np.exp(truth["latents"] @ params["emission_matrix"].T + params["emission_bias"]))
    np.testing.assert_allclose(jax.jit(model.log_likelihood)(params, data), poisson.logpmf(data.y, rate).sum(-1), rtol=1e-8)


def test_gaussian_pointwise_log_likelihood_is_the_collapsed_filter():
    """Sums to the Gaussian-sum filter's log p(y); exact (= enumeration) for a two-step series."""
    model = SLDS(num_states=2, latent_dim=2, obs_dim=3)
    data, truth = model.simulate(jax.random.PRNGKey(1), 1, 2)
    ll = jax.jit(model.log_likelihood)(truth["params"], data)
    sp = jax.tree.map(lambda a: a[0], model.switching_params(truth["params"], data))
    exact = sw.exact_log_likelihood_by_enumeration(sp, jnp.asarray(data.y[0]), jnp.asarray(data.mask[0]))
    np.testing.assert_allclose(ll.sum(), exact, rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# The residual-form covariance M-step and never-silent restarts


def _smf_em_inputs(seed=3, T=60):
    sim = simulate_slds_tutorial(seed=seed, num_trials=2, num_timesteps=T)
    y = jnp.asarray(sim["y"])
    B, _, N = y.shape
    gamma = jnp.asarray(np.eye(2)[sim["states"]], jnp.float64)
    return y, gamma, jnp.ones(y.shape, bool), jnp.ones((B, T), bool), jnp.zeros((B, T, 0))


@pytest.mark.parametrize("emission_cov,tied", [("diagonal", False), ("full", True)])
def test_smf_em_with_residual_covariances_equals_the_moment_form_in_float64(monkeypatch, emission_cov, tied):
    """Exact arithmetic: Q_k and R from per-step residuals (sw.residual_covariances) are the conjugate
    M-step's maximisers, so 15 EM iterations give the moment form's parameters and objective."""
    y, gamma, m, tm, u = _smf_em_inputs()
    model = SLDS(2, 2, obs_dim=2, emission_cov=emission_cov)
    p = model.params_to_em(model.default_params(jax.random.PRNGKey(1)), jnp.float64)
    prior, learn, diag = model.em_prior(2, jnp.float64), frozenset(sw.EM_GROUPS), emission_cov == "diagonal"

    def run():
        p1 = sw.em_init_step(p, gamma, y, m, tm, u, prior, learn, diag, tied)
        return sw.structured_mean_field_em(p1, gamma, y, m, tm, u, prior, learn, 15, diag, tied)[:2]

    new_p, new_trace = run()
    monkeypatch.setattr(sw, "residual_covariances", lambda p, *args: p)  # the moment form alone
    old_p, old_trace = run()
    for name in old_p:
        np.testing.assert_allclose(new_p[name], old_p[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(new_trace, old_trace, rtol=1e-12)
    assert not np.allclose(new_p["dynamics_covs"], p["dynamics_covs"])  # the M-step did move Q_k


def test_slds_em_with_a_non_finite_m_step_raises_fit_error_naming_the_stage(monkeypatch):
    """Never silent: a NaN Q_k from the M-step drops every restart; FitError names stage and iteration."""
    import ppl_switch.infer.slds_em as slds_em_module
    from ppl_switch.errors import FitError

    monkeypatch.setattr(slds_em_module, "_EM_CACHE", {})  # compile the broken M-step afresh, then forget it
    monkeypatch.setattr(sw, "residual_covariances", lambda p, *args: {**p, "dynamics_covs": p["dynamics_covs"] * jnp.nan})
    sim = simulate_slds_tutorial(seed=0, num_trials=1, num_timesteps=30)
    model = SLDS(2, 2, obs_dim=2)
    with pytest.raises(FitError, match=r"every restart became non-finite \(restart 0: stage 'start' at iteration 0; restart 1"), \
            pytest.warns(RuntimeWarning, match="shared-LDS start became non-finite"):
        slds_em(model, model.prepare(sim["y"]), key=jax.random.PRNGKey(0), num_iters=3, num_restarts=2)


def test_first_nonfinite_stage_names_the_first_failing_stage():
    from ppl_switch.infer.slds_em import _first_nonfinite_stage

    ok = {"start": True, "e_step": np.ones(4, bool), "m_step": np.ones(3, bool)}
    assert _first_nonfinite_stage(ok) is None
    assert _first_nonfinite_stage({**ok, "start": False}) == ("start", 0)
    assert _first_nonfinite_stage({**ok, "m_step": np.array([True, False, False])}) == ("M-step", 1)
    assert _first_nonfinite_stage({**ok, "e_step": np.array([True, True, False, False]),
                                   "m_step": np.array([True, False, False])}) == ("M-step", 1)
    assert _first_nonfinite_stage({**ok, "e_step": np.array([True, False, False, False])}) == ("E-step", 1)
    assert _first_nonfinite_stage({**ok, "e_step": np.array([True, True, True, False])}) == ("final E-step", 3)
