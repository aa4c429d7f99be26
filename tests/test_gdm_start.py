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
from ppl_switch.models.gdm import GDM, fit_gdm_svi
from ppl_switch.models.gdm_start import hard_state_em, pca_projection, segmentation_start

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


@pytest.fixture(scope="module")
def nascar_train():
    return nascar(0, 1000, stream="reference")


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


def _brute_force(y, F, fit):
    """log p(y_1: | y_0) and p(s_t | y) by enumerating every state path (uniform initial state)."""
    K = fit.transition_matrix.shape[0]
    x = y[:-1] @ F.T
    means = np.einsum("knd,td->tkn", fit.dynamics, x) + fit.offsets
    emit = norm.logpdf(y[1:, None, :], means, np.sqrt(fit.obs_var)).sum(-1)  # (T-1, K)
    paths = np.array(list(itertools.product(range(K), repeat=len(emit))))
    logp = -np.log(K) + emit[np.arange(len(emit)), paths].sum(1)
    logp += np.log(fit.transition_matrix[paths[:, :-1], paths[:, 1:]]).sum(1)
    total = logsumexp(logp)
    weights = np.exp(logp - total)
    marginals = np.stack([np.bincount(paths[:, t], weights, minlength=K) for t in range(len(emit))])
    return total, marginals


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


def test_hard_state_em_rejects_bad_input(nascar_train):
    data = GDM().prepare(nascar_train.y[:50])
    with pytest.raises(ValueError, match="projection"):
        hard_state_em(data, np.ones((2, 3)), 4)
    with pytest.raises(DataError, match="too few"):
        hard_state_em(nascar_train.y[:3], np.ones((2, 10)), 4)
    mask = np.ones((50, 10), bool)
    mask[10, 3] = False
    with pytest.raises(DataError, match="every dimension observed"):
        hard_state_em(GDM().prepare(nascar_train.y[:50], mask=mask), np.ones((2, 10)), 4)


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
def test_segmentation_start_fit_recovers_rotation_fixed_points(nascar_train):
    """Standard NASCAR, PCA projection, SVI from the segmentation start: the rotation states keep their
    own states and fixed points near (+-2, 0); the test trial is encoded without refitting."""
    data = GDM().prepare(nascar_train.y)
    model = GDM(num_states=4, latent_dim=2, obs_dim=10, projection_matrix=pca_projection(data, 2))
    guide = LinearGuide(model, seed=0, start=segmentation_start(model, data, seed=0))
    fit = fit_gdm_svi(model, data, guide=guide, seed=0)
    z = np.asarray(fit.soft_states()[0])
    fixed = aligned_state_fixed_points(model, fit.params, nascar_train.y, nascar_train.latents)
    for j in (0, 1):
        k = int(np.argmax(z[nascar_train.states == j].mean(0)))
        assert np.linalg.norm(fixed[k] - nascar_train.params["fixed_points"][j]) < 0.3
    test = nascar(0, 1000, emission_matrix=nascar_train.params["emission_matrix"], stream="reference")
    accuracy = inferred_state_accuracy(z, nascar_train.states, np.asarray(fit.soft_states(model.prepare(test.y))[0]), test.states)
    assert accuracy > 0.95
