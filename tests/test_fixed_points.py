"""Fixed points, stability types, posterior summaries, the regime partition and the derived group."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import expm
from scipy.stats import chi2

from ppl_switch.analysis.fixed_points import (
    STABILITY_TYPES,
    add_fixed_points_group,
    continuous_time_dynamics,
    credible_ellipse,
    fixed_points,
    regime_partition,
    stability_types,
    summarise_fixed_points,
)
from ppl_switch.models.rslds import RSLDS
from ppl_switch.results import _container, get_group, group_names

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _rotation(theta, radius=1.0):
    return radius * expm(np.array([[0.0, theta], [-theta, 0.0]]))


def test_fixed_points_and_types_of_known_systems():
    centre = np.array([2.0, -1.0])
    A = np.stack([_rotation(0.3, 0.9), _rotation(0.3), np.diag([0.5, 1.5]), np.eye(2), np.diag([1.2, 1.1]), np.diag([0.5, 0.8])])
    b = np.stack([(np.eye(2) - A[0]) @ centre, (np.eye(2) - A[1]) @ centre, [1.0, 1.0], [0.1, 0.0], [0.2, 0.2], [1.0, 0.0]])
    x, eig = fixed_points(A, b)
    np.testing.assert_allclose(x[0], centre, atol=1e-12)
    np.testing.assert_allclose(x[1], centre, atol=1e-12)
    np.testing.assert_allclose(x[2], [2.0, -2.0])
    assert np.isnan(x[3]).all()  # a translation has no fixed point
    types = [STABILITY_TYPES[i] for i in stability_types(eig, x)]
    assert types == ["stable spiral", "center", "saddle", "none", "unstable node", "stable node"]


def test_summaries_and_credible_ellipse():
    rng = np.random.default_rng(0)
    centre = np.array([2.0, 0.0])
    draws = 4000
    c = centre + 0.1 * rng.standard_normal((draws, 2))
    A = np.broadcast_to(_rotation(0.2, 0.95), (draws, 1, 2, 2))
    b = np.einsum("ij,nj->ni", np.eye(2) - A[0, 0], c)[:, None]
    s = summarise_fixed_points(A.reshape(2, draws // 2, 1, 2, 2), b.reshape(2, draws // 2, 1, 2))
    np.testing.assert_allclose(s["mean"][0], centre, atol=0.01)
    np.testing.assert_allclose(s["cov"][0], 0.01 * np.eye(2), atol=1e-3)
    assert s["type_probs"][0, STABILITY_TYPES.index("stable spiral")] == 1.0
    assert np.all(s["lower"][0] < centre) and np.all(s["upper"][0] > centre)
    # the ellipse is the chi2 level set: points on it have Mahalanobis radius^2 = chi2_2(0.95)
    e = credible_ellipse(s["mean"][0], s["cov"][0], 0.95)
    d = e - s["mean"][0]
    m2 = np.einsum("ni,ij,nj->n", d, np.linalg.inv(s["cov"][0]), d)
    np.testing.assert_allclose(m2, chi2.ppf(0.95, 2), rtol=1e-8)


def test_regime_partition_follows_the_logits():
    model = RSLDS(2, 2, obs_dim=3, transitions="recurrent_only")
    rng = np.random.default_rng(1)
    W = np.array([[10.0, 0.0], [-10.0, 0.0]]) + 0.5 * rng.standard_normal((50, 2, 2))
    samples = {"transition_weights": W, "transition_bias": np.zeros((50, 2))}
    grid = np.array([[1.0, 0.0], [-1.0, 3.0], [0.01, 0.0]])
    part = regime_partition(model, samples, grid)
    assert part["labels"].shape == (50, 3)
    np.testing.assert_array_equal(part["map"], [0, 1, 0])
    np.testing.assert_allclose(part["probs"][0], [1.0, 0.0])
    assert 0.0 < part["probs"][2, 0] <= 1.0
    np.testing.assert_allclose(part["probs"].sum(-1), 1.0)


def test_add_fixed_points_group():
    import xarray as xr

    model = RSLDS(2, 2, obs_dim=3, transitions="recurrent_only")
    A = np.broadcast_to(np.stack([_rotation(0.1, 0.9), np.eye(2)]), (1, 3, 2, 2, 2))
    b = np.broadcast_to(np.array([[0.1, 0.0], [0.0, 0.1]]), (1, 3, 2, 2))
    post = xr.Dataset({
        "dynamics_matrix": (("chain", "draw", "state", "latent", "latent_prev"), A),
        "dynamics_bias": (("chain", "draw", "state", "latent"), b),
        "transition_weights": (("chain", "draw", "state", "latent"), np.broadcast_to([[1.0, 0.0], [-1.0, 0.0]], (1, 3, 2, 2))),
        "transition_bias": (("chain", "draw", "state"), np.zeros((1, 3, 2))),
    })
    idata = _container({"posterior": post}, {}, "legacy")
    out = add_fixed_points_group(idata, model, grid=np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert "fixed_points" in group_names(out)
    g = get_group(out, "fixed_points")
    assert g["fixed_point"].dims == ("chain", "draw", "state", "latent")
    np.testing.assert_allclose(g["fixed_point"].values[0, 0, 0], np.linalg.solve(np.eye(2) - A[0, 0, 0], b[0, 0, 0]))
    assert np.isnan(g["fixed_point"].values[0, 0, 1]).all()
    np.testing.assert_allclose(g["partition_probs"].values, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="model"):
        add_fixed_points_group(idata, None, grid=np.zeros((1, 2)))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="dynamics_bias"):
        fixed_points(np.eye(2)[None], np.zeros((1, 3)))


def test_continuous_time_dynamics_inverts_the_exact_discretisation():
    """A linear flow dx/dt = M (x - c) sampled every h is x_t = e^{Mh} x_{t-1} + (I - e^{Mh}) c: the
    conversion returns M and c (two regimes, a spiral and a node, with a leading draw axis)."""
    h = 0.02
    M = np.array([[[0.5, -3.0], [3.0, 0.5]], [[-1.0, 0.3], [0.0, -2.0]]])
    c = np.array([[3.0, 0.0], [-3.0, 1.0]])
    A = np.stack([expm(m * h) for m in M])
    b = np.einsum("kij,kj->ki", np.eye(2) - A, c)
    M_hat, c_hat = continuous_time_dynamics(A[None], b[None], h)
    np.testing.assert_allclose(M_hat[0], M, atol=1e-8)
    np.testing.assert_allclose(c_hat[0], c, atol=1e-8)
    # first-order (A - I) / h is off by O(h |M|^2)
    assert np.abs((A - np.eye(2)) / h - M).max() > 0.05
    with pytest.raises(ValueError, match="no real matrix logarithm"):
        continuous_time_dynamics(np.diag([-0.5, 0.9])[None], np.zeros((1, 2)), h)
    with pytest.raises(ValueError, match="bin_size"):
        continuous_time_dynamics(A, b, 0.0)
