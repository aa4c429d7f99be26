"""gpSLDS / GP-SDE: the weight-space prior against its kernel, the path guide, the fixed-point tools,
the synthetic generator, data handling. Recovery on the paper's benchmark is behind ``-m slow``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from ppl_switch.analysis import gpslds_analysis as ga
from ppl_switch.data import DataError
from ppl_switch.datasets.gpslds_synthetic import TRUE_FIXED_POINTS, simulate_gpslds_synthetic, two_rotation_drift
from ppl_switch.guides.gauss_markov import GaussMarkovChain, chain_precision_blocks
from ppl_switch.guides.latent_sde import SDEPathChain
from ppl_switch.models.gpslds import GPSDE, GPSLDS, ssl_kernel
from ppl_switch.results import credible_interval_convention

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _prior_drift_draws(model, num, key):
    """{site: (num, ...)} prior draws of the drift parameters (the program's own sample statements)."""

    def one(k):
        with handlers.seed(rng_seed=k):
            return model._sample_drift_params()

    return jax.vmap(one)(jax.random.split(key, num))


# --------------------------------------------------------------------------------------------------
# the SSL prior: weight space == kernel


@pytest.mark.parametrize("features", ["linear", "quadratic"])
def test_weight_space_covariance_equals_ssl_kernel(features):
    """Cov[f_k(x), f_k(x')] from the weights (Phi(x)' diag(M, sigma0^2) Phi(x')) = closed-form eq. 5."""
    model = GPSLDS(num_states=3, latent_dim=2, features=features)
    rng = np.random.default_rng(0)
    p = {"partition_weights": rng.normal(size=(3, 2)), "temperature": 0.7, "fixed_points": rng.normal(size=(3, 2)),
         "regime_matrix": np.zeros((3, 2, 2)), "regime_offset": np.zeros((3, 2))}
    p = {k: jnp.asarray(v) for k, v in p.items()}
    slope_var, offset_var = jnp.array([0.5, 2.0]), 1.7
    x1, x2 = jnp.asarray(rng.normal(size=(5, 2)) * 3), jnp.asarray(rng.normal(size=(4, 2)) * 3)
    prior_var = jnp.concatenate([slope_var, jnp.array([offset_var])])
    phi1, phi2 = model.weight_features(p, x1), model.weight_features(p, x2)  # (n, J, K+1)
    cov = jnp.einsum("njw,w,mjw->nm", phi1, prior_var, phi2)
    ref = ssl_kernel(x1, x2, p["partition_weights"], p["temperature"], p["fixed_points"], slope_var, offset_var, features)
    np.testing.assert_allclose(cov, ref, rtol=1e-10)
    # and the drift is exactly that feature map applied to the weights
    W = rng.normal(size=(3, 2, 3))
    p2 = dict(p, regime_matrix=jnp.asarray(W[..., :2]), regime_offset=jnp.asarray(W[..., 2]))
    np.testing.assert_allclose(model.drift(p2, x1), jnp.einsum("njw,jkw->nk", phi1, W), rtol=1e-10)


def test_prior_draws_of_the_drift_have_the_kernel_covariance():
    """Monte Carlo over the program's own priors with partition and centres held fixed ("linear"
    kernel: M = I, sigma0 = 1): the sample covariance of f_0 at two points matches the kernel."""
    model = GPSLDS(num_states=2, latent_dim=2, kernel="linear")
    fixed = {"partition_weights": jnp.array([[0.3], [1.0], [-0.5]]), "temperature": jnp.asarray(0.5),
             "fixed_points": jnp.array([[1.0, 0.0], [-1.0, 0.5]])}
    n = 40000
    draws = _prior_drift_draws(model, n, jax.random.PRNGKey(0))
    draws.update({k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in fixed.items()})
    x = jnp.array([[0.5, 1.0], [-2.0, 0.3]])
    f = jax.vmap(lambda p: model.drift(p, x))(draws)[..., 0]  # (n, 2)
    emp = np.cov(np.asarray(f).T)
    ref = np.asarray(ssl_kernel(x, x, fixed["partition_weights"], fixed["temperature"], fixed["fixed_points"], jnp.ones(2), 1.0))
    np.testing.assert_allclose(emp, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_ssl_gram_is_psd_with_rank_J_times_K_plus_1():
    rng = np.random.default_rng(1)
    g, _ = ga.grid_points(-4, 4, 5)
    W, c = jnp.asarray(rng.normal(size=(3, 1))), jnp.asarray(rng.normal(size=(2, 2)))
    G = np.asarray(ssl_kernel(jnp.asarray(g), jnp.asarray(g), W, 0.5, c, jnp.ones(2), 1.0))
    ev = np.linalg.eigvalsh(G)
    assert ev.min() > -1e-8 * ev.max()
    assert int((ev > 1e-6 * ev.max()).sum()) == 2 * 3


def test_rbf_basis_approximates_the_rbf_kernel():
    model = GPSDE(latent_dim=2, num_basis=20, box=12.0)
    p = {"rbf_lengthscale": jnp.asarray(2.0), "rbf_amplitude": jnp.asarray(1.5)}
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-5, 5, size=(8, 2)))
    phi = model.basis(p, x)
    approx = phi @ phi.T
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    exact = 1.5**2 * jnp.exp(-0.5 * d2 / 2.0**2)
    np.testing.assert_allclose(approx, exact, atol=0.02)


# --------------------------------------------------------------------------------------------------
# the path guide


def test_sde_path_chain_is_the_gauss_markov_chain_with_mean_mbar():
    """The guide's chain: parallel-scan paths = sequential ones, E[x_t] = mbar_t, and its log_prob is
    the dense Gaussian density (chain_precision_blocks)."""
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.05)
    data, _ = model.simulate(jax.random.PRNGKey(0), 2, 6)
    rng = np.random.default_rng(3)
    mbar = rng.normal(size=(2, 6, 2))
    guide = model.default_guide(init_values={"x": mbar})
    params = {"x_drift_matrices": jnp.asarray(rng.normal(size=(2, 5, 2, 2)))}
    with handlers.seed(rng_seed=0), handlers.substitute(data=params):
        chain = guide.path(data)
    assert isinstance(chain, SDEPathChain)
    eps = jnp.asarray(rng.normal(size=(2, 6, 2)))
    seq = GaussMarkovChain._path(chain, eps)
    np.testing.assert_allclose(chain._path(eps), seq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chain.mean, mbar, rtol=1e-10, atol=1e-12)
    mean, prec = chain_precision_blocks(chain)
    x = np.asarray(seq[0]).ravel()
    r = x - mean
    _, logdet = np.linalg.slogdet(prec)
    ref = -0.5 * r @ prec @ r + 0.5 * logdet - 0.5 * len(x) * np.log(2 * np.pi)
    np.testing.assert_allclose(float(chain.log_prob(seq)[0]), ref, rtol=1e-9)


def test_global_affine_guide_maps_every_path_and_its_density():
    """``global_affine=True``: with S, m set, the chain's paths are S x + m for the same noise, and its
    density is the base density less T log|det S| per trial (the same Gaussian family)."""
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=3, dt=0.05)
    data, _ = model.simulate(jax.random.PRNGKey(0), 2, 6)
    rng = np.random.default_rng(4)
    mbar = rng.normal(size=(2, 6, 2))
    S = np.array([[1.7, 0.0], [-0.4, 0.6]])
    m = np.array([0.3, -1.2])
    params = {"x_drift_matrices": jnp.asarray(rng.normal(size=(2, 5, 2, 2)))}
    chains = {}
    for affine in (False, True):
        guide = model.default_guide(init_values={"x": mbar}, global_affine=affine)
        extra = {"x_global_scale_tril": jnp.asarray(S), "x_global_offset": jnp.asarray(m)} if affine else {}
        with handlers.seed(rng_seed=0), handlers.substitute(data={**params, **extra}):
            chains[affine] = guide.path(data)
    eps = jnp.asarray(rng.normal(size=(2, 6, 2)))
    x = chains[False]._path(eps)
    np.testing.assert_allclose(chains[True]._path(eps), x @ S.T + m, rtol=1e-10, atol=1e-10)
    want = chains[False].log_prob(x) - 6 * np.log(abs(np.linalg.det(S)))
    np.testing.assert_allclose(chains[True].log_prob(x @ S.T + m), want, rtol=1e-10)


def test_data_only_start_sets_the_quadratic_partition_at_the_median_radius():
    """``default_guide(data)``: quadratic features start the partition at the circle through the start
    path's median radius (half the steps on each side); linear features keep the prior median."""
    from numpyro.infer import SVI, Trace_ELBO
    import optax

    linear = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.05, emission="gaussian")
    assert linear.path_start_parameters(np.ones((1, 5, 2))) == {}
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.05, emission="gaussian", features="quadratic")
    data, _ = model.simulate(jax.random.PRNGKey(2), 3, 40)
    guide = model.default_guide(data)
    svi = SVI(model.program, guide, optax.adam(1e-3), Trace_ELBO())
    start = guide.parameter_guide.median(svi.get_params(svi.init(jax.random.PRNGKey(0), data)))
    x0 = guide.init_values["x"]
    r2 = (x0.reshape(-1, 2) ** 2).sum(-1)
    expected = np.r_[np.median(r2), -1.0, -1.0][:, None] / r2.std()
    np.testing.assert_allclose(start["partition_weights"], expected, rtol=1e-4)
    np.testing.assert_allclose(start["temperature"], 0.5, rtol=1e-5)
    inside = np.asarray(model.partition(start, jnp.asarray(x0))[..., 0] > 0.5)
    assert abs(inside.mean() - 0.5) < 0.01


# --------------------------------------------------------------------------------------------------
# fixed points and slow points


def test_fixed_point_finder_on_a_linear_field():
    model = GPSLDS(num_states=1, latent_dim=2, kernel="linear")
    A = np.array([[-0.5, -2.0], [2.0, -0.5]])
    c, e = np.array([1.0, -2.0]), np.array([0.3, -0.4])
    samples = {"fixed_points": c[None, None], "regime_matrix": A[None, None], "regime_offset": e[None, None]}
    starts, _ = ga.grid_points(-5, 5, 4)
    fp = ga.fixed_points(model, samples, starts, region=(np.full(2, -5.0), np.full(2, 5.0)))
    assert fp["num_roots"].tolist() == [1]
    np.testing.assert_allclose(fp["points"][0, 0], c - np.linalg.solve(A, e), atol=1e-8)
    np.testing.assert_allclose(np.sort_complex(fp["eigenvalues"][0, 0]), np.sort_complex(np.linalg.eigvals(A)), atol=1e-8)
    assert fp["stability"][0, 0] == "stable focus"


def test_fixed_points_of_the_true_two_rotation_field():
    """The generator's field in the model's own parameterisation has the notes' equilibria in [-8, 8]^2,
    both unstable foci (eigenvalues ~0.2505 +- 3.15i inside the regimes)."""
    from ppl_switch.datasets.gpslds_synthetic import two_rotation_parameters

    model = GPSLDS(num_states=2, latent_dim=2, kernel="linear")
    truth = two_rotation_parameters()
    samples = {k: np.asarray(v)[None] for k, v in truth.items()}
    samples["temperature"] = np.asarray([truth["temperature"]])
    starts, _ = ga.grid_points(-8, 8, 7)
    fp = ga.fixed_points(model, samples, starts, region=(np.full(2, -8.0), np.full(2, 8.0)))
    roots = fp["points"][0, : fp["num_roots"][0]]
    assert len(roots) == 2
    np.testing.assert_allclose(roots[np.argsort(-roots[:, 0])], TRUE_FIXED_POINTS, atol=1e-5)
    assert set(fp["stability"][0, :2]) == {"unstable focus"}
    np.testing.assert_allclose(np.asarray(model.drift(samples_first(samples), jnp.asarray(TRUE_FIXED_POINTS))), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(two_rotation_drift(TRUE_FIXED_POINTS)), 0, atol=1e-5)


def samples_first(samples):
    return {k: jnp.asarray(v[0]) for k, v in samples.items()}


def test_slow_point_probability_gaussian_matches_empirical():
    rng = np.random.default_rng(4)
    mean, sd = rng.normal(size=(6, 2)) * 0.5, 0.2 + rng.random((6, 2)) * 0.5
    draws = mean + sd * rng.standard_normal((200000, 6, 2))
    gauss = ga.slow_point_probability(mean, sd**2, eps=0.3)
    emp = ga.slow_point_probability(eps=0.3, draws=draws, method="empirical")
    np.testing.assert_allclose(gauss, emp, atol=5e-3)


def test_credible_regions_cluster_draws():
    rng = np.random.default_rng(5)
    pts = np.full((300, 3, 2), np.nan)
    pts[:, 0] = [3.0, 0.0] + 0.2 * rng.standard_normal((300, 2))
    pts[:150, 1] = [-3.0, 0.0] + 0.2 * rng.standard_normal((150, 2))
    regions = ga.fixed_point_regions(pts)
    assert len(regions) == 2
    np.testing.assert_allclose(regions[0]["mean"], [3, 0], atol=0.05)
    assert regions[0]["fraction"] == 1.0 and regions[1]["fraction"] == 0.5
    assert ga.in_credible_ellipse(regions[0], [3.1, 0.1]) and not ga.in_credible_ellipse(regions[0], [4.0, 0.0])


def test_credible_level_is_the_coverage_of_a_gaussian_region():
    """The level of the smallest ellipse holding x: uniform over repeated truths drawn from the region's own
    Gaussian (what calibration across data sets means); the membership test at prob is level <= prob, by
    default at the library's credible probability."""
    rng = np.random.default_rng(6)
    cov = np.array([[0.04, 0.03], [0.03, 0.09]])
    region = {"mean": np.array([3.0, 0.5]), "cov": cov}
    truths = rng.multivariate_normal(region["mean"], cov, size=4000)
    levels = np.array([ga.credible_level(region, x) for x in truths])
    np.testing.assert_allclose(np.quantile(levels, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.03)
    for prob in (0.5, 0.94):
        inside = np.array([ga.in_credible_ellipse(region, x, prob) for x in truths])
        np.testing.assert_array_equal(inside, levels <= prob)
    default = np.array([ga.in_credible_ellipse(region, x) for x in truths])
    np.testing.assert_array_equal(default, levels <= credible_interval_convention()[0])
    with pytest.raises(ValueError, match="prob"):
        ga.in_credible_ellipse(region, truths[0], 1.5)
    with pytest.raises(ValueError, match="2-d region"):
        ga.credible_level({"mean": np.zeros(3), "cov": np.eye(3)}, np.zeros(3))


# --------------------------------------------------------------------------------------------------
# data handling and the generator


def test_synthetic_generator_matches_the_recipe():
    sim = simulate_gpslds_synthetic(seed=0, num_trials=4, num_timesteps=300)
    assert sim["y"].shape == (4, 300, 50) and sim["latents"].shape == (4, 300, 2)
    np.testing.assert_array_equal(sim["latents"][:2, 0], [[-7, 0], [-7, 0]])
    np.testing.assert_array_equal(sim["latents"][2:, 0], [[7, 0], [7, 0]])
    assert set(np.unique(sim["y"])) <= {0.0, 1.0}
    A_right = sim["truth"]["regime_matrix"][0]
    np.testing.assert_allclose(A_right, [[0.250508, -3.150499], [3.150499, 0.250508]], atol=1e-6)


def test_a_seed_names_one_data_set_whatever_the_precision_mode():
    """jax.random draws differ between float32 and float64 for one key; the generators run in float32 so a
    seed gives the same data with or without jax_enable_x64 (the tests run with it on)."""
    from ppl_switch.datasets import simulate

    assert jax.config.jax_enable_x64
    with_x64 = simulate_gpslds_synthetic(seed=3, num_trials=2, num_timesteps=200), simulate("lds", seed=2)
    with jax.enable_x64(False):
        without = simulate_gpslds_synthetic(seed=3, num_trials=2, num_timesteps=200), simulate("lds", seed=2)
    for a, b in zip(with_x64, without):
        for name in ("y", "latents"):
            np.testing.assert_array_equal(a[name], b[name])


def test_padding_and_masks_for_point_process_data():
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.01)
    data, truth = model.simulate(jax.random.PRNGKey(1), 2, 10)
    params = truth["params"]
    ll = np.asarray(model.log_likelihood(params, data))
    y = np.asarray(data.y).copy()
    y[0, 6:] = 7.0  # junk in the padding
    padded = model.prepare(y, lengths=[6, 10])
    ll_p = np.asarray(model.log_likelihood(params, padded))
    np.testing.assert_allclose(ll_p[0, :6], ll[0, :6], rtol=1e-12)
    np.testing.assert_array_equal(ll_p[0, 6:], 0.0)
    np.testing.assert_allclose(ll_p[1], ll[1], rtol=1e-12)
    mask = np.random.default_rng(0).random(y.shape) > 0.4
    y1, y2 = np.where(mask, data.y, 0.0), np.where(mask, data.y, 3.0)
    a = np.asarray(model.log_likelihood(params, model.prepare(y1, mask=mask)))
    b = np.asarray(model.log_likelihood(params, model.prepare(y2, mask=mask)))
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(a, ll)


def test_bad_configuration_and_data_are_named():
    with pytest.raises(ValueError, match="num_states"):
        GPSLDS(num_states=0)
    with pytest.raises(ValueError, match="emission"):
        GPSLDS(emission="bernoulli")
    with pytest.raises(ValueError, match="features"):
        GPSLDS(features="cubic")
    with pytest.raises(ValueError, match="link"):
        GPSLDS(link="relu")
    with pytest.raises(ValueError, match="kernel"):
        GPSLDS(kernel="rbf")
    with pytest.raises(ValueError, match="fixed_emission"):
        GPSLDS(latent_dim=2, fixed_emission={"emission_matrix": np.zeros((3, 3)), "emission_bias": np.zeros(3)})
    model = GPSLDS(obs_dim=3)
    with pytest.raises(DataError, match="y"):
        model.prepare(np.full((2, 5, 3), 0.5))  # point-process data must be counts
    with pytest.raises(DataError, match="y"):
        model.prepare(np.zeros((2, 5, 4)))


# --------------------------------------------------------------------------------------------------
def test_readout_alignment_recovers_a_known_affine_map_per_draw():
    rng = np.random.default_rng(0)
    C_true, d_true = rng.standard_normal((50, 2)), rng.standard_normal(50)
    A = rng.standard_normal((4, 2, 2)) + 2 * np.eye(2)  # four draws of x_true = A x_hat + b
    b = rng.standard_normal((4, 2))
    C_hat = np.einsum("nk,skj->snj", C_true, A)  # C_hat x_hat + d_hat = C_true x_true + d_true
    d_hat = d_true + b @ C_true.T
    P, o = ga.align_by_emissions(C_hat, d_hat, C_true, d_true)
    np.testing.assert_allclose(P, A, atol=1e-10)
    np.testing.assert_allclose(o, b, atol=1e-10)
    # one draw: plain (K, K), (K,)
    P1, o1 = ga.align_by_emissions(C_hat[0], d_hat[0], C_true, d_true)
    assert P1.shape == (2, 2) and o1.shape == (2,)
    x_hat = rng.standard_normal((10, 2))
    np.testing.assert_allclose(x_hat @ P1.T + o1, x_hat @ A[0].T + b[0], atol=1e-10)


# recovery on the paper's benchmark (minutes): python -m pytest tests/test_gpslds.py -m slow


@pytest.mark.slow
def test_recovers_the_two_rotation_system():
    """30 trials x 2500 steps, 1500 SVI steps from the start path of sd 2 (the benchmark's ``--latent-scales 2``;
    seed 0 there: NMSE 0.101, fixed points 0.357 / 0.379 off). Thresholds: latent R² >= 0.9, normalised
    dynamics MSE < 0.15 on visited cells, both fixed points within 0.5 of the truth, posterior var of f on
    visited cells < 0.5 x unvisited."""
    from ppl_switch.analysis.metrics import affine_aligned_r2
    from ppl_switch.infer import fit_svi

    sim = simulate_gpslds_synthetic(seed=0, num_trials=30)
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=sim["truth"]["dt"])
    data = model.prepare(sim["y"])
    guide = model.default_guide(data, latent_scale=2.0)
    fit = fit_svi(model, data, guide=guide, num_steps=1500, learning_rate=0.02, num_draws=10, progress_bar=False)
    extra = guide.sample_parameters(jax.random.PRNGKey(1), fit.params, 100)
    x_hat = np.asarray(fit.samples["x"])[0].mean(0)
    assert affine_aligned_r2(x_hat.reshape(-1, 2), sim["latents"].reshape(-1, 2)) >= 0.9
    P, o = ga.align_latents(x_hat, sim["latents"])
    cells, visited = ga.visited_cells(sim["latents"], -10, 10, 20, 20)
    f = ga.drift_draws(model, extra, (cells - o) @ np.linalg.inv(P).T) @ P.T
    assert ga.dynamics_nmse(f.mean(0)[visited], np.asarray(two_rotation_drift(cells))[visited]) < 0.15
    var = f.var(0).sum(-1)
    assert var[visited].mean() < 0.5 * var[~visited].mean()
    starts = (ga.grid_points(-8, 8, 6)[0] - o) @ np.linalg.inv(P).T
    roots = ga.fixed_points(model, extra, starts)["points"] @ P.T + o
    regions = ga.fixed_point_regions(roots)
    for xt in TRUE_FIXED_POINTS:
        assert min(np.linalg.norm(r["mean"] - xt) for r in regions) < 0.5
