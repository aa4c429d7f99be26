"""CLDS with Poisson emissions: the latent path is a block site with the conditionally linear
Gauss–Markov prior, fitted by SVI with the path guide.

Oracles: the path prior against a dense joint Gaussian built from A(u_t), b(u_t), m(u_1), Q, Q_1; the
Laplace smoother against autodiff (zero gradient at the mode, inverse Hessian, Laplace evidence);
padded == ragged and values under the mask (the checks of tests/test_conformance.py, done here because
the log-likelihood is conditional on the path ``x``, whose shape follows the data); (slow) recovery of
the head-direction latent from spike counts.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy.stats import multivariate_normal, poisson

from ppl_switch.data import DataError
from ppl_switch.datasets.head_direction import simulate_head_direction
from ppl_switch.guides.path_guide import CLDSPathGuide
from ppl_switch.models.clds import CLDS
from ppl_switch.ops.basis import FourierBasis

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

SMALL_BASIS = FourierBasis(3, 0.7, 0.15)
T_FULL = 12
LENGTHS = [7, T_FULL, 9]


def _model(**kw):
    kw.setdefault("basis", SMALL_BASIS)
    kw.setdefault("varying", ("A", "b", "C", "m"))
    return CLDS(latent_dim=2, obs_dim=4, input_dim=1, emission="poisson", **kw)


@pytest.fixture(scope="module")
def sim():
    model = _model()
    data, truth = model.simulate(jax.random.PRNGKey(0), 3, T_FULL)
    ragged = model.prepare([np.asarray(data.y[i, :n]) for i, n in enumerate(LENGTHS)],
                           inputs=[np.asarray(data.inputs[i, :n]) for i, n in enumerate(LENGTHS)])
    return model, data, truth, ragged


def _without_x(params):
    return {k: v for k, v in params.items() if k != "x"}


def _dense_path_log_prob(model, params, u, x):
    """log N(x_{1:T}) of one trial from its dense joint mean and covariance (T small)."""
    T, D = x.shape
    f = model.parameter_functions(params, jnp.asarray(u))
    cov = model.covariances(params)
    A, b = np.asarray(f["A"]), np.asarray(f["b"])
    Q, Q1 = np.asarray(cov["dynamics_cov"]), np.asarray(cov["initial_cov"])
    mean = [np.asarray(f["m"][0])]
    for t in range(T - 1):
        mean.append(A[t] @ mean[-1] + b[t])
    # x_t = Phi(t, s) x_s + noise: Cov(x_t, x_s) = Phi(t, s) Cov(x_s, x_s) for t >= s
    S = np.zeros((T, T, D, D))
    S[0, 0] = Q1
    for t in range(1, T):
        S[t, t] = A[t - 1] @ S[t - 1, t - 1] @ A[t - 1].T + Q
        for s in range(t):
            S[t, s] = A[t - 1] @ S[t - 1, s]
            S[s, t] = S[t, s].T
    dense = S.transpose(0, 2, 1, 3).reshape(T * D, T * D)
    return multivariate_normal(np.concatenate(mean), dense).logpdf(np.asarray(x).ravel())


# ----- the path prior and the program ----------------------------------------------------------------


def test_path_prior_matches_dense_joint_gaussian(sim):
    model, _, truth, ragged = sim
    params = {k: v for k, v in truth["params"].items() if k != "x"}
    x = np.random.default_rng(1).normal(size=(3, T_FULL, 2))
    lp = np.asarray(jax.jit(lambda p, d, v: model.path_distribution(p, d).log_prob(v))(params, ragged, x))
    u = np.asarray(ragged.inputs)
    for i, n in enumerate(LENGTHS):
        dense = _dense_path_log_prob(model, params, u[i, :n], x[i, :n])
        pad = -0.5 * np.sum(x[i, n:] ** 2) - (T_FULL - n) * math.log(2 * math.pi)  # N(0, I), D = 2
        np.testing.assert_allclose(lp[i], dense + pad, rtol=1e-10)


def test_program_log_density_is_priors_plus_path_plus_counts(sim):
    from numpyro.distributions import LKJCholesky
    from scipy.stats import halfnorm, norm

    model, data, truth, _ = sim
    params = truth["params"]
    ld = jax.jit(lambda p: log_density(model.program, (data,), {}, p)[0])(params)
    priors = sum(norm.logpdf(np.asarray(params[k])).sum() for k in ("W_A", "W_b", "W_C", "W_d", "W_m"))
    priors += sum(halfnorm.logpdf(np.asarray(params[k])).sum() for k in ("dynamics_scale", "initial_scale"))
    priors += sum(float(LKJCholesky(2, 2.0).log_prob(params[k])) for k in ("dynamics_corr_chol", "initial_corr_chol"))
    path = jax.jit(lambda p, v: model.path_distribution(p, data).log_prob(v))(params, params["x"]).sum()
    rates = np.asarray(model.rates(params, params["x"], data.inputs))
    counts = poisson(rates).logpmf(np.asarray(data.y)).sum()
    np.testing.assert_allclose(ld, priors + path + counts, rtol=1e-10)
    dims = model.site_dims()
    assert dims["x"] == ("trial", "time", "latent") and "emission_scale" not in dims
    assert set(dims) == set(params) and all(len(dims[k]) == np.ndim(params[k]) for k in dims)


# ----- padding and masks -----------------------------------------------------------------------------


def test_padded_equals_ragged(sim):
    model, data, truth, ragged = sim
    params = truth["params"]
    x = np.asarray(params["x"])
    ll = np.asarray(model.log_likelihood(params, ragged))
    for i, n in enumerate(LENGTHS):
        p_alone = {**params, "x": x[i:i + 1, :n]}
        np.testing.assert_allclose(ll[i, :n], np.asarray(model.log_likelihood(p_alone, ragged.trial(i)))[0], rtol=1e-10)
        np.testing.assert_array_equal(ll[i, n:], 0.0)
    # the Laplace smoother too (one short trial, to compile it once more only): means, covariances and
    # evidence of the valid steps; the padding gets the N(0, I) prior
    theta = _without_x(params)
    means, covs, _, evidence = model.smooth(theta, ragged)
    m1, c1, _, e1 = model.smooth(theta, ragged.trial(0))
    n = LENGTHS[0]
    np.testing.assert_allclose(means[0, :n], m1[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(covs[0, :n], c1[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(evidence[0], e1[0], rtol=1e-8)
    np.testing.assert_array_equal(means[0, n:], 0.0)
    np.testing.assert_array_equal(covs[0, n:], np.broadcast_to(np.eye(2), (T_FULL - n, 2, 2)))
    # a padded array whose padding holds junk (counts and conditions), with lengths
    junk_y = np.asarray(data.y).copy()
    junk_u = np.asarray(data.inputs).copy()
    for i, n in enumerate(LENGTHS):
        junk_y[i, n:] = 7.0
        junk_u[i, n:] = -50.0
    padded = model.prepare(junk_y, lengths=LENGTHS, inputs=junk_u)
    np.testing.assert_allclose(np.asarray(model.log_likelihood(params, padded)), ll, rtol=1e-10)
    dens = jax.jit(lambda d: log_density(model.program, (d,), {}, params)[0])
    np.testing.assert_allclose(dens(padded), dens(ragged), rtol=1e-10)


def test_values_under_the_mask_do_not_matter(sim):
    model, data, truth, _ = sim
    params = truth["params"]
    rng = np.random.default_rng(0)
    mask = rng.random(data.y.shape) > 0.3
    mask[:, 0] = True
    variants = [np.where(mask, data.y, v) for v in (0.0, 5.0 + rng.integers(0, 9, data.y.shape), np.nan)]
    prepared = [model.prepare(y, mask=mask, inputs=data.inputs) for y in variants]
    lls = [np.asarray(model.log_likelihood(params, d)) for d in prepared]
    evid = [np.asarray(model.smooth(_without_x(params), d)[3]) for d in prepared]
    for k in (1, 2):
        np.testing.assert_allclose(lls[k], lls[0], rtol=1e-12)
        np.testing.assert_allclose(evid[k], evid[0], rtol=1e-10)
    full = np.asarray(model.log_likelihood(params, data))
    assert np.isfinite(lls[0]).all() and not np.allclose(full, lls[0])


# ----- the Laplace smoother (co-smoothing and the SVI start) -----------------------------------------


@pytest.mark.parametrize("link", ["exp", "softplus"])
def test_laplace_smoother_finds_the_mode(link, sim):
    model, _, truth, data = sim  # ragged counts
    if link == "softplus":  # same parameters and counts, another rate function
        model = _model(link=link, bin_size=0.5)
    params = _without_x(truth["params"])
    means, covs, _, evidence = model.smooth(params, data)
    chain = model.path_distribution(params, data)
    T = data.num_timesteps
    n = int(data.lengths[0])

    @jax.jit
    def log_joint(x):
        return chain.log_prob(x) + model.log_likelihood({**params, "x": x}, data).sum(-1)

    grad = jax.jit(jax.grad(lambda x: log_joint(x).sum()))(means)
    assert float(jnp.abs(grad).max()) < 1e-8
    # Laplace: q = N(mode, (-Hessian)^-1), on the valid steps of trial 0
    hess = jax.jit(jax.hessian(lambda v: log_joint(means.at[0, :n].set(v.reshape(n, 2)))[0]))(means[0, :n].ravel())
    cov = np.linalg.inv(-np.asarray(hess))
    blocks = np.stack([cov[2 * t:2 * t + 2, 2 * t:2 * t + 2] for t in range(n)])
    pad = -(T - n) * math.log(2 * math.pi)  # N(0, I) density of the padding at its mode 0 (D = 2)
    dense_evidence = float(log_joint(means)[0] - pad) + n * math.log(2 * math.pi) + 0.5 * np.linalg.slogdet(cov)[1]
    np.testing.assert_allclose(covs[0, :n], blocks, atol=1e-10)
    np.testing.assert_allclose(evidence[0], dense_evidence, rtol=1e-10)


# ----- simulator, runners and errors -----------------------------------------------------------------


def test_simulator_draws_poisson_counts(sim):
    model, data, truth, _ = sim
    y = np.asarray(data.y)
    assert np.all(y >= 0) and np.all(y == np.round(y))
    rates = np.asarray(model.rates(truth["params"], truth["latents"], data.inputs))
    z = (y.sum() - rates.sum()) / np.sqrt(rates.sum())
    assert abs(z) < 4, z  # the total count matches the total rate (Poisson sd)
    # per neuron, the counts follow the rates: correlation over (trial, time)
    corr = [np.corrcoef(y[..., n].ravel(), rates[..., n].ravel())[0, 1] for n in range(4)]
    assert min(corr) > 0.5, corr
    np.testing.assert_allclose(truth["params"]["x"], truth["latents"])
    # the head-direction Poisson recipe shares its latent paths with the Gaussian one
    g = simulate_head_direction(seed=2, num_trials=3, num_timesteps=20)
    p = simulate_head_direction(seed=2, num_trials=3, num_timesteps=20, emission="poisson", baseline_rate=3.0)
    np.testing.assert_allclose(p["latents"], g["latents"])
    assert np.all(p["y"] == np.round(p["y"])) and p["truth"]["emission_bias"][0] == pytest.approx(math.log(3.0))


def test_errors_name_the_argument(sim):
    from ppl_switch.infer import fit_em
    from ppl_switch.infer.clds_em import run_clds_em

    model, data, truth, _ = sim
    with pytest.raises(ValueError, match="emission"):
        fit_em(model, data, num_iters=2)
    with pytest.raises(ValueError, match="emission"):
        run_clds_em(model, data, num_iters=2)
    with pytest.raises(ValueError, match="emission_cov"):
        _model(emission_cov="full")
    with pytest.raises(ValueError, match="link"):
        _model(link="relu")
    with pytest.raises(ValueError, match="bin_size"):
        _model(bin_size=0.0)
    with pytest.raises(ValueError, match="emission_cov"):
        _model(fixed={"emission_cov": np.ones(4)})
    with pytest.raises(DataError, match="y"):
        model.prepare(np.asarray(data.y) + 0.5, inputs=data.inputs)
    params = {k: v for k, v in truth["params"].items() if k != "x"}
    with pytest.raises(ValueError, match="'x'"):
        model.log_likelihood(params, data)
    with pytest.raises(ValueError, match="x"):
        model.log_likelihood({**params, "x": truth["params"]["x"][:2]}, data)


def test_the_svi_runner_starts_the_path_at_the_libraries_em_start(sim, monkeypatch):
    """``ppl_switch.fit``'s SVI runner builds the guide with the library's start (``data_driven_guide``): the
    path at ``clds_start``'s (Gaussian EM on the log counts, then the Laplace paths), the parameters at prior
    medians (only x is passed); the model's own ``default_guide(data)`` starts at its cheap ``init_values``."""
    from ppl_switch.infer import recommended
    from ppl_switch.infer.clds_em import clds_start

    model, data, _, _ = sim
    seen = {}
    monkeypatch.setattr(recommended, "fit_svi", lambda model, data, guide, **kw: seen.setdefault("guide", guide))
    recommended.RUNNERS["svi"](model, data, seed=0, x64=True, progress_bar=False)
    guide = seen["guide"]
    assert isinstance(guide, CLDSPathGuide) and set(guide.init_values) == {"x"}
    np.testing.assert_array_equal(guide.init_values["x"], clds_start(model, data)["x"])
    cheap = model.default_guide(data)
    np.testing.assert_array_equal(cheap.init_values["x"], model.init_values(data)["x"])
    assert np.isfinite(cheap.init_values["x"]).all()


@pytest.mark.parametrize("start", ["prior", "values"])
def test_compiled_init_of_the_path_guide_equals_the_eager_init(sim, start):
    """fit_svi's compiled init of a path guide (its parameter block set up first with the key it would draw
    inside svi.init) gives numpyro's eager ``svi.init``'s state: every guide parameter, prior-median start
    and a start from given site values."""
    import optax
    from numpyro.infer import SVI, Trace_ELBO

    from ppl_switch.infer import svi as svi_mod

    model, data, truth, _ = sim
    init_values = None if start == "prior" else {**_without_x(truth["params"]), "x": np.asarray(truth["params"]["x"])}
    states = []
    for init in ("eager", "compiled"):
        guide = CLDSPathGuide(model, init_values=init_values)
        svi = SVI(model.program, guide, optax.adam(0.01), Trace_ELBO())
        key = jax.random.PRNGKey(4)
        state = svi.init(key, data) if init == "eager" else svi_mod._compiled_path_guide_init(svi, guide, key, data)
        states.append(svi.get_params(state))
    eager, compiled = states
    assert eager.keys() == compiled.keys() and any(k.endswith("_auto_loc") for k in eager)
    for name in eager:
        np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_svi_with_the_path_guide(sim):
    """fit_svi on ragged counts with the default guide (the path guide): draws of every site, the
    log_likelihood group equals the model's at a draw, integer posterior predictive; config round trip.
    (The data-driven start, ``data_driven_guide(model, data)``, is exercised by the recovery test.) Slow: compiling
    the SVI step, the draws and the ArviZ groups takes ~1 min of CPU in float64."""
    from ppl_switch.infer import fit_svi
    from ppl_switch.results import get_group

    model, _, _, ragged = sim
    assert isinstance(model.default_guide(), CLDSPathGuide)
    fit = fit_svi(model, ragged, num_steps=10, num_draws=4, seed=0, progress_bar=False)
    assert np.isfinite(fit.losses).all()
    assert fit.samples["x"].shape == (1, 4, 3, T_FULL, 2) and "emission_scale" not in fit.samples
    draw = {k: np.asarray(v)[0, -1] for k, v in fit.samples.items()}
    stored = get_group(fit.idata, "log_likelihood")["y"].values[0, -1]
    np.testing.assert_allclose(stored, np.asarray(model.log_likelihood(draw, ragged)), rtol=1e-6)
    assert np.all(stored[0, LENGTHS[0]:] == 0.0)
    pred = get_group(fit.idata, "posterior_predictive")["y"].values
    inside = np.asarray(ragged.mask)
    assert np.all(pred[..., inside] >= 0) and np.all(pred[..., inside] == np.round(pred[..., inside]))
    # the exact mean of q(x) and the draws agree; steps past a trial's length are decoupled
    q_mean = np.asarray(CLDSPathGuide.path_means(fit.params, ragged))
    assert q_mean.shape == (3, T_FULL, 2) and np.isfinite(q_mean).all()
    clone = CLDS(**json.loads(json.dumps(model.config())))
    assert (clone.emission, clone.link, clone.bin_size, clone.emission_bias) == ("poisson", "exp", 1.0, True)


# ----- slow: the head-direction latent from spike counts ---------------------------------------------


def affine_r2(x_hat, x):
    """R^2 of the best affine map from x_hat to x (the latent is identified only up to an affine map)."""
    X = np.concatenate([x_hat.reshape(-1, x_hat.shape[-1]), np.ones((x_hat[..., 0].size, 1))], 1)
    Y = x.reshape(-1, x.shape[-1])
    W = np.linalg.lstsq(X, Y, rcond=None)[0]
    return 1 - ((Y - X @ W) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()


@pytest.mark.slow
def test_poisson_ring_latent_recovery():
    """20 trials x 50 steps of counts from the ring attractor (10 neurons, baseline 2 per bin, C and d
    learned): SVI with the path guide recovers the latent to affine R^2 >= 0.95 and beats PCA of
    log(y + 0.5) by > 0.02. Measured in float32 on this draw: PCA 0.931, start (Gaussian EM + Laplace)
    0.971, SVI 0.976; on other draws of the same recipe SVI gave 0.964, 0.974 and 0.954
    (``benchmarks/clds.py poisson``), so 0.95 is the floor of what we saw, not a tuned value. Poisson
    noise at ~4 counts per bin keeps the attainable R^2 below 1."""
    from ppl_switch.infer import fit_svi
    from ppl_switch.infer.starts import data_driven_guide

    d = simulate_head_direction(seed=0, num_trials=20, num_timesteps=50, emission="poisson")
    model = CLDS(latent_dim=2, obs_dim=10, input_dim=1, basis=FourierBasis(5, 0.5, 0.1), emission="poisson")
    data = model.prepare(d["y"], inputs=d["inputs"])
    z = np.log(d["y"] + 0.5).reshape(-1, 10)
    z = z - z.mean(0)
    pca = (z @ np.linalg.svd(z, full_matrices=False)[2][:2].T).reshape(20, 50, 2)
    r2_pca = affine_r2(pca, d["latents"])
    guide = data_driven_guide(model, data)  # ppl_switch.fit's start: Gaussian EM on log counts, then the Laplace paths
    assert affine_r2(guide.init_values["x"], d["latents"]) > r2_pca
    fit = fit_svi(model, data, guide=guide, num_steps=1000, learning_rate=0.01, num_draws=20, seed=0,
                  progress_bar=False)
    r2 = affine_r2(np.asarray(CLDSPathGuide.path_means(fit.params, data)), d["latents"])
    assert r2 >= 0.95 and r2 > r2_pca + 0.02, (r2, r2_pca)
