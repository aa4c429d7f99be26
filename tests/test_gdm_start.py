"""Tests of the GDM's data-driven start: the hard-state EM (against path enumeration and on NASCAR), the
PCA projection, the start values and the guide's ``start`` argument."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy.special import logsumexp
from scipy.stats import norm

from ppl_switch.analysis.gdm_metrics import aligned_state_fixed_points, inferred_state_accuracy
from ppl_switch.analysis.metrics import matched_state_accuracy
from ppl_switch.data import DataError
from ppl_switch.datasets.nascar import nascar
from ppl_switch.guides.gdm_guides import LinearGuide
from ppl_switch.errors import FitError
from ppl_switch.data import interpolate_missing, missing_share
from ppl_switch.infer.gdm_start import hard_state_em, pca_projection, segmentation_start
from ppl_switch.infer.gdm_svi import fit_gdm_svi, resolve_start, soft_states
from ppl_switch.models.gdm import GDM

# oracle comparisons at 1e-8 and below need float64 and are marked so; the default-path tests run in
# float32, what users run (tests/conftest.py)


@pytest.fixture(scope="module")
def nascar_train():
    return nascar(0, 1000, stream="reference")


@pytest.mark.float64
def test_pca_projection_whitens_the_leading_principal_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    y = (rng.standard_normal((2, 400, 5)) * np.array([5.0, 3.0, 0.5, 0.2, 0.1])) @ basis.T + 1.0
    F = pca_projection(y, 2)  # raw y or a SequenceData
    projected = y.reshape(-1, 5) @ F.T
    np.testing.assert_allclose(np.cov(projected.T), np.eye(2), atol=1e-10)
    # rows span the two leading principal directions of the sample covariance
    top = np.linalg.eigh(np.cov(y.reshape(-1, 5).T))[1][:, -2:]
    np.testing.assert_allclose(np.linalg.svd(top.T @ (F / np.linalg.norm(F, axis=1, keepdims=True)).T)[1], 1.0, atol=1e-8)
    with pytest.raises(ValueError, match="latent_dim"):
        pca_projection(GDM().prepare(y), 6)


def _brute_force(y, F, fit, observed=None):
    """log p(y_1: | y_0) and p(s_t | y) by enumerating every state path (uniform initial state); with a
    (T, N) ``observed`` mask only the observed entries of y_t are scored (y_{t-1} is taken as given)."""
    K = fit.transition_matrix.shape[0]
    x = y[:-1] @ F.T
    means = np.einsum("knd,td->tkn", fit.dynamics, x) + fit.offsets
    scored = np.ones_like(y[1:]) if observed is None else observed[1:]
    emit = (norm.logpdf(y[1:, None, :], means, np.sqrt(fit.obs_var)) * scored[:, None, :]).sum(-1)  # (T-1, K)
    paths = np.array(list(itertools.product(range(K), repeat=len(emit))))
    logp = -np.log(K) + emit[np.arange(len(emit)), paths].sum(1)
    logp += np.log(fit.transition_matrix[paths[:, :-1], paths[:, 1:]]).sum(1)
    total = logsumexp(logp)
    weights = np.exp(logp - total)
    marginals = np.stack([np.bincount(paths[:, t], weights, minlength=K) for t in range(len(emit))])
    return total, marginals


@pytest.mark.float64
def test_hard_state_em_likelihood_and_states_match_path_enumeration():
    rng = np.random.default_rng(1)
    y = np.cumsum(rng.standard_normal((1, 8, 3)), 1)
    F = rng.standard_normal((1, 3))
    data = GDM(latent_dim=1).prepare(y)
    fit = hard_state_em(data, F, 2, num_restarts=2, num_iters=5, seed=0)
    total, marginals = _brute_force(y[0], F, fit)
    np.testing.assert_allclose(fit.log_likelihood, total, rtol=1e-10)
    np.testing.assert_allclose(fit.state_probs[0, 1:], marginals, atol=1e-10)
    np.testing.assert_allclose(fit.state_probs[0, 0], fit.state_probs[0, 1])  # step 0 copies step 1
    # missing entries: the regressors read y interpolated in time, the missing targets are not scored
    mask = np.ones(y.shape, bool)
    mask[0, 3, 1] = mask[0, 5, :] = mask[0, 6, 0] = False
    data = GDM(latent_dim=1).prepare(np.where(mask, y, np.nan))
    fit = hard_state_em(data, F, 2, num_restarts=2, num_iters=5, seed=0)
    filled = interpolate_missing(data).y[0]
    total, marginals = _brute_force(filled, F, fit, mask[0])
    np.testing.assert_allclose(fit.log_likelihood, total, rtol=1e-10)
    np.testing.assert_allclose(fit.state_probs[0, 1:], marginals, atol=1e-10)
    np.testing.assert_allclose(filled[5], (y[0, 4] + filled[6]) / 2)  # step 5 interpolated (dim 0 from steps 4, 7)


@pytest.mark.float64
def test_hard_state_em_recovers_nascar_segmentation_and_fixed_points(nascar_train):
    """Standard NASCAR (the paper's training trial): with the PCA projection the hard-state fit finds the
    four true states and the rotation centres (2, 0), (-2, 0) (noise 0.01, so nearly exactly)."""
    model = GDM(num_states=4, latent_dim=2, obs_dim=10)
    data = model.prepare(nascar_train.y)
    model = GDM(num_states=4, latent_dim=2, obs_dim=10, projection_matrix=pca_projection(data, 2))
    fit = hard_state_em(data, model.fixed_projection(10), 4, num_restarts=3, seed=0)
    assert np.all(np.diff(fit.history) > -1e-4 * abs(fit.history[-1]))  # EM never lowers the likelihood
    assert fit.log_likelihood == max(fit.restart_log_likelihoods)
    labels = fit.state_probs[0].argmax(-1)
    accuracy = matched_state_accuracy(labels, nascar_train.states, 4)
    assert accuracy > 0.98
    fixed = aligned_state_fixed_points(model, {"dynamics": fit.dynamics, "offsets": fit.offsets}, nascar_train.y, nascar_train.latents)
    for j in (0, 1):  # the learned state most used on true rotation j
        k = np.bincount(labels[nascar_train.states == j], minlength=4).argmax()
        assert np.linalg.norm(fixed[k] - nascar_train.params["fixed_points"][j]) < 0.05


@pytest.mark.float64
def test_hard_state_em_rejects_bad_input(nascar_train):
    data = GDM().prepare(nascar_train.y[:50])
    with pytest.raises(ValueError, match="projection"):
        hard_state_em(data, np.ones((2, 3)), 4)
    with pytest.raises(DataError, match="too few"):
        hard_state_em(nascar_train.y[:3], np.ones((2, 10)), 4)


@pytest.mark.float64
def test_segmentation_start_fills_the_guide_and_svi_starts_there(nascar_train):
    data = GDM().prepare(nascar_train.y[:300])
    model = GDM(num_states=4, latent_dim=2, obs_dim=10, projection_matrix=pca_projection(data, 2))
    hard_fit = hard_state_em(data, model.fixed_projection(10), 4, num_restarts=3, num_iters=20, seed=0)
    start = segmentation_start(model, data, hard_fit=hard_fit)
    guide = LinearGuide(model, seed=0, start=start)
    defaults = LinearGuide(model, seed=0).init_values(10)
    assert set(start) == set(defaults)
    for name, value in start.items():
        assert value.shape == np.shape(defaults[name]), name
        assert np.all(np.isfinite(value)), name
    trace = handlers.trace(handlers.seed(guide, 0)).get_trace(jax.tree.map(jnp.asarray, data))
    for name in ("dynamics_map", "offsets_map", "guide_W", "transition_weights_map"):
        np.testing.assert_allclose(trace[name]["value"], start[name], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(start["dynamics_map"], hard_fit.dynamics)
    np.testing.assert_allclose(np.exp(start["log_obs_var_map"]), hard_fit.obs_var)
    # the encoder's and the transition's logits reproduce the segmentation they were fitted to
    labels = hard_fit.state_probs[0].argmax(-1)
    encoded = np.argmax(data.y[0] @ start["guide_W"].T + start["guide_b"], -1)
    assert np.mean(encoded == labels) > 0.95
    F = model.fixed_projection(10)
    drive = (data.y[0, :-1] @ F.T) @ start["transition_weights_map"].T + start["transition_bias_map"]
    assert np.mean(np.argmax(drive, -1) == labels[1:]) > 0.9


@pytest.mark.float64
def test_start_and_projection_arguments_are_validated():
    model = GDM(num_states=4, latent_dim=2, obs_dim=10)
    with pytest.raises(ValueError, match="start: 'nope'"):
        LinearGuide(model, start={"nope": np.zeros(3)}).init_values(10)
    with pytest.raises(ValueError, match="start: 'guide_b' has shape"):
        LinearGuide(model, start={"guide_b": np.zeros(3)}).init_values(10)
    with pytest.raises(ValueError, match="projection_matrix"):
        GDM(latent_dim=2, projection_matrix=np.ones((3, 10)))
    with pytest.raises(ValueError, match="obs_dim = 10"):
        GDM(latent_dim=2, obs_dim=10, projection_matrix=np.ones((2, 9)))
    with pytest.raises(ValueError, match="obs_dim = 8"):
        GDM(latent_dim=2, projection_matrix=np.ones((2, 9))).fixed_projection(8)
    F = np.arange(20.0).reshape(2, 10)
    model = GDM(latent_dim=2, projection_matrix=F)
    np.testing.assert_array_equal(model.fixed_projection(10), F)
    json.dumps(model.config())  # stays serialisable
    for bad in (GDM(emission="poisson"), GDM(transition="gru")):
        with pytest.raises(ValueError, match="segmentation_start supports"):
            segmentation_start(bad, np.ones((1, 20, 10)))


@pytest.mark.slow
@pytest.mark.float64
def test_segmentation_start_fit_recovers_rotation_fixed_points(nascar_train):
    """Standard NASCAR, PCA projection, SVI from the segmentation start: the rotation states keep their
    own states and fixed points near (+-2, 0); the test trial is encoded without refitting."""
    data = GDM().prepare(nascar_train.y)
    model = GDM(num_states=4, latent_dim=2, obs_dim=10, projection_matrix=pca_projection(data, 2))
    guide = LinearGuide(model, seed=0, start=segmentation_start(model, data, seed=0))
    fit = fit_gdm_svi(model, data, guide=guide, seed=0)
    z = np.asarray(soft_states(fit)[0])
    fixed = aligned_state_fixed_points(model, fit.point_estimate(), nascar_train.y, nascar_train.latents)
    for j in (0, 1):
        k = int(np.argmax(z[nascar_train.states == j].mean(0)))
        assert np.linalg.norm(fixed[k] - nascar_train.params["fixed_points"][j]) < 0.3
    test = nascar(0, 1000, emission_matrix=nascar_train.params["emission_matrix"], stream="reference")
    accuracy = inferred_state_accuracy(z, nascar_train.states, np.asarray(soft_states(fit, test.y)[0]), test.states)
    assert accuracy > 0.95


# ----- the default path of fit_gdm_svi (float32, what users run) ---------------------------------------

@pytest.fixture(scope="module")
def default_fit():
    """fit_gdm_svi with its defaults (start and projection "auto") on a short fresh standard-NASCAR
    series; fewer particles and steps than the default only to keep the test short. float32 set here: a
    module-scoped fixture is built before the per-test precision fixture, after whichever test ran last."""
    jax.config.update("jax_enable_x64", False)
    train = nascar(7, 300)
    test = nascar(10_007, 300, emission_matrix=train.params["emission_matrix"])
    model = GDM(num_states=4, latent_dim=2, obs_dim=10)
    fit = fit_gdm_svi(model, train.y, num_particles=2, num_steps=200, seed=0)
    return model, fit, train, test


def test_default_path_starts_from_the_segmentation_with_the_pca_projection(default_fit):
    model, fit, train, _ = default_fit
    assert (fit.diagnostics["start"], fit.diagnostics["projection"]) == ("segmentation", "pca")
    assert model.projection_matrix is None  # the model passed in is left alone; fit.model carries F
    np.testing.assert_allclose(fit.model.fixed_projection(10), pca_projection(train.y, 2), rtol=1e-6)
    # the SVI started at the hard-state EM fit: its first loss is far below the released start's
    released_guide = LinearGuide(fit.model, seed=0)
    assert fit.guide.start is not None and not np.allclose(fit.guide.init_values(10)["dynamics_map"],
                                                           released_guide.init_values(10)["dynamics_map"])
    assert fit.params["dynamics_map"].dtype == np.float32 and np.all(np.isfinite(fit.losses))


def test_default_path_state_accuracy_in_the_headline_direction(default_fit):
    """Small-scale check of the headline claim (model card: the default path reaches >= 0.85 state
    accuracy on standard NASCAR; measured 0.99 at noise sd 0.01): a new test trial encoded without refitting."""
    _, fit, train, test = default_fit
    z_train = np.asarray(soft_states(fit, seed=0)[0])
    z_test = np.asarray(soft_states(fit, test.y, seed=1)[0])
    assert inferred_state_accuracy(z_train, train.states, z_test, test.states) > 0.9
    assert matched_state_accuracy(z_train.argmax(-1), train.states, 4) > 0.9


def test_auto_falls_back_to_the_released_start_where_the_segmentation_does_not_apply(nascar_train):
    y = nascar_train.y[:40]
    for model in (GDM(emission="poisson", obs_dim=10), GDM(transition="gru", obs_dim=10)):
        data = model.prepare(np.abs(np.round(y)) if model.emission == "poisson" else y)
        fitted_model, guide, start, projection = resolve_start(model, None, data, "auto", "auto", 2, 0)
        assert (start, projection) == ("released", "model") and fitted_model is model and guide.start is None
        with pytest.raises(ValueError, match="start='segmentation' needs"):
            resolve_start(model, None, data, "segmentation", "model", 2, 0)
        with pytest.raises(ValueError, match="projection='pca' needs"):
            resolve_start(model, None, data, "released", "pca", 2, 0)
    # a missing entry: the start and projection come from the data interpolated in time (interpolate_missing)
    mask = np.ones(y.shape, bool)
    mask[5, 2] = False
    data = GDM().prepare(np.where(mask, y, np.nan), mask=mask)
    fitted_model, guide, start, projection = resolve_start(GDM(obs_dim=10), None, data, "auto", "auto", 2, 0)
    assert (start, projection) == ("segmentation", "pca")
    # GDM.prepare already holds the interpolated value (the regressor y_{t-1} at step 6 needs one)
    np.testing.assert_allclose(np.asarray(data.y)[0, 5, 2], (y[4, 2] + y[6, 2]) / 2, rtol=1e-6)
    assert not np.asarray(data.mask)[0, 5, 2]
    filled = interpolate_missing(data)
    np.testing.assert_allclose(fitted_model.projection_matrix, pca_projection(filled, 2))
    assert guide.start is not None and all(np.isfinite(v).all() for v in guide.start.values())
    with pytest.raises(ValueError, match="start: expected one of"):
        fit_gdm_svi(GDM(obs_dim=10), y, start="hard")
    # the paper's protocol is a named option: the model's random F, the released code's random start
    data = GDM().prepare(y)
    model = GDM(obs_dim=10)
    kept, guide, start, projection = resolve_start(model, None, data, "released", "model", 2, 0)
    assert kept is model and (start, projection) == ("released", "model") and guide.start is None


def test_interpolate_missing_fills_each_dimension_linearly_in_time_within_its_trial():
    """Two ragged trials (6 and 4 steps), 2 dims: interior gaps are linear in time, edges hold the nearest
    observed value, a dim a trial never observes takes its mean over all observed entries, observed
    entries and the padding are unchanged; a dim observed nowhere is an error naming it."""
    y = np.array([[[0.0, 1.0], [1.0, 2.0], [9.0, 3.0], [9.0, 4.0], [4.0, 5.0], [5.0, 6.0]],
                  [[7.0, 1.0], [8.0, 2.0], [9.0, 3.0], [9.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = np.ones((2, 6, 2), bool)
    mask[0, 2:4, 0] = False  # interior gap of dim 0: between 1.0 (t=1) and 4.0 (t=4)
    mask[0, 0, 1] = False  # leading gap of dim 1: held at 2.0
    mask[1, :, 1] = False  # trial 1 never observes dim 1
    mask[1, 4:] = False  # trial 1 has 4 steps
    data = GDM().prepare([np.where(mask[0], y[0], np.nan), np.where(mask[1, :4], y[1, :4], np.nan)])
    filled = interpolate_missing(data)
    assert np.asarray(filled.mask).tolist() == (np.arange(6)[None, :, None] < np.array([6, 4])[:, None, None]).repeat(2, -1).tolist()
    expected = y.copy()
    expected[0, 2:4, 0] = [2.0, 3.0]
    expected[0, 0, 1] = 2.0
    expected[1, :4, 1] = np.mean([2.0, 3.0, 4.0, 5.0, 6.0])  # dim 1 over the observed entries of trial 0
    np.testing.assert_allclose(filled.y, expected)
    assert missing_share(data) == 7 / 20  # 2 + 1 + 4 of the 10 steps x 2 dims inside the trials
    never = mask.copy()
    never[0, :, 1] = False
    with pytest.raises(DataError, match=r"dimensions \[1\] are observed at no step"):
        interpolate_missing(GDM().prepare(np.where(never, y, np.nan), mask=never))


def test_nonfinite_start_values_raise_a_fit_error_naming_the_stage_and_value(nascar_train):
    model = GDM(num_states=4, latent_dim=2, obs_dim=10)
    start = dict(LinearGuide(model).init_values(10))
    start["offsets_map"] = np.full_like(start["offsets_map"], np.nan)
    with pytest.raises(FitError, match=r"stage 'start'.*offsets_map") as err:
        fit_gdm_svi(model, nascar_train.y[:50], guide=LinearGuide(model, start=start))
    assert err.value.sites["params"] == ["offsets_map"]


def test_nonfinite_elbo_raises_a_fit_error_naming_the_stage_and_sites():
    """float32 overflow (observations of size 1e20 square to inf): a FitError for stage 'svi' that
    names the likelihood site, never NaN arrays."""
    y = 1e20 * np.random.default_rng(0).standard_normal((1, 20, 3))
    model = GDM(num_states=2, latent_dim=1, obs_dim=3)
    with pytest.raises(FitError, match=r"stage 'svi'.*step 0.*'y'") as err:
        fit_gdm_svi(model, y, start="released", projection="model", num_steps=2, num_particles=1, chunk_size=2)
    assert err.value.step == 0 and not np.isfinite(err.value.losses[0])


@pytest.mark.slow
def test_default_path_headline_on_fresh_standard_nascar():
    """The headline at full size (model card, "Default path"; benchmarks/results.md): fresh standard-NASCAR
    series (generator seeds 100-104, T = 1000), the default path in float32. Measured per seed 0.985-0.994
    at noise sd 0.01 (mean 0.989) and 0.928-0.981 at sd 0.1 (mean 0.966)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from gdm import run_fresh_seed

    for noise, each, mean in ((0.01, 0.975, 0.98), (0.1, 0.9, 0.95)):
        accuracies = [run_fresh_seed(seed, noise)["acc"] for seed in range(100, 105)]
        assert min(accuracies) >= each and np.mean(accuracies) >= mean, (noise, accuracies)
