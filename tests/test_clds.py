"""CLDS: Kalman-marginal likelihood against a dense oracle, the Sylvester M-steps against autodiff,
EM monotonicity, masks/ragged trials, the NumPyro program, analyses, and (slow) ring-attractor recovery."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.scipy.stats import multivariate_normal
from numpyro.infer.util import log_density

from ppl_switch.analysis.clds_analysis import (
    band_coverage,
    co_smoothing,
    credible_band,
    fixed_points,
    over_draws,
    r2_score,
    tuning_curves,
)
from ppl_switch.data import DataError, SequenceData
from ppl_switch.errors import FitWarning
from ppl_switch.datasets.head_direction import (
    bump_tuning,
    ring_dynamics,
    ring_fixed_points,
    simulate_head_direction,
)
from ppl_switch.infer import clds_em as clds_em_module
from ppl_switch.infer.clds_em import (
    clds_em,
    em_objective,
    em_step,
    features,
    initial_params,
    run_clds_em,
    solve_sylvester_psd,
    stack_weights,
)
from ppl_switch.models.clds import CLDS
from ppl_switch.ops.basis import FourierBasis, HSGPBasis, LinearBasis
from ppl_switch.ops.kalman import lgssm_joint_gaussian

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

SMALL_BASIS = FourierBasis(3, 0.7, 0.15)


def _small_model(**kw):
    kw.setdefault("basis", SMALL_BASIS)
    return CLDS(latent_dim=2, obs_dim=4, input_dim=1, **kw)


@pytest.fixture(scope="module")
def small_data():
    model = _small_model(varying=("A", "b", "C", "m"))
    data, truth = model.simulate(jax.random.PRNGKey(0), 6, 12)
    return model, data, truth


# ----- linear algebra ------------------------------------------------------------------------------


def test_sylvester_matches_scipy_and_ridge():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 6))
    G = X.T @ X
    S = np.array([[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.2]])
    H = rng.standard_normal((6, 3))
    W = np.asarray(solve_sylvester_psd(jnp.asarray(G), jnp.asarray(S), jnp.asarray(H)))
    np.testing.assert_allclose(W, scipy.linalg.solve_sylvester(G, S, H), atol=1e-10)
    np.testing.assert_allclose(G @ W + W @ S, H, atol=1e-10)
    W_ridge = np.linalg.solve(G + 0.3 * np.eye(6), H)
    np.testing.assert_allclose(solve_sylvester_psd(jnp.asarray(G), 0.3 * jnp.eye(3), jnp.asarray(H)), W_ridge, atol=1e-10)


# ----- likelihood ----------------------------------------------------------------------------------


def test_marginal_likelihood_matches_dense_gaussian(small_data):
    model, data, truth = small_data
    params = truth["params"]
    T = 5
    u = jnp.asarray(data.inputs[0, :T])
    y = jnp.asarray(data.y[0, :T])
    mu, cov = lgssm_joint_gaussian(model.lgssm(params, u), T)
    D = 2
    ys = slice(T * D, None)
    dense = multivariate_normal.logpdf(y.reshape(-1), mu[ys], cov[ys, ys])
    short = SequenceData(y[None], np.ones((1, T, 4), bool), np.array([T]), u[None])
    np.testing.assert_allclose(model.trial_log_likelihoods(params, short)[0], dense, rtol=1e-8)
    # pointwise log-likelihood sums to the marginal
    np.testing.assert_allclose(model.log_likelihood(params, short).sum(), dense, rtol=1e-8)


def test_time_varying_parameters_follow_the_condition(small_data):
    model, data, truth = small_data
    params = truth["params"]
    u = jnp.asarray(data.inputs[1])
    lg = model.lgssm(params, u)
    f = model.parameter_functions(params, u)
    # A, b at u_1..u_{T-1} (transition t -> t+1 uses the condition of step t); C at every step; m at u_1
    np.testing.assert_allclose(lg.dynamics_matrix, f["A"][:-1])
    np.testing.assert_allclose(lg.dynamics_bias, f["b"][:-1])
    np.testing.assert_allclose(lg.emission_matrix, f["C"])
    np.testing.assert_allclose(lg.initial_mean, f["m"][0])


def test_padding_and_mask_leave_likelihood_unchanged(small_data):
    model, data, truth = small_data
    params = truth["params"]
    y = np.asarray(data.y)
    u = np.asarray(data.inputs)
    ragged = [y[0, :7], y[1], y[2, :9]]
    ragged_u = [u[0, :7], u[1], u[2, :9]]
    padded = model.prepare(ragged, inputs=[np.pad(a, ((0, 12 - len(a)), (0, 0))) for a in ragged_u])
    ll = model.trial_log_likelihoods(params, padded)
    for i, (yi, ui) in enumerate(zip(ragged, ragged_u)):
        single = model.prepare(yi, inputs=ui)
        np.testing.assert_allclose(ll[i], model.trial_log_likelihoods(params, single)[0], rtol=1e-10)
    np.testing.assert_allclose(model.log_likelihood(params, padded).sum(1), ll, rtol=1e-10)
    assert float(jnp.abs(model.log_likelihood(params, padded)[0, 7:]).max()) == 0.0


def test_program_log_density_is_prior_plus_marginal(small_data):
    model, data, truth = small_data
    params = truth["params"]
    ld, trace = log_density(model.program, (data,), {}, params)
    prior = sum(site["fn"].log_prob(site["value"]).sum() for site in trace.values()
                if site["type"] == "sample" and not site["is_observed"])
    np.testing.assert_allclose(ld, prior + model.trial_log_likelihoods(params, data).sum(), rtol=1e-10)
    dims = model.site_dims()
    for name, site in trace.items():
        if site["type"] == "sample" and not site["is_observed"]:
            assert len(dims[name]) == jnp.ndim(site["value"]), name


# ----- EM ------------------------------------------------------------------------------------------


def _expected_dynamics_objective(model, params_new, params_old, data):
    """E_old[sum_t log N(x_{t+1} | A x_t + b, Q)] - |W_A|^2/2 - |W_b|^2/2 by autodiff-able brute force."""
    means, covs, cross, _ = model.smooth(params_old, data)
    Q = model.covariances(params_old)["dynamics_cov"]
    Qi = jnp.linalg.inv(Q)
    total = 0.0
    for k in range(data.num_trials):
        n = int(data.lengths[k])
        f = model.parameter_functions(params_new, jnp.asarray(data.inputs[k, : n - 1]))
        A, b = f["A"], f["b"]
        m, P = means[k, :n], covs[k, :n]
        Exx = P + m[:, :, None] * m[:, None, :]
        Enext_x = cross[k, : n - 1] + m[1:, :, None] * m[:-1, None, :]  # E[x_{t+1} x_t']
        # E[r r'] for r = x_{t+1} - A x_t - b, term by term
        E = (Exx[1:] - A @ jnp.swapaxes(Enext_x, -1, -2) - Enext_x @ jnp.swapaxes(A, -1, -2) + A @ Exx[:-1] @ jnp.swapaxes(A, -1, -2)
             - jnp.einsum("ti,tj->tij", m[1:] - jnp.einsum("tij,tj->ti", A, m[:-1]), b)
             - jnp.einsum("ti,tj->tij", b, m[1:] - jnp.einsum("tij,tj->ti", A, m[:-1]))
             + jnp.einsum("ti,tj->tij", b, b))
        total = total - 0.5 * jnp.einsum("ij,tji->", Qi, E)
    return total - 0.5 * jnp.sum(params_new["W_A"] ** 2) - 0.5 * jnp.sum(params_new["W_b"] ** 2)


def test_joint_A_b_mstep_zeroes_the_gradient(small_data):
    """The corrected Eq. (20) (+Phi'Phi block): the Sylvester solution is a stationary point of the
    expected complete-data log posterior; the paper's literal sign would not be."""
    model, data, truth = small_data
    start = initial_params(model, jax.random.PRNGKey(3), data)
    new, _ = em_step(model, start, data)
    trial = {**start, "W_A": new["W_A"], "W_b": new["W_b"]}

    @jax.jit
    def obj(w):
        return _expected_dynamics_objective(model, {**trial, "W_A": w[0], "W_b": w[1]}, start, data)

    grads = jax.jit(jax.grad(obj))((trial["W_A"], trial["W_b"]))
    assert max(float(jnp.abs(g).max()) for g in grads) < 1e-8
    # and it is a maximum: perturbations lower the objective
    base = obj((trial["W_A"], trial["W_b"]))
    assert obj((trial["W_A"] + 1e-3, trial["W_b"])) < base
    assert obj((trial["W_A"], trial["W_b"] - 1e-3)) < base


@pytest.mark.parametrize(
    "kw",
    [
        dict(varying=("A", "b", "C", "m")),
        dict(varying=("A", "b", "m"), emission_bias=True, emission_cov="full"),
        dict(bases={"b": LinearBasis()}, varying=("m",)),
    ],
    ids=["C_varying", "full_R_with_d", "lds_additive_inputs"],
)
def test_em_objective_is_monotone_with_masks(kw, small_data):
    _, data, _ = small_data
    model = _small_model(**kw)
    mask = np.asarray(data.mask).copy()
    if model.emission_cov == "diag":
        mask[0, 3, 1] = mask[2, 5, :2] = False  # partly observed steps
    mask[1, 4] = False  # a wholly missing step
    lengths = np.array([12, 12, 9, 12, 7, 12])
    masked = model.prepare(np.asarray(data.y), mask=mask, lengths=lengths, inputs=np.asarray(data.inputs))
    out = run_clds_em(model, masked, num_iters=12, seed=1)
    J = out["objective"]
    assert len(J) == 12
    assert np.all(np.diff(J) >= -1e-8 * np.abs(J[1:])), np.diff(J)
    assert J[-1] > J[0]
    # the reported objective is the model's objective at the parameters of that iteration
    params = out["params"]
    _, stats = em_step(model, params, masked)
    np.testing.assert_allclose(stats["objective"], em_objective(model, params, masked), rtol=1e-10)


def test_em_keeps_fixed_values_and_recovers_noise(small_data):
    model0, data, truth = small_data
    C = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    model = _small_model(fixed={"C": C, "dynamics_cov": 0.05 * np.eye(2)})
    out = run_clds_em(model, model.prepare(np.asarray(data.y), inputs=np.asarray(data.inputs)), num_iters=5)
    assert "W_C" not in out["params"] and "dynamics_scale" not in out["params"]
    p = model.with_fixed(out["params"])
    np.testing.assert_allclose(model.parameter_functions(p, jnp.zeros((1, 1)))["C"][0], C)
    np.testing.assert_allclose(model.covariances(p)["dynamics_cov"], 0.05 * np.eye(2), atol=1e-12)


def test_em_stopping_on_a_non_finite_objective_returns_the_last_finite_parameters_and_warns(small_data, monkeypatch):
    """An M-step whose output breaks the next objective (here: NaN injected after the third step): EM stops,
    returns the parameters of the last finite objective (those the third step started from, not the broken
    ones), records where it stopped, and clds_em() (fit_em's EM) warns."""
    _, data, _ = small_data
    model = _small_model(varying=("A", "b", "C", "m"))
    real_step, seen = clds_em_module.em_step, []

    def breaking_step(m, params, d):
        new, stats = real_step(m, params, d)
        seen.append(params)
        if len(seen) == 3:
            new = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), new)
        return new, stats

    monkeypatch.setattr(clds_em_module, "em_step", breaking_step)
    out = run_clds_em(model, data, num_iters=10, seed=1)
    assert out["stopped_nonfinite_at"] == 3 and len(out["objective"]) == 3
    for name, value in out["params"].items():
        np.testing.assert_array_equal(value, seen[2][name], err_msg=name)
    seen.clear()
    with pytest.warns(FitWarning, match="not finite at iteration 3"):
        clds_em(model, data, num_iters=10)


def _moment_form_covariances(model, new, data, means, covs, cross):
    """Oracle for the Q and R M-step: the moment form Syy - W'H - H'W + W'GW (the M-step's formula before
    the per-step residual form), from summed second moments of z_t = select(phi(u_t) (x) [x_t; 1]) built
    one step at a time with np.kron, and the new weights W. Returns Q (D, D) and R ((N,) or (N, N))."""
    p = model.with_fixed(new)
    D, N = model.latent_dim, data.obs_dim
    means, covs, cross = (np.asarray(a, np.float64) for a in (means, covs, cross))
    y, mask = np.asarray(data.y), np.asarray(data.mask)

    def second_moments(k, t):  # E[x~ x~'] of x~ = [x_t; 1]
        xt = np.append(means[k, t], 1.0)
        S = np.outer(xt, xt)
        S[:D, :D] += covs[k, t]
        return xt, S

    W = np.asarray(stack_weights(model, p, ("A", "b")))
    G, H, Syy, n = 0.0, 0.0, 0.0, 0
    for k in range(data.num_trials):
        length = int(data.lengths[k])
        phi, sel = (np.asarray(a) for a in features(model, ("A", "b"), jnp.asarray(data.inputs[k, : length - 1])))
        for t in range(length - 1):
            xt, Sxx = second_moments(k, t)
            Sxn = np.outer(xt, means[k, t + 1])  # E[x~_t x_{t+1}']
            Sxn[:D] += cross[k, t].T
            G = G + np.kron(np.outer(phi[t], phi[t]), Sxx)[np.ix_(sel, sel)]
            H = H + np.kron(phi[t][:, None], Sxn)[sel]
            Syy = Syy + covs[k, t + 1] + np.outer(means[k, t + 1], means[k, t + 1])
            n += 1
    Q = (Syy - W.T @ H - H.T @ W + W.T @ G @ W) / n

    W = np.asarray(stack_weights(model, p, ("C", "d")))  # (P, N)
    P = W.shape[0]
    diag = model.emission_cov == "diag"
    G = np.zeros((N, P, P) if diag else (P, P))
    H = np.zeros((N, P) if diag else (P, N))
    Syy = np.zeros(N if diag else (N, N))
    count = np.zeros(N if diag else ())
    for k in range(data.num_trials):
        phi, sel = (np.asarray(a) for a in features(model, ("C", "d"), jnp.asarray(data.inputs[k])))
        for t in range(y.shape[1]):
            xt, Sxx = second_moments(k, t)
            z = np.kron(phi[t], xt)[sel]
            Gz = np.kron(np.outer(phi[t], phi[t]), Sxx)[np.ix_(sel, sel)]
            m = mask[k, t].astype(float) if diag else float(mask[k, t, 0])
            G = G + (m[:, None, None] * Gz if diag else m * Gz)
            H = H + (m[:, None] * y[k, t][:, None] * z if diag else m * np.outer(z, y[k, t]))
            Syy = Syy + (m * y[k, t] ** 2 if diag else m * np.outer(y[k, t], y[k, t]))
            count = count + m
    if diag:
        R = (Syy - 2 * np.einsum("pn,np->n", W, H) + np.einsum("pn,npq,qn->n", W, G, W)) / count
    else:
        R = (Syy - W.T @ H - H.T @ W + W.T @ G @ W) / count
    return Q, R


@pytest.mark.parametrize(
    "kw",
    [dict(varying=("A", "b", "C", "m")), dict(varying=("A", "b", "m"), emission_bias=True, emission_cov="full")],
    ids=["diag_R_C_varying", "full_R_with_d"],
)
def test_residual_form_q_r_match_the_moment_form(kw, small_data):
    """The per-step residual form of the Q and R M-step gives the moment form's maximiser (float64, with
    ragged trials and masks); the covariance terms matter here, so a dropped term or a wrong sign fails."""
    _, data, _ = small_data
    model = _small_model(**kw)
    mask = np.asarray(data.mask).copy()
    if model.emission_cov == "diag":
        mask[0, 3, 1] = mask[2, 5, :2] = False
    mask[1, 4] = False
    masked = model.prepare(np.asarray(data.y), mask=mask, lengths=np.array([12, 12, 9, 12, 7, 12]),
                           inputs=np.asarray(data.inputs))
    start = initial_params(model, jax.random.PRNGKey(3), masked)
    new, _ = em_step(model, start, masked)
    means, covs, cross, _ = model.smooth(start, masked)
    Q, R = _moment_form_covariances(model, new, masked, means, covs, cross)
    got = model.covariances(new)

    def rel(a, b):
        return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)

    assert rel(got["dynamics_cov"], Q) < 1e-9
    assert rel(got["emission_cov"], R) < 1e-9
    # sensitivity: without the smoothed (cross-)covariances the oracle moves by far more than the tolerance
    Q0, R0 = _moment_form_covariances(model, new, masked, means, 0 * covs, 0 * cross)
    assert rel(Q0, Q) > 1e-2 and rel(R0, R) > 1e-2


def _near_noiseless(emission_cov):
    """Near-noiseless data in the current precision: D = 2, N = 10, 4 trials x 50 steps, dynamics and
    observation sd 0.01, |x| up to ~40 (default b and m weights x 10). Returns (model, truth, data)."""
    model = CLDS(latent_dim=2, obs_dim=10, input_dim=1, basis=SMALL_BASIS, emission_cov=emission_cov)
    truth = model.default_params(jax.random.PRNGKey(0))
    truth.update(W_b=10 * truth["W_b"], W_m=10 * truth["W_m"], dynamics_scale=jnp.full(2, 0.01),
                 emission_scale=jnp.full(10, 0.01), initial_scale=jnp.full(2, 0.1))
    data, _ = model.simulate(jax.random.PRNGKey(1), 4, 50, params=truth)
    return model, truth, data


@pytest.mark.parametrize("emission_cov", ["diag", "full"])
def test_em_in_float32_on_near_noiseless_data(emission_cov):
    """20 EM iterations from the truth in float32. The moment form of the Q and R M-step (summed moments
    ~T |x|^2 = 1e4 against T Q ~ 1e-3) gave a NaN Q in the first M-step here (and R = 1e-12 for one neuron,
    diag); the per-step residual form keeps Q and R positive definite at their true size, the objective
    non-decreasing up to float32 rounding (J itself rounds by up to ~0.5 nats, 1e-4 |J|, here) and its end
    value within 1 nat of float64 EM's on the same data."""
    with jax.enable_x64(False):
        model, truth, data = _near_noiseless(emission_cov)
        out = run_clds_em(model, data, num_iters=20, init_params=truth)
        params = {k: np.asarray(v, np.float64) for k, v in out["params"].items()}
    J = out["objective"]
    assert len(J) == 20  # run_clds_em stops early once the objective is not finite
    assert all(np.all(np.isfinite(v)) for v in params.values())
    cov = model.covariances(params)
    Q, R = np.asarray(cov["dynamics_cov"]), np.asarray(cov["emission_cov"])
    R = np.diag(R) if R.ndim == 1 else R
    assert np.linalg.eigvalsh(Q).min() > 0 and np.linalg.eigvalsh(R).min() > 0
    np.testing.assert_allclose(np.sqrt(np.diag(Q)), 0.01, rtol=0.3)
    np.testing.assert_allclose(np.sqrt(np.diag(R)), 0.01, rtol=0.3)
    assert np.diff(J).min() > -2e-4 * abs(J[-1]), np.diff(J)
    assert J[-1] > J[0] + 500
    data64 = SequenceData(np.asarray(data.y, np.float64), np.asarray(data.mask), np.asarray(data.lengths),
                          np.asarray(data.inputs, np.float64))
    truth64 = {k: np.asarray(v, np.float64) for k, v in truth.items()}
    J64 = run_clds_em(model, data64, num_iters=20, init_params=truth64)["objective"]
    assert abs(J[-1] - J64[-1]) < 1.0, (J[-1], J64[-1])


# ----- errors ----------------------------------------------------------------------------------------


def test_bad_input_is_named():
    model = _small_model()
    y = np.zeros((2, 5, 4))
    with pytest.raises(DataError, match="inputs"):
        model.prepare(y)
    with pytest.raises(DataError, match="inputs"):
        model.prepare(y, inputs=np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match="varying"):
        CLDS(varying=("Z",))
    with pytest.raises(ValueError, match="fixed\\['C'\\]"):
        CLDS(obs_dim=4, fixed={"C": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="bases\\['A'\\]"):
        CLDS(input_dim=1, bases={"A": FourierBasis(columns=(1,))})
    with pytest.raises(ValueError, match="emission"):
        CLDS(emission="negative_binomial")


# ----- datasets and analyses -------------------------------------------------------------------------


def test_head_direction_truth():
    theta = np.linspace(0, 2 * math.pi, 17)
    A, b = ring_dynamics(theta, 0.1)
    x = ring_fixed_points(theta)
    np.testing.assert_allclose(np.einsum("gij,gj->gi", np.eye(2) - A, x), b, atol=1e-12)
    eig = np.sort(np.linalg.eigvals(A).real, -1)
    np.testing.assert_allclose(eig, np.tile([0.0, 0.9], (17, 1)), atol=1e-12)
    C = bump_tuning(theta, 10, 0.5)
    assert C.shape == (17, 10, 2) and np.all(np.linalg.norm(C, axis=-1) <= 2 + 1e-12)
    d = simulate_head_direction(seed=0, num_trials=3, num_timesteps=20)
    assert d["y"].shape == (3, 20, 10) and d["inputs"].shape == (3, 20, 1) and d["latents"].shape == (3, 20, 2)
    assert d["inputs"].min() >= 0 and d["inputs"].max() < 2 * math.pi
    np.testing.assert_allclose(simulate_head_direction(seed=0, num_trials=3, num_timesteps=20)["y"], d["y"])
    assert simulate_head_direction(seed=1, num_trials=2, num_timesteps=5, recipe="paper")["truth"]["emission_matrix"] is None


def test_fixed_points_solve_the_linear_system(small_data):
    model, _, truth = small_data
    grid = np.linspace(0, 2 * math.pi, 11)[:, None]
    for whiten in (False, True):
        fp = fixed_points(model, truth["params"], grid, whiten=whiten)
        resid = jnp.einsum("gij,gj->gi", jnp.eye(2) - fp["A"], fp["fixed_points"]) - fp["b"]
        assert float(jnp.abs(resid).max()) < 1e-10
    # whitening is a change of coordinates: eigenvalues are unchanged
    e0 = fixed_points(model, truth["params"], grid)["eigenvalues"]
    e1 = fixed_points(model, truth["params"], grid, whiten=True)["eigenvalues"]
    np.testing.assert_allclose(np.sort_complex(np.asarray(e0)), np.sort_complex(np.asarray(e1)), atol=1e-10)


def test_over_draws_and_bands(small_data):
    model, _, truth = small_data
    draws = {k: np.stack([np.asarray(v) * s for s in (0.9, 1.0, 1.1)])[None] for k, v in truth["params"].items()}
    grid = np.linspace(0, 2 * math.pi, 5)[:, None]
    out = over_draws(lambda p: fixed_points(model, p, grid)["fixed_points"], draws)
    assert out.shape == (1, 3, 5, 2)
    np.testing.assert_allclose(out[0, 1], fixed_points(model, truth["params"], grid)["fixed_points"])
    lo, hi = credible_band(out.reshape(3, 5, 2), prob=0.9)
    assert band_coverage(lo, hi, out[0, 1]) == 1.0
    assert band_coverage(lo, hi, hi + 1.0) == 0.0


def test_r2_and_co_smoothing_oracles(small_data):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 10, 2))
    assert r2_score(y, y) == 1.0
    assert np.all(r2_score(y, y[::-1, ::-1], axis=(0, 1)) <= 0.0)
    # noise-free data in the span of C: every neuron is predicted from the others exactly
    model, data, truth = small_data
    clean = CLDS(latent_dim=2, obs_dim=4, basis=SMALL_BASIS, varying=("A", "b", "C", "m"),
                 fixed={"emission_cov": np.full(4, 1e-10)})
    params = {k: v for k, v in truth["params"].items() if k != "emission_scale"}
    noiseless, _ = clean.simulate(jax.random.PRNGKey(5), 4, 12, params=params)
    cs = co_smoothing(clean, params, noiseless, num_held_out=2)
    assert cs["r2"].shape == (2,) and cs["mean_r2"] > 1 - 1e-6
    joint = co_smoothing(clean, params, noiseless, held_out=[0], jointly=True)
    np.testing.assert_allclose(joint["r2"], co_smoothing(clean, params, noiseless, held_out=[0])["r2"])


def test_forecast_co_smoothing_matches_a_step_by_step_oracle(small_data):
    """k-step predictions of held-out neurons from the held-in neurons' past, against a host loop over
    t and k with the filtered means and the model's A(u), b(u), C(u)."""
    from ppl_switch.analysis.clds_analysis import forecast_co_smoothing
    from ppl_switch.ops.kalman import lgssm_filter

    model, data, truth = small_data
    params = truth["params"]
    held_out = [1, 3]
    out = forecast_co_smoothing(model, params, data, horizons=(0, 2), held_out=held_out)
    mask = np.asarray(data.mask).copy()
    mask[..., held_out] = False
    y = np.asarray(data.y)
    K, T, _ = y.shape
    for k in (0, 2):
        preds = np.zeros((K, T - k, len(held_out)))
        for i in range(K):
            u = jnp.asarray(data.inputs[i])
            x = np.asarray(lgssm_filter(model.lgssm(params, u), jnp.asarray(y[i]), jnp.asarray(mask[i])).filtered_means)
            f = {n: np.asarray(v) for n, v in model.parameter_functions(params, u).items()}
            for t in range(T - k):
                z = x[t]
                for s in range(t, t + k):
                    z = f["A"][s] @ z + f["b"][s]
                preds[i, t] = (f["C"][t + k] @ z)[held_out]
        expected = r2_score(y[:, k:][..., held_out], preds, axis=(0, 1))
        np.testing.assert_allclose(out["r2"][k], expected, rtol=1e-8)
    assert out["mean_r2"][0] > out["mean_r2"][2]  # the past predicts the present better than the future
    with pytest.raises(ValueError, match="horizons"):
        forecast_co_smoothing(model, params, data, horizons=(T,))


def test_tuning_curves_shapes(small_data):
    model, data, truth = small_data
    tc = tuning_curves(model, truth["params"], data, num_bins=8)
    assert tc["model"].shape == (8, 4) and tc["empirical"].shape == (8, 4) and tc["counts"].sum() == 6 * 12


def test_em_and_its_start_live_in_the_inference_layer(small_data):
    """fit_em finds the library's CLDS EM (the model has no ``em`` of its own); ``ppl_switch.fit``'s SVI start
    is the library's EM start (``LIBRARY_STARTS``), the model's ``init_values`` the cheap start without EM."""
    from ppl_switch.infer.clds_em import clds_guide_start, clds_start
    from ppl_switch.infer.em import has_em, library_em
    from ppl_switch.infer.starts import library_start

    model, data, _ = small_data
    assert not hasattr(CLDS, "em") and has_em(CLDS) and library_em(CLDS) is clds_em
    assert library_start(CLDS) is clds_guide_start
    cheap = model.init_values(data, seed=2)
    start = initial_params(model, jax.random.PRNGKey(2), data)
    assert cheap.keys() == start.keys()
    for name, value in start.items():
        np.testing.assert_array_equal(cheap[name], value, err_msg=name)
    em = clds_start(model, data, seed=2, num_iters=3)
    ref = run_clds_em(model, data, num_iters=3, seed=2)["params"]
    assert em.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(em[name], value, err_msg=name)


def test_hsgp_condition_model_runs():
    model = CLDS(latent_dim=2, obs_dim=3, basis=HSGPBasis(num_basis=6, lengthscale=1.0, ell=8.0, center=3.0))
    data, _ = model.simulate(jax.random.PRNGKey(1), 3, 10)
    out = run_clds_em(model, data, num_iters=4)
    assert np.all(np.diff(out["objective"]) >= -1e-8 * np.abs(out["objective"][1:]))


# ----- slow: the paper's synthetic ring attractor ---------------------------------------------------


@pytest.mark.slow
def test_ring_attractor_recovery_and_co_smoothing():
    d = simulate_head_direction(seed=1, num_trials=100)
    model = CLDS(latent_dim=2, obs_dim=10, fixed={"C": d["truth"]["emission_matrix"]})
    train = model.prepare(d["y"][:80], inputs=d["inputs"][:80])
    test = model.prepare(d["y"][80:], inputs=d["inputs"][80:])
    out = run_clds_em(model, train, num_iters=200, seed=1)
    J = out["objective"]
    assert np.all(np.diff(J) >= -1e-8 * np.abs(J[1:]))
    theta = np.linspace(0, 2 * math.pi, 100)
    f = model.parameter_functions(out["params"], theta[:, None])
    A, b = ring_dynamics(theta)
    assert np.abs(np.asarray(f["A"]) - A).max() < 0.1
    assert np.abs(np.asarray(f["b"]) - b).max() < 0.1
    fp = fixed_points(model, out["params"], theta[:, None])
    x = np.asarray(fp["fixed_points"])
    r = np.linalg.norm(x, axis=-1)
    assert 0.95 < r.min() and r.max() < 1.05
    assert np.abs(np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - theta)))).max() < 0.3
    eig = np.sort(np.asarray(fp["eigenvalues"]).real, -1)
    assert np.abs(eig - np.array([0.0, 0.9])).max() < 0.06
    Q = np.asarray(model.covariances(out["params"])["dynamics_cov"])
    np.testing.assert_allclose(np.diag(Q), 0.04, rtol=0.25)
    assert co_smoothing(model, out["params"], test)["mean_r2"] >= 0.9


def test_config_round_trip_and_fit_em_runner(small_data):
    from ppl_switch.analysis.clds_analysis import add_fixed_points
    from ppl_switch.infer import fit_em
    from ppl_switch.results import get_group, group_names

    model, data, truth = small_data
    clone = CLDS(**json.loads(json.dumps(model.config())))
    np.testing.assert_allclose(clone.trial_log_likelihoods(truth["params"], data),
                               model.trial_log_likelihoods(truth["params"], data), rtol=1e-12)
    fit = fit_em(model, data, num_iters=3)
    assert fit.method == "em" and fit.samples["W_A"].shape[:2] == (1, 1)
    assert len(fit.diagnostics["objective"]) == 3
    idata = add_fixed_points(fit, np.linspace(0, 2 * math.pi, 7))
    assert {"posterior", "log_likelihood", "fixed_points"} <= set(group_names(idata))
    fp = get_group(idata, "fixed_points")
    assert fp["fixed_point"].shape == (1, 1, 7, 2) and fp["eigenvalue_real"].dims[-1] == "eig"
    np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values[0, 0],
                               model.log_likelihood(fit.params, data), rtol=1e-8)
