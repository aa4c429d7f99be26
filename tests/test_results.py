"""ArviZ output (both containers), save/load, log-likelihood views and label switching."""

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from test_infer import ToyGaussian, ToyHMM, hmm_data  # noqa: E402

from ppl_switch.data import as_sequence_data  # noqa: E402
from ppl_switch.infer import pointwise_log_likelihood, posterior_predictive_draws, posterior_states  # noqa: E402
from ppl_switch.relabel import num_permuted, relabel_draws  # noqa: E402
from ppl_switch.results import (  # noqa: E402
    build_inference_data,
    get_group,
    group_names,
    load_inference_data,
    observed_step_log_likelihood,
    resolve_backend,
    save_inference_data,
    sequence_data_from_inference_data,
    to_backend,
    trial_log_likelihood,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

C, D = 2, 50  # chains, draws


def hmm_draws(seed=0, num_chains=C, num_draws=D, num_states=2):
    """Draws scattered around known HMM parameters (state k has mean 3k - 3 and self-transition 0.6 + 0.1k)."""
    rng = np.random.default_rng(seed)
    K = num_states
    means = (3.0 * np.arange(K) - 3.0)[:, None] + 0.1 * rng.standard_normal((num_chains, num_draws, K, 1))
    stay = 0.6 + 0.1 * np.arange(K)
    trans = np.broadcast_to(np.where(np.eye(K, dtype=bool), stay[:, None], ((1 - stay) / (K - 1))[:, None]), (num_chains, num_draws, K, K))
    init = np.broadcast_to(np.arange(1, K + 1) / np.arange(1, K + 1).sum(), (num_chains, num_draws, K))
    scale = 0.5 + 0.01 * rng.random((num_chains, num_draws, 1))
    return {"init_probs": init.copy(), "transition_matrix": trans.copy(), "means": means, "scale": scale}


@pytest.fixture(scope="module")
def hmm_parts():
    model, data, _ = hmm_data()
    samples = hmm_draws()
    return dict(
        model=model,
        data=data,
        samples=samples,
        log_likelihood=pointwise_log_likelihood(model, samples, data),
        posterior_predictive=posterior_predictive_draws(model, samples, data, jax.random.PRNGKey(0)),
        posterior_states=posterior_states(model, samples, data),
        sample_stats={"diverging": np.zeros((C, D), bool), "lp": np.random.default_rng(1).normal(size=(C, D))},
        extra_groups={"fixed_points": {"fixed_point": (("state", "latent"), np.zeros((2, 3)))}},
    )


def _build(parts, backend):
    p = dict(parts)
    return build_inference_data(p.pop("model"), p.pop("data"), p.pop("samples"), attrs={"relabelled": True}, backend=backend, **p)


EXPECTED_DIMS = {
    ("posterior", "means"): ("chain", "draw", "state", "obs"),
    ("posterior", "transition_matrix"): ("chain", "draw", "state", "state_to"),
    ("sample_stats", "diverging"): ("chain", "draw"),
    ("log_likelihood", "y"): ("chain", "draw", "trial", "time"),
    ("posterior_predictive", "y"): ("chain", "draw", "trial", "time", "obs"),
    ("observed_data", "y"): ("trial", "time", "obs"),
    ("constant_data", "mask"): ("trial", "time", "obs"),
    ("constant_data", "lengths"): ("trial",),
    ("posterior_states", "state_probs"): ("trial", "time", "state"),
    ("posterior_states", "viterbi"): ("chain", "draw", "trial", "time"),
    ("posterior_states", "state_samples"): ("chain", "draw", "trial", "time"),
    ("fixed_points", "fixed_point"): ("state", "latent"),
}


def _schema(idata):
    return {
        g: {v: (da.dims, da.shape, str(da.dtype)) for v, da in get_group(idata, g).data_vars.items()}
        for g in group_names(idata)
    }


def _assert_identical(a, b):
    assert sorted(group_names(a)) == sorted(group_names(b))
    for g in group_names(a):
        assert get_group(a, g).identical(get_group(b, g)), g
    assert dict(a.attrs) == dict(b.attrs)


def test_legacy_schema_and_arviz_functions(hmm_parts):
    idata = _build(hmm_parts, "legacy")
    assert isinstance(idata, az.InferenceData)
    for (group, var), dims in EXPECTED_DIMS.items():
        assert get_group(idata, group)[var].dims == dims, (group, var)
    post = get_group(idata, "posterior")
    np.testing.assert_array_equal(post["state"].values, [0, 1])
    np.testing.assert_array_equal(post["draw"].values, np.arange(D))
    assert idata.attrs["relabelled"] == 1 and idata.attrs["model"] == "toy_hmm"

    summary = az.summary(idata, var_names=["means", "scale"])
    assert len(summary) == 3 and np.isfinite(summary["mean"]).all()
    np.testing.assert_allclose(summary.loc["means[0, 0]", "mean"], -3.0, atol=0.1)
    with pytest.warns(UserWarning):  # padded steps have constant (0) log-likelihood: k-hat undefined
        loo = az.loo(idata)
    # loo used our pointwise values: its lpd = elpd_loo + p_loo is sum_i log mean_s exp(ll_si)
    ll = hmm_parts["log_likelihood"].reshape(C * D, -1)
    lpd = np.sum(np.log(np.mean(np.exp(ll), axis=0)))
    assert np.isfinite(loo.elpd_loo)
    np.testing.assert_allclose(loo.elpd_loo + loo.p_loo, lpd, rtol=1e-8)
    loo_trial = az.loo(trial_log_likelihood(idata))
    assert np.isfinite(loo_trial.elpd_loo)
    loo_steps = az.loo(observed_step_log_likelihood(idata))
    np.testing.assert_allclose(loo_steps.elpd_loo, loo.elpd_loo, rtol=1e-8)  # padded steps add exactly 0
    axes = az.plot_trace(idata, var_names=["means", "scale"])
    assert axes.shape == (2, 2)
    matplotlib.pyplot.close("all")


def test_masked_and_padded_entries(hmm_parts):
    idata = _build(hmm_parts, "legacy")
    data = hmm_parts["data"]
    observed = get_group(idata, "observed_data")["y"].values
    assert np.isnan(observed[0, 5]).all() and np.isnan(observed[1, 18:]).all()
    np.testing.assert_array_equal(observed[data.mask], data.y[data.mask])
    ll = get_group(idata, "log_likelihood")["y"].values
    assert (ll[:, :, 0, 5] == 0).all() and (ll[:, :, 1, 18:] == 0).all() and (ll[:, :, 0, 6] != 0).all()
    constant = get_group(idata, "constant_data")
    np.testing.assert_array_equal(constant["lengths"].values, [24, 18])
    assert constant["mask"].dtype == bool and "inputs" not in constant
    rebuilt = sequence_data_from_inference_data(idata)
    for field in ("y", "mask", "lengths"):
        np.testing.assert_array_equal(getattr(rebuilt, field), getattr(data, field))
    # log-likelihood views
    np.testing.assert_allclose(get_group(trial_log_likelihood(idata), "log_likelihood")["y"].values, ll.sum(-1))
    steps = get_group(observed_step_log_likelihood(idata), "log_likelihood")["y"]
    assert steps.dims == ("chain", "draw", "step") and steps.shape[-1] == 24 + 18 - 1
    np.testing.assert_allclose(steps.values.sum(-1), ll.sum((2, 3)))


def test_datatree_same_schema_and_netcdf_round_trip(hmm_parts, tmp_path):
    legacy = _build(hmm_parts, "legacy")
    tree = _build(hmm_parts, "datatree")
    assert isinstance(tree, xr.DataTree)
    assert _schema(tree) == _schema(legacy)
    for g in group_names(tree):
        xr.testing.assert_equal(get_group(tree, g), get_group(legacy, g))
    converted = to_backend(legacy, "datatree")
    assert isinstance(converted, xr.DataTree) and _schema(converted) == _schema(tree)
    assert {k for k in converted.attrs} == {k for k in tree.attrs}

    save_inference_data(tree, tmp_path / "tree.nc")
    _assert_identical(load_inference_data(tmp_path / "tree.nc", backend="datatree"), tree)
    save_inference_data(legacy, tmp_path / "legacy.nc")
    back = load_inference_data(tmp_path / "legacy.nc", backend="legacy")
    assert isinstance(back, az.InferenceData)
    _assert_identical(back, legacy)
    # arviz's own writer and reader interoperate with ours
    legacy.to_netcdf(str(tmp_path / "az.nc"))
    _assert_identical(load_inference_data(tmp_path / "az.nc", backend="legacy"), legacy)
    az_back = az.from_netcdf(str(tmp_path / "legacy.nc"))
    np.testing.assert_array_equal(az_back.posterior["means"].values, legacy.posterior["means"].values)
    assert resolve_backend("auto") == ("legacy" if int(az.__version__.split(".")[0]) < 1 else "datatree")


def test_inputs_and_unnamed_sites():
    rng = np.random.default_rng(0)
    data = as_sequence_data(rng.normal(size=(2, 5, 1)), inputs=rng.normal(size=(2, 5, 3)), lengths=[5, 4])
    samples = {"mu": rng.normal(size=(1, 4, 1)), "sigma": np.ones((1, 4, 1)), "extra": np.zeros((1, 4, 2, 3))}
    idata = build_inference_data(ToyGaussian(), data, samples, backend="datatree")
    post = get_group(idata, "posterior")
    assert post["extra"].dims == ("chain", "draw", "extra_dim_0", "extra_dim_1")
    inputs = get_group(idata, "constant_data")["inputs"]
    assert inputs.dims == ("trial", "time", "input") and inputs.shape == (2, 5, 3)
    assert (inputs.values[1, 4] == 0).all()  # zeroed past the length
    assert sequence_data_from_inference_data(idata).inputs.shape == (2, 5, 3)
    assert set(group_names(idata)) == {"posterior", "observed_data", "constant_data"}


def test_bad_arguments_are_named():
    data = as_sequence_data(np.zeros((1, 3, 1)))
    good = {"mu": np.zeros((1, 2, 1)), "sigma": np.ones((1, 2, 1))}
    with pytest.raises(ValueError, match="'mu'.*site_dims"):
        build_inference_data(ToyGaussian(), data, {**good, "mu": np.zeros((1, 2, 1, 1))})
    with pytest.raises(ValueError, match="dim 'obs'"):
        build_inference_data(ToyGaussian(), data, {**good, "sigma": np.ones((1, 2, 4))})
    with pytest.raises(ValueError, match="backend"):
        build_inference_data(ToyGaussian(), data, good, backend="zarr")
    with pytest.raises(ValueError, match="posterior_states"):
        build_inference_data(ToyGaussian(), data, good, posterior_states={"probs": np.zeros((1, 3, 2))})
    with pytest.raises(ValueError, match="attrs"):
        build_inference_data(ToyGaussian(), data, good, attrs={"when": object()})
    with pytest.raises(ValueError, match="leading"):
        build_inference_data(ToyGaussian(), data, {**good, "sigma": np.ones((2, 2, 1))})


# ----- label switching ----------------------------------------------------------------------------
def _permute(model, samples, perms):
    out = {k: np.array(v) for k, v in samples.items()}
    for c in range(perms.shape[0]):
        for d in range(perms.shape[1]):
            permuted = model.permute_states({k: v[c, d] for k, v in samples.items()}, perms[c, d])
            for k, v in permuted.items():
                out[k][c, d] = v
    return out


@pytest.mark.parametrize("num_states", [2, 3])
def test_relabel_undoes_deliberate_permutations(num_states):
    model = ToyHMM(num_states=num_states)
    truth = hmm_draws(seed=num_states, num_states=num_states)
    rng = np.random.default_rng(7)
    perms = np.broadcast_to(np.arange(num_states), (C, D, num_states)).copy()
    scrambled_draws = rng.random((C, D)) < 0.4
    scrambled_draws[1] = True  # chain 1 entirely uses other labels (as a second NUTS chain may)
    scrambled_draws[0, 0] = False  # the reference draw keeps its labels, so they come back exactly
    for c, d in zip(*np.nonzero(scrambled_draws)):
        while (perms[c, d] == np.arange(num_states)).all():
            perms[c, d] = rng.permutation(num_states)
    scrambled = _permute(model, truth, perms)

    relabelled, found = relabel_draws(model, scrambled)
    for k in truth:
        np.testing.assert_allclose(relabelled[k], truth[k], err_msg=k)
    assert num_permuted(found) == int(scrambled_draws.sum())
    # the permutations found undo the ones applied: scrambled[found] == truth
    np.testing.assert_array_equal(np.take_along_axis(perms, found, -1), np.broadcast_to(np.arange(num_states), perms.shape))


def test_relabel_aligns_up_to_one_global_permutation_when_reference_is_scrambled():
    model = ToyHMM(num_states=3)
    truth = hmm_draws(seed=3, num_states=3)
    perms = np.broadcast_to(np.array([2, 0, 1]), (C, D, 3)).copy()
    perms[0, ::2] = np.arange(3)
    relabelled, found = relabel_draws(model, _permute(model, truth, perms))
    global_perm = np.argsort(relabelled["means"][0, 0, :, 0])  # labels now sorted the same way in every draw
    order = np.argsort(relabelled["means"][..., 0], axis=-1)
    assert (order == global_perm).all()
    means = relabelled["means"][..., 0]
    np.testing.assert_allclose(np.sort(means, -1), np.sort(truth["means"][..., 0], -1))


def test_relabel_is_identity_without_states_or_features():
    samples = {"mu": np.zeros((2, 3, 1)), "sigma": np.ones((2, 3, 1))}
    out, perms = relabel_draws(ToyGaussian(), samples)
    np.testing.assert_array_equal(out["mu"], samples["mu"])
    assert num_permuted(perms) == 0


def test_observed_steps_keep_partly_observed_steps():
    """A step with some of its entries observed is a step of the observed-step view; only steps with no
    observed entry go. Mask of 2 trials x 4 steps x 3 obs: trial 0 step 1 fully missing, step 2 partly
    observed; trial 1 padded after step 2, step 0 partly observed."""
    mask = np.ones((2, 4, 3), bool)
    mask[0, 1] = False
    mask[0, 2, :2] = False
    mask[1, 0, 1:] = False
    mask[1, 3] = False
    ll = np.arange(2 * 3 * 2 * 4, dtype=float).reshape(2, 3, 2, 4)  # (chain, draw, trial, time)
    idata = az.InferenceData(
        log_likelihood=xr.Dataset({"y": (("chain", "draw", "trial", "time"), ll)}),
        constant_data=xr.Dataset({"mask": (("trial", "time", "obs"), mask)}),
    )
    steps = get_group(observed_step_log_likelihood(idata), "log_likelihood")
    kept = [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    np.testing.assert_array_equal(np.stack([steps["trial_index"], steps["time_index"]], -1), kept)
    np.testing.assert_array_equal(steps["y"].values, ll[:, :, [t for t, _ in kept], [s for _, s in kept]])
