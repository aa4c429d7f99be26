"""EM for the baselines (HMM, ARHMM, LDS) and their model options (initial state, fixed parameters,
diffuse start).

Properties checked: the EM objective never decreases; the M-step's output is a stationary point of
the expected complete-data log-likelihood (its gradient, computed here with jax.grad from our own
densities and the smoother's posteriors, is ~0 there); converged EM is a stationary point of the
marginal likelihood; ragged / padded / partly missing data give the same fit; the diffuse likelihood
matches a dense-Gaussian oracle; bad options fail with a clear error before compiling.
Agreement with hmmlearn and statsmodels is measured in benchmarks/baselines.py (not test deps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal, norm, poisson

from ppl_switch.data import DataError
from ppl_switch.infer.em import em_method, fit_em
from ppl_switch.models.arhmm import ARHMM
from ppl_switch.models.hmm import HMM
from ppl_switch.models.lds import LDS
from ppl_switch.ops.hmm import hmm_smoother, stationary_distribution
from ppl_switch.ops.kalman import lgssm_joint_gaussian, lgssm_smoother

KEY = jax.random.PRNGKey(3)
LOCAL_LEVEL = dict(dynamics_matrix=[[1.0]], emission_matrix=[[1.0]], dynamics_bias=[0.0], emission_bias=[0.0])


def _nondecreasing(history, rel=4e-7):
    """Objective trace never drops by more than float rounding of its size."""
    obj = np.asarray(history["objective"], float)
    assert np.isfinite(obj).all() and len(obj) >= 2
    slack = rel * np.abs(obj).max()
    assert np.diff(obj).min() >= -slack, np.diff(obj).min()


# ---------------------------------------------------------------------------------------------------------------
# float32 (the user's precision): monotone objective, padding, fit_em end to end


# one compiled program per case; the padding and fit_em tests reuse the first and the last
# (same configuration, shapes and options: (2, 60) data, 2 restarts, default iterations and tolerance)
slow = pytest.mark.slow


@pytest.mark.parametrize(
    "model",
    [
        HMM(2, 2, emission="gaussian"),
        pytest.param(HMM(2, 2, emission="diag_gaussian", initial="stationary"), marks=slow),
        pytest.param(HMM(2, 2, emission="poisson", initial=[0.2, 0.8]), marks=slow),
        pytest.param(HMM(2, 2, emission="diag_gaussian", sticky=5.0), marks=slow),  # map below
        ARHMM(2, 1, lags=2, initial="stationary"),
        pytest.param(LDS(2, 3, input_dim=1, initial_cov="learned"), marks=slow),
        LDS(1, 1, fixed=LOCAL_LEVEL, dynamics_cov="diagonal", initial_cov="diffuse"),
    ],
    ids=["hmm-full", "hmm-diag-stationary", "hmm-poisson-fixed", "hmm-diag-map", "arhmm-stationary", "lds", "local-level"],
)
def test_objective_never_decreases(model):
    data, truth = model.simulate(KEY, 2, 60)
    use_map = getattr(model, "sticky", 0) > 0
    params, history = em_method(model)(data, key=KEY, num_restarts=2, **({"map": True} if use_map else {}))
    _nondecreasing(history)
    # the reported log-likelihood is the model's at the returned parameters
    ll = float(model.log_likelihood(params, data).sum())
    np.testing.assert_allclose(history["log_likelihoods"][-1], ll, rtol=1e-5)
    if not use_map:  # maximum likelihood beats the truth on its own data
        assert ll >= float(model.log_likelihood(truth["params"], data).sum()) - 1e-3 * abs(ll)


def test_padding_and_missing_steps_give_the_same_fit():
    """Trials of lengths 50 and 35 padded to 60 and to 64, with a fully missing step inside the first
    and different values under the mask: identical EM runs."""
    model = HMM(2, 2, emission="gaussian")
    data, _ = model.simulate(KEY, 2, 50)
    y = np.asarray(data.y)

    def padded(T):
        y_pad, mask = np.full((2, T, 2), 7.0), np.zeros((2, T, 2), bool)
        y_pad[0, :50], y_pad[1, :35] = y[0], y[1, :35]
        mask[0, :50], mask[1, :35] = True, True
        mask[0, 10] = False  # one missing step inside trial 0
        y_pad[0, 10] = -99.0 if T > 60 else 0.5  # any value under the mask
        return model.prepare(y_pad, mask=mask, lengths=[50, 35])

    a, b = padded(60), padded(64)
    # a fixed number of iterations, short of convergence: the stopping rule compares the objective's change
    # with its float32 rounding, which padding may move by one ulp (and so the stop by one iteration)
    pa, ha = em_method(model)(a, key=KEY, num_restarts=2, num_iters=3)
    pb, hb = em_method(model)(b, key=KEY, num_restarts=2, num_iters=3)
    assert ha["num_iterations"] == hb["num_iterations"] == 3
    np.testing.assert_allclose(ha["objective"], hb["objective"], rtol=1e-5)
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_fit_em_recommended_runner():
    model = LDS(1, 1, fixed=LOCAL_LEVEL, dynamics_cov="diagonal", initial_cov="diffuse")
    assert model.recommended_runner[0] == "em" and HMM.recommended_runner[0] == "em" and ARHMM.recommended_runner[0] == "em"
    data, _ = model.simulate(KEY, 2, 60)
    fit = fit_em(model, data, num_restarts=2)
    assert set(fit.params) == {"emission_scales", "dynamics_scales"}
    ll = fit.diagnostics["log_likelihoods"]
    np.testing.assert_allclose(ll[-1], float(model.log_likelihood(fit.params, data).sum()), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# options: stationary initial distribution, diffuse start (float64 oracles)


@pytest.mark.float64
def test_stationary_initial_is_the_stationary_distribution():
    P = np.array([[0.9, 0.08, 0.02], [0.1, 0.7, 0.2], [0.05, 0.15, 0.8]])
    pi = np.asarray(stationary_distribution(P))
    np.testing.assert_allclose(pi @ P, pi, atol=1e-14)
    np.testing.assert_allclose(pi.sum(), 1.0, atol=1e-14)
    model = HMM(3, 1, emission="diag_gaussian", initial="stationary")
    data, truth = model.simulate(KEY, 2, 20, params={**HMM(3, 1, "diag_gaussian").default_params(KEY), "transition_matrix": P})
    fixed = HMM(3, 1, emission="diag_gaussian", initial=pi)
    np.testing.assert_allclose(model.log_likelihood(truth["params"], data), fixed.log_likelihood(truth["params"], data), atol=1e-12)


@pytest.mark.float64
def test_diffuse_likelihood_matches_dense_oracle():
    """log p(y_{1:} | y_0) with a flat prior on x_0 equals the limit of the dense-Gaussian
    log p(y) - log p(y_0) as the initial variance kappa grows (error O(1/kappa))."""
    model = LDS(2, 2, fixed={"emission_matrix": [[1.0, 0.3], [-0.2, 0.8]]}, dynamics_cov="diagonal", initial_cov="diffuse")
    params = {**LDS(2, 2, dynamics_cov="diagonal").default_params(KEY), "emission_matrix": np.array([[1.0, 0.3], [-0.2, 0.8]])}
    params.pop("initial_mean")
    y = np.random.default_rng(1).normal(size=(1, 6, 2))
    data = model.prepare(y)
    ours = float(model.marginal_log_likelihood(params, data)[0])
    kappa = 1e7
    lg = LDS(2, 2, dynamics_cov="diagonal").lgssm_params({**params, "initial_mean": np.zeros(2)}, data)
    lg = jax.tree.map(lambda a: a[0], lg)._replace(initial_cov=kappa * jnp.eye(2))
    mean, cov = lgssm_joint_gaussian(lg, 6)
    ny = 6 * 2
    my, Sy = mean[-ny:], cov[-ny:, -ny:]
    y = np.asarray(data.y[0]).reshape(-1)
    joint = multivariate_normal.logpdf(y, my, Sy)
    first = multivariate_normal.logpdf(y[:2], my[:2], Sy[:2, :2])
    # the flat prior's normaliser: p_kappa(y_0) ~ N(0, kappa C C') -> log|det C| + log N(0; 0, kappa I)
    C = params["emission_matrix"]
    flat = first + np.log(abs(np.linalg.det(C))) + np.log(2 * np.pi * kappa)
    np.testing.assert_allclose(ours, float(joint - first), atol=1e-5)
    assert abs(flat) < 1e-5  # p_kappa(y_0) is the flat limit (sanity of the oracle itself)


# ---------------------------------------------------------------------------------------------------------------
# M-step optimality with independent gradients (float64)


def _hmm_q(model, y, gamma, xi, first, pi_fixed=None):
    """Expected complete-data log-likelihood of an HMM as a function of unconstrained parameters."""

    def q(theta):
        P = jax.nn.softmax(theta["P_logits"], -1)
        pi = jax.nn.softmax(theta["pi_logits"]) if pi_fixed is None else pi_fixed
        if model.emission == "poisson":
            lp = poisson.logpmf(y[:, :, None, :], jnp.exp(theta["log_rates"])).sum(-1)
        elif model.emission == "diag_gaussian":
            lp = norm.logpdf(y[:, :, None, :], theta["means"], jnp.exp(theta["log_scales"])).sum(-1)
        else:
            L = jnp.tril(theta["L"])
            cov = L @ jnp.swapaxes(L, -1, -2)
            lp = jax.vmap(lambda m, S: multivariate_normal.logpdf(y, m, S), out_axes=-1)(theta["means"], cov)
        return jnp.sum(gamma * lp) + jnp.sum(xi * jnp.log(P)) + jnp.sum(first * jnp.log(pi))

    return q


@pytest.mark.float64
@pytest.mark.parametrize("emission", ["gaussian", pytest.param("diag_gaussian", marks=slow), pytest.param("poisson", marks=slow)])
def test_hmm_m_step_is_stationary_point(emission):
    model = HMM(2, 2, emission=emission)
    data, truth = model.simulate(KEY, 2, 40)
    start = truth["params"]
    # one M-step from the truth (min_covar=0: the exact maximiser)
    p1, _ = em_method(model)(data, params=start, num_iters=1, tol=0.0, min_covar=0.0)
    y = jnp.asarray(data.y)
    ll = model.emission_log_likelihoods(start, data)
    sm = jax.jit(jax.vmap(lambda l: hmm_smoother(start["initial_probs"], start["transition_matrix"], l)))(ll)
    q = _hmm_q(model, y, sm.smoothed_probs, sm.pairwise_probs.sum((0, 1)), sm.smoothed_probs[:, 0].sum(0))
    theta = {"P_logits": jnp.log(p1["transition_matrix"]), "pi_logits": jnp.log(p1["initial_probs"])}
    if emission == "poisson":
        theta["log_rates"] = jnp.log(p1["rates"])
    elif emission == "diag_gaussian":
        theta.update(means=jnp.asarray(p1["means"]), log_scales=jnp.log(p1["scales"]))
    else:
        theta.update(means=jnp.asarray(p1["means"]), L=jnp.asarray(p1["scale_tril"]))
    grads = jax.jit(jax.grad(q))(theta)
    for name, g in grads.items():
        np.testing.assert_allclose(g, 0.0, atol=1e-7 * float(data.y.size), err_msg=name)
    # and it is a maximum: Q is lower at a perturbed point
    bumped = jax.tree.map(lambda a: a + 0.01, theta)
    assert jax.jit(q)(bumped) < jax.jit(q)(theta)


@pytest.mark.float64
def test_arhmm_m_step_is_stationary_point():
    model = ARHMM(2, 2, lags=2, input_dim=1)
    data, truth = model.simulate(KEY, 2, 50)
    start = truth["params"]
    p1, _ = em_method(model)(data, params=start, num_iters=1, tol=0.0, min_covar=0.0)
    ll = model.emission_log_likelihoods(start, data)
    sm = jax.jit(jax.vmap(lambda l: hmm_smoother(start["initial_probs"], start["transition_matrix"], l)))(ll)
    gamma = sm.smoothed_probs[:, 2:]  # regressed steps
    y, u = jnp.asarray(data.y), jnp.asarray(data.inputs)

    def q(theta):
        L = jnp.tril(theta["L"])
        cov = L @ jnp.swapaxes(L, -1, -2)
        mean = (
            jnp.einsum("kde,nte->ntkd", theta["A"][:, 0], y[:, 1:-1])
            + jnp.einsum("kde,nte->ntkd", theta["A"][:, 1], y[:, :-2])
            + theta["b"]
            + jnp.einsum("kdu,ntu->ntkd", theta["V"], u[:, 2:])
        )
        lp = jax.vmap(lambda m, S: multivariate_normal.logpdf(y[:, 2:], m, S), in_axes=(2, 0), out_axes=-1)(mean, cov)
        return jnp.sum(gamma * lp)

    theta = {"A": jnp.asarray(p1["ar_weights"]), "b": jnp.asarray(p1["biases"]), "V": jnp.asarray(p1["input_weights"]),
             "L": jnp.asarray(p1["scale_tril"])}
    for name, g in jax.jit(jax.grad(q))(theta).items():
        np.testing.assert_allclose(g, 0.0, atol=1e-7 * float(data.y.size), err_msg=name)
    P = np.asarray(sm.pairwise_probs.sum((0, 1)))
    np.testing.assert_allclose(p1["transition_matrix"], P / P.sum(-1, keepdims=True), atol=1e-12)


@pytest.mark.float64
@pytest.mark.parametrize("case", ["free", pytest.param("fixed-C-diagonal-Q", marks=slow)])
def test_lds_m_step_is_stationary_point(case):
    """Q(theta) = E log p(x, y | theta) under the smoother at the start, written from the Gaussian
    densities with the smoothed moments; with missing entries (mask) and an input."""
    if case == "free":
        model = LDS(2, 3, input_dim=1, initial_cov="learned")
    else:
        model = LDS(2, 3, input_dim=1, fixed={"emission_matrix": np.array([[1.0, 0.0], [0.5, 1.0], [0.0, -1.0]])}, dynamics_cov="diagonal")
    data, truth = model.simulate(KEY, 2, 30)
    mask = np.asarray(jax.random.bernoulli(KEY, 0.85, data.y.shape))
    data = model.prepare(np.asarray(data.y), mask=mask, inputs=data.inputs)
    start = {k: v for k, v in truth["params"].items() if k in model.site_dims()}
    p1, _ = em_method(model)(data, params=start, num_iters=1, tol=0.0, min_var=0.0)
    lg = model.lgssm_params(start, data)
    sm = jax.jit(jax.vmap(lgssm_smoother))(lg, jnp.asarray(data.y), jnp.asarray(data.mask))
    m, V, X = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
    y, mk, u = jnp.asarray(data.y), jnp.asarray(data.mask), jnp.asarray(data.inputs)
    full = model.full_params(start)

    def q(theta):
        th = {**full, **theta}
        C, d, F, r = th["emission_matrix"], th["emission_bias"], th["emission_input_weights"], jnp.exp(th["log_r"])
        mu = m @ C.T + d + u @ F.T
        var = r**2 + jnp.einsum("dh,nthk,dk->ntd", C, V, C)  # E (y - C x - ..)^2 = (y - mu)^2 + C V C'
        q_y = jnp.sum(mk * (-0.5 * jnp.log(2 * jnp.pi * r**2) - 0.5 * ((y - mu) ** 2 + var - r**2) / r**2))
        A, b, B = th["dynamics_matrix"], th["dynamics_bias"], th["dynamics_input_weights"]
        Qd = jnp.exp(th["log_q"]) ** 2 if "log_q" in th else jnp.ones(A.shape[0])
        pred = m[:, :-1] @ A.T + b + u[:, 1:] @ B.T
        # E (x' - A x)(x' - A x)' diagonal: V' - 2 A X' (cross) + A V A' + (m' - pred)^2
        ev = (jnp.diagonal(V[:, 1:], axis1=-2, axis2=-1) - 2 * jnp.einsum("hk,nthk->nth", A, X)
              + jnp.einsum("hk,ntkl,hl->nth", A, V[:, :-1], A) + (m[:, 1:] - pred) ** 2)
        q_x = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * Qd) - 0.5 * ev / Qd)
        s0 = jnp.exp(th["log_s0"]) if "log_s0" in th else jnp.ones(A.shape[0])
        e0 = jnp.diagonal(V[:, 0], axis1=-2, axis2=-1) + (m[:, 0] - th["initial_mean"]) ** 2
        return q_y + q_x + jnp.sum(-0.5 * jnp.log(2 * jnp.pi * s0**2) - 0.5 * e0 / s0**2)

    theta = {k: jnp.asarray(v) for k, v in p1.items() if k not in ("emission_scales", "dynamics_scales", "initial_scales")}
    theta["log_r"] = jnp.log(p1["emission_scales"])
    if "dynamics_scales" in p1:
        theta["log_q"] = jnp.log(p1["dynamics_scales"])
    if "initial_scales" in p1:
        theta["log_s0"] = jnp.log(p1["initial_scales"])
    for name, g in jax.jit(jax.grad(q))(theta).items():
        np.testing.assert_allclose(g, 0.0, atol=1e-8 * float(data.y.size), err_msg=name)
    assert jax.jit(q)(jax.tree.map(lambda a: a + 0.01, theta)) < jax.jit(q)(theta)


@slow
@pytest.mark.float64
def test_hmm_map_m_step_is_stationary_point():
    """MAP (ECM: means given scales, then scales given means): each update zeroes its block's gradient
    of Q + log prior."""
    model = HMM(2, 2, emission="diag_gaussian", sticky=4.0)
    data, truth = model.simulate(KEY, 1, 15)
    start = truth["params"]
    p1, _ = em_method(model)(data, params=start, num_iters=1, tol=0.0, map=True)
    ll = model.emission_log_likelihoods(start, data)
    sm = jax.jit(jax.vmap(lambda l: hmm_smoother(start["initial_probs"], start["transition_matrix"], l)))(ll)
    gamma, y = sm.smoothed_probs, jnp.asarray(data.y)

    def q(means, scales, P):
        lp = norm.logpdf(y[:, :, None, :], means, scales).sum(-1)
        prior = norm.logpdf(means, 0, 5.0).sum() + jnp.sum(-0.5 * scales**2 / 4.0) + 4.0 * jnp.sum(jnp.log(jnp.diag(P)))
        return jnp.sum(gamma * lp) + jnp.sum(sm.pairwise_probs.sum((0, 1)) * jnp.log(P)) + prior

    g_means = jax.grad(q, 0)(jnp.asarray(p1["means"]), jnp.asarray(start["scales"]), jnp.asarray(p1["transition_matrix"]))
    g_scales = jax.grad(q, 1)(jnp.asarray(p1["means"]), jnp.asarray(p1["scales"]), jnp.asarray(p1["transition_matrix"]))
    np.testing.assert_allclose(g_means, 0.0, atol=1e-9)
    np.testing.assert_allclose(g_scales, 0.0, atol=1e-9)
    logits = jnp.log(jnp.asarray(p1["transition_matrix"]))
    g_P = jax.grad(lambda th: q(jnp.asarray(p1["means"]), jnp.asarray(p1["scales"]), jax.nn.softmax(th, -1)))(logits)
    np.testing.assert_allclose(g_P, 0.0, atol=1e-9)


@slow
@pytest.mark.float64
def test_converged_em_is_a_stationary_point_of_the_likelihood():
    """At EM's fixed point the marginal log-likelihood's gradient (jax.grad through the forward filter /
    Kalman filter) vanishes; stationary-initial HMM and local-level LDS."""
    model = HMM(2, 1, emission="diag_gaussian", initial="stationary")
    data, _ = model.simulate(KEY, 1, 80)
    p, h = em_method(model)(data, key=KEY, num_restarts=2, num_iters=2000, tol=1e-11, min_covar=0.0)
    assert h["converged"]

    def ll(theta):
        site = {"transition_matrix": jax.nn.softmax(theta["logits"], -1), "means": theta["means"], "scales": jnp.exp(theta["log_s"])}
        return model.log_likelihood(site, data).sum()

    theta = {"logits": jnp.log(p["transition_matrix"]), "means": jnp.asarray(p["means"]), "log_s": jnp.log(p["scales"])}
    for name, g in jax.grad(ll)(theta).items():
        np.testing.assert_allclose(g, 0.0, atol=2e-4, err_msg=name)

    model = LDS(1, 1, fixed=LOCAL_LEVEL, dynamics_cov="diagonal", initial_cov="diffuse")
    data, _ = model.simulate(KEY, 1, 100)
    p, h = em_method(model)(data, key=KEY, num_restarts=2, num_iters=5000, tol=1e-12)
    f = lambda lr, lq: model.marginal_log_likelihood({"emission_scales": jnp.exp(lr), "dynamics_scales": jnp.exp(lq)}, data).sum()  # noqa: E731
    g = jax.grad(f, (0, 1))(jnp.log(p["emission_scales"]), jnp.log(p["dynamics_scales"]))
    np.testing.assert_allclose(np.concatenate(g), 0.0, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------------
# full covariance with partly observed steps: the missing entries are latent (float64 oracles)


def _gathered_conditionals(y, mask, means, covs):
    """Oracle: per step and state, E[y | y_obs, k] and Cov[y | y_obs, k] by explicit index gathers (numpy)."""
    N, T, D = y.shape
    K = means.shape[0]
    fill, cond = np.zeros((N, T, K, D)), np.zeros((N, T, K, D, D))
    for n in range(N):
        for t in range(T):
            o, m = np.flatnonzero(mask[n, t]), np.flatnonzero(~mask[n, t])
            for k in range(K):
                mu, S = means[k], covs[k]
                fill[n, t, k] = mu
                fill[n, t, k, o] = y[n, t, o]
                if len(o) == 0:
                    cond[n, t, k] = S
                    continue
                gain = S[np.ix_(m, o)] @ np.linalg.inv(S[np.ix_(o, o)])
                fill[n, t, k, m] = mu[m] + gain @ (y[n, t, o] - mu[o])
                cond[n, t, k][np.ix_(m, m)] = S[np.ix_(m, m)] - gain @ S[np.ix_(o, m)]
    return fill, cond


@pytest.mark.float64
@pytest.mark.parametrize("D", [3, 5])  # 14 steps: 2^3 = 8 patterns deduplicated; 2^5 > 14, one per step
def test_conditional_fill_equals_the_gathered_conditional_gaussian(D):
    from ppl_switch.infer.hmm_em import conditional_fill
    from ppl_switch.ops.mask_patterns import mask_patterns

    rng = np.random.default_rng(0)
    N, T, K = 2, 7, 2
    y = rng.normal(size=(N, T, D))
    mask = rng.random((N, T, D)) > 0.4
    mask[0, 0], mask[0, 1] = True, False  # a fully observed and a fully missing step
    means = rng.normal(size=(K, D))
    L = np.tril(rng.normal(size=(K, D, D))) + 2 * np.eye(D)
    covs = L @ np.swapaxes(L, -1, -2)
    w = rng.random((N, T, K))
    fill, cov_sum = conditional_fill(jnp.asarray(w), jnp.asarray(np.where(mask, y, 0.0)), jnp.asarray(mask), jnp.asarray(means), jnp.asarray(covs))
    want_fill, want_cond = _gathered_conditionals(y, mask, means, covs)
    np.testing.assert_allclose(fill, want_fill, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cov_sum, np.einsum("ntk,ntkde->kde", w, want_cond), rtol=1e-10, atol=1e-10)
    patterns, index = mask_patterns(jnp.asarray(mask))
    assert patterns.shape == ((8, 3) if D == 3 else (14, 5))
    np.testing.assert_array_equal(np.asarray(patterns)[np.asarray(index)], mask)


@pytest.fixture(scope="module")
def partly_observed_hmm():
    """HMM(2) in 3-D, 2 x 60 steps, a quarter of the entries missing at random (most steps partly observed)."""
    model = HMM(2, 3, emission="gaussian")
    data, truth = model.simulate(KEY, 2, 60)
    mask = np.random.default_rng(1).random(np.shape(data.y)) > 0.25
    params = {k: np.asarray(v, np.float64) for k, v in truth["params"].items()}
    return model, np.asarray(data.y, np.float64), mask, params


@pytest.mark.float64
def test_hmm_full_m_step_with_partly_observed_steps_maximises_the_expected_log_likelihood(partly_observed_hmm):
    """One EM step from the truth; Q(mu, Sigma) = sum_tk gamma_tk E[log N(y_t; mu_k, Sigma_k) | y_obs, k] with the
    conditional moments from the gather oracle has zero gradient at the returned means and Cholesky factors."""
    model, y, mask, start = partly_observed_hmm
    data = model.prepare(y, mask=mask)
    p1, _ = em_method(model)(data, params=start, num_iters=1, tol=0.0, min_covar=0.0)
    ll = model.emission_log_likelihoods(start, data)
    gamma = jax.vmap(lambda l: hmm_smoother(start["initial_probs"], start["transition_matrix"], l).smoothed_probs)(ll)
    gamma = gamma * mask.any(-1)[..., None]  # a step with nothing observed carries no information about mu, Sigma
    scale_tril = np.asarray(start["scales"])[..., :, None] * np.asarray(start["corr_cholesky"])
    fill, cond = _gathered_conditionals(np.asarray(data.y), np.asarray(data.mask), np.asarray(start["means"]),
                                        scale_tril @ np.swapaxes(scale_tril, -1, -2))

    def q(theta):
        L = jnp.tril(theta["L"])
        prec = jnp.linalg.inv(L @ jnp.swapaxes(L, -1, -2))
        r = fill - theta["means"]
        second = r[..., :, None] * r[..., None, :] + cond  # E[(y - mu)(y - mu)' | y_obs, k]
        logdet = 2 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(L, axis1=-2, axis2=-1))), -1)
        lp = -0.5 * (logdet + jnp.einsum("kde,ntked->ntk", prec, second))
        return jnp.sum(gamma * lp)

    fitted_tril = np.asarray(p1["scales"])[..., :, None] * np.asarray(p1["corr_cholesky"])
    theta = {"means": jnp.asarray(p1["means"]), "L": jnp.asarray(fitted_tril)}
    for name, g in jax.grad(q)(theta).items():
        np.testing.assert_allclose(g, 0.0, atol=1e-8 * float(data.y.size), err_msg=name)
    assert q(jax.tree.map(lambda a: a + 0.01, theta)) < q(theta)


@pytest.mark.float64
def test_hmm_full_em_with_partly_observed_steps_converges_to_a_stationary_point_of_the_likelihood(partly_observed_hmm):
    """The objective never decreases, and at EM's fixed point the observed-data log-likelihood (the model's masked
    Gaussian marginals through the forward filter, differentiated by jax.grad) has zero gradient."""
    model, y, mask, _ = partly_observed_hmm
    data = model.prepare(y, mask=mask)
    p, h = em_method(model)(data, key=KEY, num_restarts=2, num_iters=3000, tol=1e-10, min_covar=0.0)
    _nondecreasing(h, rel=1e-12)
    assert h["converged"]

    def ll(theta):
        L = jnp.tril(theta["L"])
        scales = jnp.linalg.norm(L, axis=-1)
        site = {"transition_matrix": jax.nn.softmax(theta["logits"], -1), "initial_probs": p["initial_probs"],
                "means": theta["means"], "scales": scales, "corr_cholesky": L / scales[..., None]}
        return model.log_likelihood(site, data).sum()

    tril = np.asarray(p["scales"])[..., :, None] * np.asarray(p["corr_cholesky"])
    theta = {"logits": jnp.log(p["transition_matrix"]), "means": jnp.asarray(p["means"]), "L": jnp.asarray(tril)}
    for name, g in jax.grad(ll)(theta).items():
        np.testing.assert_allclose(g, 0.0, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_options_fail_before_compiling():
    with pytest.raises(ValueError, match="initial"):
        HMM(2, 1, initial="uniform")
    with pytest.raises(ValueError, match="initial"):
        HMM(2, 1, initial=[0.5, 0.6])
    with pytest.raises(ValueError, match="fixed: unknown parameter 'emission_scales'"):
        LDS(1, 1, fixed={"emission_scales": [1.0]})
    with pytest.raises(ValueError, match="fixed: emission_matrix must be"):
        LDS(1, 2, fixed={"emission_matrix": [[1.0]]})
    with pytest.raises(ValueError, match="initial_cov"):
        LDS(1, 1, initial_cov="flat")
    y = np.random.default_rng(0).normal(size=(1, 10, 2))
    with pytest.raises(ValueError, match="fixed, square, invertible emission_matrix"):
        em_method(LDS(1, 2, initial_cov="diffuse"))(LDS(1, 2, initial_cov="diffuse").prepare(y))
    model = HMM(2, 2)
    with pytest.raises(NotImplementedError, match="map=True"):
        em_method(model)(model.prepare(y), map=True)
    mask = np.ones_like(y, bool)
    mask[0, 3, 0] = False
    ar = ARHMM(2, 2, lags=1)
    with pytest.raises(DataError, match="mask: the ARHMM's EM needs every step fully observed"):
        em_method(ar)(ar.prepare(y, mask=mask))
    with pytest.raises(ValueError, match="num_restarts"):
        em_method(model)(model.prepare(y), num_restarts=0)
    diffuse = LDS(1, 1, fixed=LOCAL_LEVEL, dynamics_cov="diagonal", initial_cov="diffuse")
    with pytest.raises(DataError, match="first step"):
        diffuse.prepare(y[..., :1], mask=np.zeros((1, 10, 1), bool) | (np.arange(10) > 0)[None, :, None])


def test_em_refuses_a_subclass_with_its_own_emission():
    """A user's HMM subclass with another emission density must not get the Gaussian M-step silently."""

    class ShiftedHMM(HMM):
        def emission_log_likelihoods(self, params, data):
            return super().emission_log_likelihoods(params, data) - 1.0

    data, _ = HMM(2, 1).simulate(KEY, 2, 20)
    with pytest.raises(NotImplementedError, match="ShiftedHMM overrides emission_log_likelihoods"):
        em_method(ShiftedHMM(2, 1))(data, key=KEY)
    em_method(HMM(2, 1))(data, key=KEY, num_iters=2, num_restarts=1)  # the built-in class is accepted


def test_fit_em_finds_the_library_em_of_the_nearest_built_in_class_and_a_models_own_em_first():
    """EM lives in infer/ (models import no inference): fit_em looks it up by the model's class."""
    from ppl_switch.infer.em import has_em, library_em
    from ppl_switch.infer.hmm_em import chain_em
    from ppl_switch.infer.lds_em import lds_em
    from ppl_switch.models import GDM, RSLDS, SLDS
    from ppl_switch.models.base import Model

    assert library_em(HMM) is chain_em and library_em(ARHMM) is chain_em and library_em(LDS) is lds_em
    assert (library_em(SLDS).__name__, library_em(RSLDS).__name__) == ("slds_em", "rslds_em")  # RSLDS(SLDS): its own
    assert library_em(GDM) is None and em_method(GDM(2, 2, 3)) is None
    assert library_em(type("HMM", (Model,), {})) is None  # a user's class named like a built-in one is not it

    class OwnEM(HMM):
        def em(self, data, **kw):
            return {"means": np.zeros((2, 1))}

    class NoEM(HMM):
        em = None  # the model says it has none

    assert em_method(OwnEM(2, 1)).__func__ is OwnEM.em  # a model's own method comes first
    assert em_method(NoEM(2, 1)) is None and not has_em(NoEM) and has_em(OwnEM) and has_em(HMM) and not has_em(GDM)
    found = em_method(HMM(2, 1))
    assert found.func is chain_em and found.args[0].num_states == 2
