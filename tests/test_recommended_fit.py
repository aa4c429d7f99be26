"""ppl_switch.fit dispatches to the runner each model declares (``recommended_runner``), passes the
options and overrides on, records them in ``fit.config``, and returns one Fit type. Float32."""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import ppl_switch
from ppl_switch.infer import recommended
from ppl_switch.infer.fit import Fit
from ppl_switch.results import get_group
from ppl_switch.models import MODELS, get_model

#: a small configuration of every registered model
CONFIGS = {
    "hmm": dict(num_states=2, obs_dim=1),
    "arhmm": dict(num_states=2, obs_dim=1),
    "lds": dict(latent_dim=1, obs_dim=2),
    "slds": dict(num_states=2, latent_dim=1, obs_dim=2),
    "rslds": dict(num_states=2, latent_dim=1, obs_dim=2),
    "gdm": dict(),
    "gdm_mixture": dict(),
    "clds": dict(),
    "gpslds": dict(),
    "gpsde": dict(),
}

#: what each model must run (runner, options it declares), from the model cards
EXPECTED = {
    "hmm": "em",
    "arhmm": "em",
    "lds": "em",
    "slds": "em",
    "rslds": "em",
    "gdm": "gdm_svi",
    "gdm_mixture": "svi",
    "clds": "em",
    "gpslds": "svi_path_refinement",
    "gpsde": "svi",
}


def test_every_registered_model_is_covered():
    assert set(CONFIGS) == set(MODELS) == set(EXPECTED)


@pytest.fixture
def recorder(monkeypatch):
    """Replace every runner by one that records its call and returns a minimal Fit (nothing is fitted)."""
    calls = []

    def make(name):
        def run(model, data, *, seed, x64, progress_bar, **options):
            calls.append({"runner": name, "options": options, "seed": seed, "x64": x64, "data": data})
            return Fit(model=model, data=None, method=name, idata=None, config={"seed": seed})

        return run

    monkeypatch.setattr(recommended, "RUNNERS", {name: make(name) for name in recommended.RUNNERS})
    monkeypatch.setattr(recommended, "prepare_data", lambda model, y, **kw: ("prepared", y))
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_dispatches_to_the_declared_runner(name, recorder):
    model = get_model(name, **CONFIGS[name])
    declared_name, declared = model.recommended_runner
    fit = ppl_switch.fit(model, "y", seed=3)
    assert len(recorder) == 1
    call = recorder[0]
    assert call["runner"] == EXPECTED[name] == declared_name == fit.config["runner"] == fit.config["recommended"]
    assert call["seed"] == 3 and call["data"] == ("prepared", "y")
    given = {k: v for k, v in declared.items() if k not in ("requires", "otherwise")}
    assert call["options"] == given == fit.config["runner_options"]


@pytest.mark.parametrize(
    "name, config, runner, options",
    [
        ("slds", dict(num_states=2, latent_dim=1, obs_dim=2, emission="poisson"), "svi", {}),
        ("rslds", dict(num_states=2, latent_dim=1, obs_dim=2, emission="poisson"), "svi", {}),
        ("rslds", dict(num_states=2, latent_dim=1, obs_dim=2, emission="bernoulli"), "em", {"num_restarts": 3, "num_iters": 100}),
        ("clds", dict(emission="poisson"), "svi", {"num_steps": 1000, "learning_rate": 0.01}),
    ],
)
def test_fit_falls_back_where_the_recommended_runner_does_not_apply(name, config, runner, options, recorder):
    fit = ppl_switch.fit(get_model(name, **config), "y")
    assert recorder[0]["runner"] == runner == fit.config["runner"] and recorder[0]["options"] == options
    if runner != fit.config["recommended"]:
        assert "emission='poisson'" in fit.config["fallback_reason"]
    else:
        assert "fallback_reason" not in fit.config


def test_overrides_reach_the_runner_and_bad_ones_fail_first(recorder):
    model = get_model("slds", **CONFIGS["slds"])
    fit = ppl_switch.fit(model, "y", num_restarts=8)
    assert recorder[0]["options"] == {"num_restarts": 8, "num_iters": 100} == fit.config["runner_options"]
    with pytest.raises(ValueError, match="num_stepz: not an option of the 'em' runner for SLDS; valid options are"):
        ppl_switch.fit(model, "y", num_stepz=10)
    with pytest.raises(ValueError, match="learning_rat: not an option of the 'gdm_svi' runner"):
        ppl_switch.fit(get_model("gdm"), "y", learning_rat=0.1)
    assert len(recorder) == 1  # nothing ran for the bad calls


def test_a_malformed_declaration_is_named(recorder):
    model = get_model("hmm", **CONFIGS["hmm"])
    model.recommended_runner = ("sgd", {})
    with pytest.raises(ValueError, match=r"HMM.recommended_runner: unknown runner 'sgd'; valid runners are"):
        ppl_switch.fit(model, "y")
    model.recommended_runner = ("em", {"requires": {"emission": ("poisson",)}})
    with pytest.raises(ValueError, match="no 'otherwise' runner is declared"):
        ppl_switch.fit(model, "y")
    model.recommended_runner = "em"
    with pytest.raises(ValueError, match=r"expected \(runner_name, options dict\)"):
        ppl_switch.fit(model, "y")


def test_import_ppl_switch_stays_cheap():
    code = "import sys, ppl_switch; assert 'jax' not in sys.modules; f = ppl_switch.fit; assert 'jax' in sys.modules; print(f.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ppl_switch.infer.recommended"


def test_real_hmm_fit_through_fit():
    """One real fit: HMM(2) on simulated data, through ppl_switch.fit (the declared runner, EM)."""
    model = get_model("hmm", num_states=2, obs_dim=1)
    data, truth = model.simulate(jax.random.PRNGKey(0), 2, 80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ppl_switch.fit(model, np.asarray(data.y), progress_bar=False)
    assert isinstance(fit, Fit) and fit.method == "em" and fit.config["runner"] == "em"
    assert [str(w.message) for w in caught if w.category is ppl_switch.infer.FitWarning] == fit.warnings
    # the only thing to report here is restarts that ended elsewhere: reported with their counts
    finals = np.asarray(fit.diagnostics["restart_objectives"])
    reached = int(np.sum(finals >= finals.max() - max(1.0, 1e-5 * abs(finals.max()))))
    if reached < len(finals):
        assert len(fit.warnings) == 1 and f"{reached} of {len(finals)} reached the best" in fit.warnings[0]
    else:
        assert fit.warnings == []
    assert "posterior" in list(fit.idata.groups()) if hasattr(fit.idata, "groups") else fit.idata["posterior"]
    est = fit.point_estimate()
    order = np.argsort(est["means"][:, 0])
    true_means = np.asarray(truth["params"]["means"] if "params" in truth else truth["means"])[:, 0]
    np.testing.assert_allclose(est["means"][order, 0], np.sort(true_means), atol=0.3)


def test_em_refusing_partly_observed_steps_falls_back_to_svi_and_says_so(monkeypatch):
    """ARHMM(2) in 2-D, a fifth of the entries missing at random: its closed-form EM refuses partly observed
    steps (a missing entry is also a regressor) before compiling; fit() then runs SVI on the same model, warns,
    and records why. (The SVI fallback runs 30 steps and 4 draws here instead of its defaults, 2000 and 200.)"""
    real_svi = recommended._run_svi
    ran = []

    def short_svi(model, data, **kw):
        ran.append(dict(kw))
        return real_svi(model, data, **kw, num_steps=30, num_draws=4)

    monkeypatch.setattr(recommended, "_run_svi", short_svi)
    model = get_model("arhmm", num_states=2, obs_dim=2)
    data, truth = model.simulate(jax.random.PRNGKey(1), 1, 60)
    mask = np.random.default_rng(0).random(np.shape(data.y)) > 0.2
    with pytest.warns(ppl_switch.infer.FitWarning, match="EM does not cover this data"):
        fit = ppl_switch.fit(model, np.asarray(data.y), mask=mask, progress_bar=False, seed=0)
    assert fit.method == "svi" and fit.config["runner"] == "svi" and fit.losses.shape == (30,)
    assert ran == [{"seed": 0, "x64": False, "progress_bar": False}]  # the fallback: no options of EM's
    assert "mask" in fit.config["fallback_reason"] and fit.warnings[0] == fit.config["fallback_reason"]


def test_hmm_with_partly_observed_steps_is_fitted_by_em():
    """HMM(2) with a full covariance, a fifth of the entries missing at random: EM treats the missing entries as
    latent (no fallback) and recovers the states."""
    model = get_model("hmm", num_states=2, obs_dim=2)
    data, truth = model.simulate(jax.random.PRNGKey(1), 1, 60)
    mask = np.random.default_rng(0).random(np.shape(data.y)) > 0.2
    assert (mask.any(-1) & ~mask.all(-1)).any()
    fit = ppl_switch.fit(model, np.asarray(data.y), mask=mask, progress_bar=False, seed=0)
    assert fit.method == "em" and "fallback_reason" not in fit.config
    probs = np.asarray(fit.idata["posterior_states"]["state_probs"])[0]
    accuracy = max(np.mean(probs.argmax(-1) == np.asarray(truth["states"])[0]), np.mean(probs.argmax(-1) != np.asarray(truth["states"])[0]))
    assert accuracy >= 0.95, accuracy


def test_real_gdm_fit_through_fit_is_one_fit_type(tmp_path):
    """The GDM's own trainer returns a Fit itself, the one fit() hands back: idata, the MAP estimate as
    point_estimate, the fitted encoder, and the model actually fitted (with the PCA projection the 'auto'
    start chose). A fit without an encoder (here: loaded from disk) refuses to encode, naming why."""
    from ppl_switch.infer.gdm_svi import encode, fit_gdm_svi

    model = get_model("gdm", num_states=2, latent_dim=1, obs_dim=2)
    data, _ = model.simulate(jax.random.PRNGKey(0), 1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_switch.infer.FitWarning)  # 50 steps: the loss may still move
        fit = ppl_switch.fit(model, np.asarray(data.y), num_steps=50, num_restarts=1, num_draws=6, progress_bar=False)
        own = fit_gdm_svi(model, np.asarray(data.y), num_steps=50, num_restarts=1, num_draws=6)
    assert isinstance(fit, Fit) and fit.method == "svi" and fit.config["runner"] == "gdm_svi"
    assert type(own) is Fit and own.config["num_draws"] == 6
    np.testing.assert_array_equal(own.losses, fit.losses)  # the runner is the trainer, nothing added
    np.testing.assert_array_equal(own.samples["z"], fit.samples["z"])
    np.testing.assert_array_equal(encode(fit, num_samples=6, seed=0), fit.samples["z"][0])  # idata's draws
    fit.save(tmp_path / "gdm.nc")
    with pytest.raises(ValueError, match="fit: needs a GDM fit returned by fit_gdm_svi"):
        encode(ppl_switch.infer.load(tmp_path / "gdm.nc"))
    assert fit.diagnostics["start"] == "segmentation" and fit.diagnostics["projection"] == "pca"
    assert fit.model is not model and fit.model.projection_matrix is not None
    assert fit.samples["z"].shape == (1, 6, 1, 40, 2) and fit.losses.shape == (50,)
    est = fit.point_estimate()
    np.testing.assert_array_equal(est["dynamics"], fit.samples["dynamics"][0, 0])  # MAP: the same in every draw
    np.testing.assert_allclose(est["z"], fit.samples["z"].mean((0, 1)), rtol=1e-6)
    assert "posterior" in list(fit.idata.groups())


def test_gdm_with_missing_entries_keeps_the_data_driven_start_and_a_gru_gdm_says_it_has_none():
    """The data-driven start covers missing entries (regressors interpolated in time, missing targets left
    out): with one missing entry fit() still starts from the segmentation and the PCA projection, with no
    warning. A GRU-transition GDM, which the start does not cover, takes the released start, and
    fit.warnings (and the FitWarning) say so and what it costs."""
    model = get_model("gdm", num_states=2, latent_dim=1, obs_dim=2)
    data, _ = model.simulate(jax.random.PRNGKey(0), 1, 40)
    y = np.array(data.y)
    y[0, 5, 1] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ppl_switch.infer.FitWarning)
        fit = ppl_switch.fit(model, y, num_steps=20, num_restarts=1, num_draws=2, progress_bar=False)
    assert (fit.diagnostics["start"], fit.diagnostics["projection"]) == ("segmentation", "pca")
    assert not any("data-driven start" in w for w in fit.warnings + [str(w.message) for w in caught])
    assert np.isnan(np.asarray(get_group(fit.idata, "observed_data")["y"])[0, 5, 1])  # still missing in the output
    gru = get_model("gdm", num_states=2, latent_dim=1, obs_dim=2, transition="gru")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ppl_switch.infer.FitWarning)
        fit = ppl_switch.fit(gru, y, num_steps=20, num_restarts=1, num_draws=2, progress_bar=False)
    assert fit.diagnostics["start"] == "released"
    fallback = [w for w in fit.warnings if w.startswith("GDM: the data-driven start needs a 2-level GDM with Gaussian "
                                                        "emissions, the linear transition and no inputs; this fit used "
                                                        "the released code's random start")]
    assert len(fallback) == 1
    assert fallback[0] in [str(w.message) for w in caught if issubclass(w.category, ppl_switch.infer.FitWarning)]
