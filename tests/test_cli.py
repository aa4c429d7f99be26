"""The command line and the user-data loaders: simulate -> fit -> summary -> plot, and clear errors."""

import json

import jax
import numpy as np
import pytest
from scipy.optimize import brentq

from ppl_switch import cli, datasets
from ppl_switch.analysis.fit_fixed_points import add_fit_fixed_points
from ppl_switch.analysis.gdm_metrics import state_fixed_points
from ppl_switch.analysis.fixed_points import STABILITY_TYPES
from ppl_switch.data import DataError
from ppl_switch.infer import Fit, load
from ppl_switch.models import get_model
from ppl_switch.results import build_inference_data, get_group, group_names, load_inference_data

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def test_simulate_fit_summary_plot(tmp_path, capsys):
    data_path, fit_path, fig_path = tmp_path / "d.npz", tmp_path / "fit.nc", tmp_path / "fit.png"
    assert cli.main(["simulate", "hmm", "--out", str(data_path), "--option", "num_timesteps=40"]) == 0
    with np.load(data_path) as f:
        assert f["y"].shape == (3, 40, 2) and f["states"].shape == (3, 40)
    args = ["fit", "hmm", "--data", str(data_path), "--num-states", "3", "--latent-dim", "2", "--method", "svi",
            "--num-steps", "30", "--seed", "0", "--out", str(fit_path), "--quiet"]
    assert cli.main(args) == 0
    assert "--latent-dim does not apply" in capsys.readouterr().out
    idata = load_inference_data(fit_path)
    probs = get_group(idata, "posterior_states")["state_probs"]
    assert probs.dims == ("trial", "time", "state") and probs.shape == (3, 40, 3)
    np.testing.assert_allclose(probs.sum("state").values, 1.0, atol=1e-5)
    assert "fixed_points" not in group_names(idata)  # an HMM has no continuous dynamics
    sidecar = json.loads((tmp_path / "fit.nc.json").read_text())
    assert sidecar["model"] == "hmm" and sidecar["model_config"]["num_states"] == 3
    assert cli.main(["summary", str(fit_path), "--var-names", "transition_matrix", "--stats-only"]) == 0
    assert "transition_matrix" in capsys.readouterr().out
    assert cli.main(["plot", str(fit_path), "--out", str(fig_path)]) == 0
    assert fig_path.stat().st_size > 10_000


def test_fit_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 2)))
    assert cli.main(["fit", "hmm", "--data", str(bad), "--num-states", "2", "--out", str(tmp_path / "f.nc")]) == 2
    assert "no array named 'y'" in capsys.readouterr().err
    assert cli.main(["fit", "nosuchmodel", "--data", "hmm", "--out", str(tmp_path / "f.nc")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["fit", "hmm", "--data", "hmm", "--num-states", "0", "--out", str(tmp_path / "f.nc")]) == 2
    assert "num_states" in capsys.readouterr().err


def test_csv_loader_ragged_and_missing(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("trial,t,a,b,u\n1,1,0.5,1.0,0\n1,0,0.1,,1\n2,0,3,4,0\n")
    out = datasets.load_csv(path, time_column="t", input_columns=["u"])
    assert [y.shape for y in out["y"]] == [(2, 2), (1, 2)]
    np.testing.assert_allclose(out["y"][0][0], [0.1, np.nan])  # sorted by t; the empty cell is missing
    np.testing.assert_allclose(out["inputs"][0][:, 0], [1, 0])


@pytest.mark.parametrize(
    "text, message",
    [("trial,a\n1,x\n", "expected a number"), ("a,b\n1,2\n", "no trial column"), ("trial,a\n1,2,3\n", "expected 2 cells")],
)
def test_csv_loader_errors(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        datasets.load_csv(path)


# --------------------------------------------------------------------------------------------------
# The fixed_points group of `ppl-switch fit`. One class per model family that fits through the CLI, so
# that under --dist loadscope each is its own scheduling unit; each checks the group against a direct
# computation from the posterior draws in the written file.


def _fit_through_cli(tmp_path, name: str, options: dict) -> Fit:
    """Simulate 2 trials x 12 steps from model ``name``, run ``ppl-switch fit`` (SVI, 20 steps, 8 draws) on
    them and load the written fit. Sizes, data and settings are those of the conformance suite's SVI fits,
    so that in a full test session the persistent compilation cache serves both."""
    data, _ = get_model(name, **options).simulate(jax.random.PRNGKey(0), 2, 12)
    arrays = {"y": np.asarray(data.y)}
    if data.inputs is not None:
        arrays["inputs"] = np.asarray(data.inputs)
    np.savez(tmp_path / "data.npz", **arrays)
    args = ["fit", name, "--data", str(tmp_path / "data.npz"), "--method", "svi", "--num-steps", "20", "--num-draws", "8",
            "--seed", "0", "--out", str(tmp_path / "fit.nc"), "--quiet"]
    for key, value in options.items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    assert cli.main(args) == 0
    return load(tmp_path / "fit.nc")


def _affine_fixed_points(A, b):
    return np.linalg.solve(np.eye(A.shape[-1]) - A, b[..., None])[..., 0]


class TestFitFixedPointsSLDS:
    # ~130 s of NumPyro compilation on 2 cores; the same group is checked in-process by
    # tests/test_fixed_points.py, so the full CLI round trip runs under -m slow
    pytestmark = pytest.mark.slow

    def test_fixed_point_of_each_regime_per_draw(self, tmp_path):
        fit = _fit_through_cli(tmp_path, "slds", dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1))
        fp = get_group(fit.idata, "fixed_points")
        assert fp["fixed_point"].dims == ("chain", "draw", "state", "latent")
        A, b = fit.samples["dynamics_matrix"], fit.samples["dynamics_bias"]
        assert fp["fixed_point"].shape == b.shape
        np.testing.assert_allclose(fp["fixed_point"].values, _affine_fixed_points(A, b), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fp["spectral_radius"].values, np.abs(np.linalg.eigvals(A)).max(-1), rtol=1e-6)


class TestFitFixedPointsGDM:
    def test_fixed_points_in_projected_and_observation_space(self, tmp_path):
        fit = _fit_through_cli(tmp_path, "gdm", dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1))
        fp = get_group(fit.idata, "fixed_points")
        assert fp["fixed_point"].dims == ("chain", "draw", "state", "latent")
        assert fp["fixed_point_obs"].dims == ("chain", "draw", "state", "obs")
        for draw in (0, -1):
            params = {k: v[0, draw] for k, v in fit.samples.items() if k != "z"}
            expected = np.asarray(state_fixed_points(fit.model, params, 3))
            np.testing.assert_allclose(fp["fixed_point"].values[0, draw], expected, rtol=1e-6, atol=1e-9)
        # y*_k is a fixed point of regime k's map y -> S_k F y + b_k
        F, S, b = fit.model.fixed_projection(3), fit.samples["dynamics"], fit.samples["offsets"]
        y = fp["fixed_point_obs"].values
        np.testing.assert_allclose(np.einsum("cwknd,de,cwke->cwkn", S, F, y) + b, y, rtol=1e-6, atol=1e-9)


class TestFitFixedPointsCLDS:
    def test_fixed_points_over_a_grid_of_observed_conditions(self, tmp_path):
        options = dict(latent_dim=2, obs_dim=3, input_dim=1, basis={"type": "FourierBasis", "num_frequencies": 3})
        fit = _fit_through_cli(tmp_path, "clds", options)
        fp = get_group(fit.idata, "fixed_points")
        assert fp["fixed_point"].dims == ("chain", "draw", "condition", "latent")
        u = fp["condition_value"].values
        observed = np.asarray(fit.data.inputs)[np.asarray(fit.data.time_mask)]
        assert u.shape == (25, 1) and u.min() == observed.min() and u.max() == observed.max()
        for draw in (0, -1):
            f = fit.model.parameter_functions({k: v[0, draw] for k, v in fit.samples.items()}, u)
            expected = _affine_fixed_points(np.asarray(f["A"]), np.asarray(f["b"]))
            np.testing.assert_allclose(fp["fixed_point"].values[0, draw], expected, rtol=1e-6, atol=1e-9)


class TestFitFixedPointsGPSLDS:
    pytestmark = pytest.mark.slow  # ~55 s of compilation; the root finder is tested directly below

    def test_flow_field_and_roots_of_the_drift(self, tmp_path):
        options = dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1, emission="gaussian", dt=0.01)
        fit = _fit_through_cli(tmp_path, "gpslds", options)
        fp, flow = get_group(fit.idata, "fixed_points"), get_group(fit.idata, "flow_field")
        assert fp["fixed_point"].dims == ("sample", "root", "latent") and flow["drift_mean"].dims == ("x2", "x1", "latent")
        draws = {k: v.reshape((-1,) + v.shape[2:]) for k, v in fit.samples.items() if k != "x"}
        assert fp.sizes["sample"] == len(draws["fixed_points"])
        X1, X2 = np.meshgrid(flow["x1"].values, flow["x2"].values)
        drift = jax.vmap(lambda p: fit.model.drift(p, np.stack([X1, X2], -1)))(draws)
        np.testing.assert_allclose(flow["drift_mean"].values, np.asarray(drift).mean(0), rtol=1e-6, atol=1e-9)
        found = np.isfinite(fp["fixed_point"].values).all(-1)
        np.testing.assert_array_equal(found.sum(-1), fp["num_roots"].values)
        for s, r in zip(*np.nonzero(found)):
            params = {k: v[s] for k, v in draws.items()}
            assert np.linalg.norm(fit.model.drift(params, fp["fixed_point"].values[s, r])) < 1e-5


# --------------------------------------------------------------------------------------------------
# the same dispatch on hand-made posterior draws (no fitting): LDS, a lag-2 ARHMM, and the root search of a
# 1-D latent SDE (the path add_gpslds_summaries does not take) against bisection


def _fit_from_draws(model, data, samples) -> Fit:
    return Fit(model=model, data=data, method="svi", idata=build_inference_data(model, data, samples), samples=samples)


def test_fixed_points_of_an_lds_draw_by_draw():
    rng = np.random.default_rng(0)
    model = get_model("lds", latent_dim=3, obs_dim=2)
    samples = {"dynamics_matrix": 0.5 * rng.standard_normal((2, 4, 3, 3)), "dynamics_bias": rng.standard_normal((2, 4, 3))}
    fit = _fit_from_draws(model, model.prepare(rng.standard_normal((1, 5, 2))), samples)
    fp = get_group(add_fit_fixed_points(fit), "fixed_points")
    assert fp["fixed_point"].dims == ("chain", "draw", "latent")
    A, b = samples["dynamics_matrix"], samples["dynamics_bias"]
    np.testing.assert_allclose(fp["fixed_point"].values, _affine_fixed_points(A, b), rtol=1e-10)
    # the fixed point is invariant under the map
    x = fp["fixed_point"].values
    np.testing.assert_allclose(np.einsum("cwij,cwj->cwi", A, x) + b, x, rtol=1e-9, atol=1e-12)


def test_a_model_gets_the_group_by_declaring_its_fixed_point_kind():
    """A model outside the zoo gets the group from its own hooks, with no edit of the analysis: here an
    HMM whose state means are read as the offsets of the map y -> 0.5 y + mean_k (fixed point 2 mean_k)."""
    from ppl_switch.models import HMM

    class DriftingHMM(HMM):
        fixed_point_kind = "affine"

        def affine_dynamics(self, samples, obs_dim):
            means = np.asarray(samples["means"], float)  # (chain, draw, K, D)
            return np.broadcast_to(0.5 * np.eye(obs_dim), means.shape + (obs_dim,)), means, ("chain", "draw", "state"), "obs", None

    rng = np.random.default_rng(3)
    samples = {"means": rng.standard_normal((1, 4, 2, 3))}
    plain = _fit_from_draws(HMM(2, 3), HMM(2, 3).prepare(rng.standard_normal((1, 5, 3))), samples)
    assert add_fit_fixed_points(plain) is plain.idata  # the HMM declares none: no group
    fit = _fit_from_draws(DriftingHMM(2, 3), plain.data, samples)
    fp = get_group(add_fit_fixed_points(fit), "fixed_points")
    assert fp["fixed_point"].dims == ("chain", "draw", "state", "obs")
    np.testing.assert_allclose(fp["fixed_point"].values, 2.0 * samples["means"], rtol=1e-12)
    np.testing.assert_allclose(fp["spectral_radius"].values, 0.5, rtol=1e-12)


def test_fixed_points_and_companion_eigenvalues_of_a_lag_two_arhmm():
    rng = np.random.default_rng(1)
    K, L, D = 2, 2, 2
    model = get_model("arhmm", num_states=K, obs_dim=D, lags=L)
    W = 0.4 * rng.standard_normal((1, 3, K, L, D, D))
    samples = {"ar_weights": W, "biases": rng.standard_normal((1, 3, K, D))}
    fit = _fit_from_draws(model, model.prepare(rng.standard_normal((1, 6, D))), samples)
    fp = get_group(add_fit_fixed_points(fit), "fixed_points")
    assert fp["fixed_point"].dims == ("chain", "draw", "state", "obs") and fp.sizes["eig"] == L * D
    # y* = A_1 y* + A_2 y* + b
    np.testing.assert_allclose(fp["fixed_point"].values, _affine_fixed_points(W.sum(-3), samples["biases"]), rtol=1e-10)
    # each eigenvalue lam solves det(lam^2 I - lam A_1 - A_2) = 0 (the AR(2) characteristic equation)
    lam = fp["eigenvalue_real"].values + 1j * fp["eigenvalue_imag"].values
    for idx in np.ndindex(lam.shape[:-1]):
        A1, A2 = W[idx][0], W[idx][1]
        for value in lam[idx]:
            char = value**2 * np.eye(D) - value * A1 - A2
            assert np.linalg.svd(char, compute_uv=False)[-1] < 1e-9
    stable = fp["stability"].values < STABILITY_TYPES.index("unstable node")
    np.testing.assert_array_equal(stable, np.abs(lam).max(-1) < 1 - 1e-3)


def test_roots_of_a_one_dimensional_latent_sde_match_bisection():
    model = get_model("gpsde", latent_dim=1, obs_dim=2, emission="gaussian", dt=0.01, num_basis=8, box=5.0)
    rng = np.random.default_rng(2)
    S, T = 3, 20
    path = np.linspace(-2.0, 2.0, T)[:, None]  # the search box is the path's range +- 10%: [-2.4, 2.4]
    samples = {"rbf_lengthscale": np.full((1, S), 1.0), "rbf_amplitude": np.ones((1, S)),
               "rbf_weights": rng.standard_normal((1, S, 8, 1)), "x": np.broadcast_to(path, (1, S, 1, T, 1)).copy()}
    fit = _fit_from_draws(model, model.prepare(np.zeros((1, T, 2))), samples)
    fp = get_group(add_fit_fixed_points(fit), "fixed_points")
    assert fp["fixed_point"].dims == ("sample", "root", "latent")
    grid = np.linspace(-2.4, 2.4, 2001)
    total = 0
    for s in range(S):
        params = {k: v[0, s] for k, v in samples.items() if k != "x"}
        f = lambda x: float(model.drift(params, np.array([x]))[0])  # noqa: E731
        values = np.asarray(model.drift(params, grid[:, None]))[:, 0]
        brackets = np.nonzero(np.sign(values[:-1]) != np.sign(values[1:]))[0]
        expected = sorted(brentq(f, grid[i], grid[i + 1], xtol=1e-12) for i in brackets)
        found = np.sort(fp["fixed_point"].values[s, :, 0][np.isfinite(fp["fixed_point"].values[s, :, 0])])
        np.testing.assert_allclose(found, expected, atol=1e-6)
        total += len(expected)
    assert total >= 2  # the check is not vacuous
