"""Never silent: each check of ppl_switch.infer.checks fires when it should and stays quiet on a
well-converged fit; non-finite results raise a FitError naming the site. Float32 (what users run)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from ppl_switch.data import as_sequence_data
from ppl_switch.infer import FitError, FitWarning, fit_em, fit_nuts, fit_svi
from ppl_switch.infer import checks
from ppl_switch.models.base import Model


class Toy(Model):
    """y[n, t, d] ~ Normal(mu[d], sigma[d]), mu ~ N(0, 10^2), sigma ~ LogNormal(0, 1)."""

    name = "toy"

    def __init__(self, obs_dim=1, emission="gaussian"):
        self.obs_dim = obs_dim
        self.emission = emission

    def program(self, data, *, record_log_lik=False):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([self.obs_dim]).to_event(1))
        sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0).expand([self.obs_dim]).to_event(1))
        numpyro.sample("y", dist.Normal(mu, sigma).mask(data.mask).to_event(3), obs=data.y)

    def site_dims(self):
        return {"mu": ("obs",), "sigma": ("obs",)}

    def config(self):
        return {"obs_dim": self.obs_dim}

    def log_likelihood(self, params, data):
        lp = dist.Normal(params["mu"], params["sigma"]).log_prob(data.y)
        return jnp.where(data.mask, lp, 0.0).sum(-1)

    def posterior_predictive(self, key, params, data):
        return params["mu"] + params["sigma"] * jax.random.normal(key, data.y.shape)


class ToyWithoutPredictive(Toy):
    """A user's model that leaves ``posterior_predictive`` (and so its group) out."""

    posterior_predictive = Model.posterior_predictive


class TwoWells(Model):
    """mu with two separated modes near -2 and +2 (a barrier of ~800 nats between them), the +2 mode
    40 nats higher: a chain never crosses, so chains started on either side disagree."""

    name = "two_wells"
    obs_dim = 1

    def program(self, data, *, record_log_lik=False):
        mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
        numpyro.factor("wells", -50.0 * (mu**2 - 4.0) ** 2 + 10.0 * mu)

    def site_dims(self):
        return {"mu": ()}

    def config(self):
        return {}


class NaNDeterministic(Toy):
    """A deterministic site that is NaN at every draw (log of a negative number)."""

    def program(self, data, *, record_log_lik=False):
        super().program(data)
        numpyro.deterministic("log_minus_sigma", jnp.log(-numpyro.sample("c", dist.LogNormal(0.0, 1.0))))

    def site_dims(self):
        return {"mu": ("obs",), "sigma": ("obs",), "c": (), "log_minus_sigma": ()}


class FakeEM(Toy):
    """An 'EM' that returns a scripted sequence of estimates and histories (one per call)."""

    def __init__(self, results):
        super().__init__()
        self.results = list(results)
        self.keys = []

    def em(self, data, *, key=None):
        self.keys.append(np.asarray(key))
        return self.results[len(self.keys) - 1]


def toy_y(seed=0, n=(2, 60), mu=1.5, sigma=0.7):
    rng = np.random.default_rng(seed)
    return (mu + sigma * rng.standard_normal(n + (1,))).astype(np.float32)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, FitWarning)]


# ----- the checks as functions (exact values) ------------------------------------------------------
def test_objective_movement_exact_values():
    # last window 10 values of 5.0 after 10 of 7.0: change 2, no noise, threshold 1e-3 * 5
    trace = np.r_[np.full(80, 9.0), np.full(10, 7.0), np.full(10, 5.0)]
    m = checks.objective_movement(trace)
    assert m["window"] == 10 and m["change"] == pytest.approx(2.0) and m["noise"] == 0.0
    assert m["threshold"] == pytest.approx(checks.OBJECTIVE_RTOL * 5.0)
    assert checks.moving_objective_warnings(trace, what="loss", advice="x")
    # white noise around a constant: the noise term sets the threshold; nothing moves
    rng = np.random.default_rng(0)
    flat = 1000.0 + 3.0 * rng.standard_normal(2000)
    m = checks.objective_movement(flat)
    assert m["noise"] == pytest.approx(3.0, rel=0.1)
    assert m["threshold"] == pytest.approx(checks.NOISE_Z * m["noise"] * np.sqrt(2 / 200))
    assert not checks.moving_objective_warnings(flat, what="loss", advice="x")
    # the same noise on a slope that moves the window mean by 20 noise standard errors: moving
    sloped = flat - np.linspace(0, 60.0, 2000)
    assert checks.moving_objective_warnings(sloped, what="loss", advice="x")
    assert checks.objective_movement(np.arange(9.0)) is None  # too short to judge


def test_restart_warnings_report_the_spread():
    msg = checks.restart_warnings([-100.0, -100.5, -105.0])
    assert len(msg) == 1 and "2 of 3 reached the best objective -100 " in msg[0] and "up to 5 nats lower" in msg[0]
    assert "the best was kept" in msg[0]
    msg = checks.restart_warnings([-100.0, -103.0, -105.0])
    assert "1 of 3 reached" in msg[0] and "only one start found it" in msg[0]
    assert checks.restart_warnings([-100.0, -100.9]) == []  # within 1 nat: the same optimum
    assert checks.restart_warnings([-100.0]) == []
    msg = checks.restart_warnings([-100.0, np.nan, -100.2])
    assert msg == ["EM restarts: 1 of 3 ended with a non-finite objective and were discarded"]


def test_data_scale_warning_fires_far_from_unit_scale_only():
    y = toy_y()
    data = lambda v: as_sequence_data(v)  # noqa: E731
    assert checks.data_scale_warnings(Toy(), data(y)) == []
    for factor, shown in ((1e6, "sd 7"), (1e-6, "sd 7")):
        msg = checks.data_scale_warnings(Toy(), data(y * factor))
        assert len(msg) == 1 and "standardise" in msg[0] and "dim 0" in msg[0] and "threshold" in msg[0]
    assert checks.data_scale_warnings(Toy(), data(y + 500.0))  # mean far outside the priors
    assert checks.data_scale_warnings(Toy(emission="poisson"), data(np.round(np.abs(y) * 1e3))) == []
    # only the offending coordinate is named
    two = np.concatenate([y, 1e4 * y], -1)
    msg = checks.data_scale_warnings(Toy(obs_dim=2), data(two))
    assert "dim 1" in msg[0] and "dim 0" not in msg[0]


def test_mcmc_warning_thresholds():
    good = {"max_r_hat": 1.005, "min_ess": 250.0, "num_divergences": 0, "num_max_tree_depth": 0,
            "chain_lp_gap": 0.5, "chain_lp_within_sd": 1.0}
    assert checks.mcmc_warnings(good, num_chains=2, max_tree_depth=10) == []
    assert len(checks.mcmc_warnings({**good, "min_ess": 199.0}, 2, 10)) == 1  # < 100 per chain
    assert len(checks.mcmc_warnings({**good, "max_r_hat": 1.02}, 2, 10)) == 1
    assert len(checks.mcmc_warnings({**good, "max_r_hat": float("nan")}, 2, 10)) == 1
    assert "3 divergent" in checks.mcmc_warnings({**good, "num_divergences": 3}, 2, 10)[0]
    assert "maximum tree depth 10" in checks.mcmc_warnings({**good, "num_max_tree_depth": 1}, 2, 10)[0]
    assert "3.5 nats" in checks.mcmc_warnings({**good, "chain_lp_gap": 3.5}, 2, 10)[0]
    assert checks.mcmc_warnings({**good, "chain_lp_gap": 2.9}, 2, 10) == []
    assert "not available with 1 chain" in checks.mcmc_warnings(good, 1, 10)[0]


# ----- SVI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svi_fits():
    y = toy_y()
    short, short_w = quiet(fit_svi, Toy(), y, num_steps=300, learning_rate=0.01, progress_bar=False, num_draws=50)
    full, full_w = quiet(fit_svi, Toy(), y, num_steps=3000, learning_rate=0.05, progress_bar=False, num_draws=50)
    return short, short_w, full, full_w


def test_svi_cut_short_warns_and_converged_does_not(svi_fits):
    short, short_w, full, full_w = svi_fits
    assert any("SVI loss still moving" in w for w in short.warnings) and short.warnings == short_w
    assert "still moving" in repr(short)
    assert full.warnings == [] and full_w == []
    assert "warning" not in repr(full)


def test_svi_point_estimate_is_the_guides_constrained_median(svi_fits):
    _, _, full, _ = svi_fits
    est = full.point_estimate()
    # AutoNormal: median = the constrained image of loc; sigma's support is positive (exp transform)
    np.testing.assert_allclose(est["mu"], full.params["mu_auto_loc"], rtol=1e-6)
    np.testing.assert_allclose(est["sigma"], np.exp(full.params["sigma_auto_loc"]), rtol=1e-5)
    assert est["mu"].shape == (1,) and est["sigma"].shape == (1,)
    # and it is the MLE-like estimate for this data (independent check of what the fit learnt)
    y = toy_y()
    # (within ~2 posterior sds: 0.7 / sqrt(120) = 0.064 for mu)
    assert abs(float(est["mu"][0]) - y.mean()) < 0.15 and abs(float(est["sigma"][0]) - y.std()) < 0.15


def test_svi_point_estimate_survives_save_and_load(svi_fits, tmp_path):
    from ppl_switch.infer import load

    short = svi_fits[0]
    short.save(tmp_path / "fit.nc")
    back = load(tmp_path / "fit.nc", model=Toy())
    np.testing.assert_allclose(back.point_estimate()["sigma"], short.point_estimate()["sigma"])
    assert back.warnings == short.warnings


# ----- NUTS ---------------------------------------------------------------------------------------
NUTS_KW = dict(num_warmup=300, num_samples=300, progress_bar=False)


def test_nuts_converged_toy_is_quiet():
    fit, caught = quiet(fit_nuts, Toy(), toy_y(), seed=0, **NUTS_KW)
    assert fit.config["num_chains"] == 2 and fit.config["chain_method"] == "sequential"
    assert fit.warnings == [] and caught == []
    d = fit.diagnostics
    assert d["max_r_hat"] < 1.01 and d["min_ess"] >= 200 and d["max_r_hat_site"] in ("mu", "sigma")
    # point estimate = posterior mean of the draws
    np.testing.assert_allclose(fit.point_estimate()["mu"], fit.samples["mu"].mean((0, 1)), rtol=1e-6)


def test_nuts_chains_in_different_modes_warn():
    # seed 5: numpyro's uniform(-2, 2) starts put the two chains on opposite sides of the barrier
    fit, caught = quiet(fit_nuts, TwoWells(), np.zeros((1, 2, 1), np.float32), seed=5, **NUTS_KW)
    means = fit.samples["mu"].mean(1)
    assert np.sign(means).tolist() == [-1.0, 1.0] or np.sign(means).tolist() == [1.0, -1.0]
    text = "\n".join(fit.warnings)
    assert "R-hat" in text and "stuck in another mode" in text and caught == fit.warnings
    # the gap is the difference of the chains' mean log densities: ~40 nats (the tilt 10 * mu at +-2)
    assert fit.diagnostics["chain_lp_gap"] == pytest.approx(np.ptp(fit.idata.sample_stats["lp"].values.mean(1)), rel=1e-5)
    assert 35 < fit.diagnostics["chain_lp_gap"] < 45
    # started from the better mode, both chains agree
    fit, _ = quiet(fit_nuts, TwoWells(), np.zeros((1, 2, 1), np.float32), seed=5, init_params={"mu": 2.0}, **NUTS_KW)
    # (a density without data: only the groups it cannot fill are named)
    assert [w.split(" does not implement ")[1].split("()")[0] for w in fit.warnings] == ["log_likelihood", "posterior_predictive"]


def test_nuts_one_chain_and_tree_depth():
    fit, caught = quiet(fit_nuts, Toy(), toy_y(), seed=0, num_chains=1, max_tree_depth=1, num_warmup=50, num_samples=50,
                        progress_bar=False)
    assert fit.diagnostics["max_r_hat"] is None and fit.diagnostics["r_hat_note"] == "not available with 1 chain"
    text = "\n".join(fit.warnings)
    assert "R-hat is not available with 1 chain" in text
    assert "maximum tree depth 1" in text and fit.diagnostics["num_max_tree_depth"] == 50


def test_nuts_nonfinite_draw_raises_naming_the_site():
    with pytest.raises(FitError, match="log_minus_sigma") as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_nuts(NaNDeterministic(), toy_y(), num_warmup=5, num_samples=5, num_chains=1, progress_bar=False)
    assert "NUTS draws" in str(err.value) and err.value.sites == {"value": ["site 'log_minus_sigma'"]}


# ----- EM -----------------------------------------------------------------------------------------
def _history(lls, restarts=None, **extra):
    out = {"log_likelihoods": np.asarray(lls, float), **extra}
    if restarts is not None:
        out["restart_objectives"] = np.asarray(restarts, float)
    return out


GOOD = {"mu": np.array([1.5]), "sigma": np.array([0.7])}
BAD = {"mu": np.array([np.nan]), "sigma": np.array([0.7])}


def test_a_missing_model_method_is_named_not_silently_dropped():
    """The group a model cannot fill is absent, and the fit says which method would fill it."""
    fit, caught = quiet(fit_svi, ToyWithoutPredictive(), toy_y(), num_steps=3000, learning_rate=0.05,
                        progress_bar=False, num_draws=5)
    assert "posterior_predictive" not in fit.idata.groups() and "log_likelihood" in fit.idata.groups()
    assert fit.warnings == caught and len(fit.warnings) == 1
    assert "ToyWithoutPredictive does not implement posterior_predictive()" in fit.warnings[0]
    assert fit.idata.attrs["skipped"] == "posterior_predictive"


class ToyWithoutSiteDims(Toy):
    """Toy without site_dims and with a deterministic site."""

    site_dims = Model.site_dims

    def program(self, data, *, record_log_lik=False):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([self.obs_dim]).to_event(1))
        sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0).expand([self.obs_dim]).to_event(1))
        numpyro.deterministic("sigma_squared", sigma**2)
        numpyro.sample("y", dist.Normal(mu, sigma).mask(data.mask).to_event(3), obs=data.y)


def test_a_model_without_site_dims_gets_generic_dims_and_says_so():
    fit, caught = quiet(fit_svi, ToyWithoutSiteDims(), toy_y(), num_steps=50, progress_bar=False, num_draws=5)
    assert fit.idata.posterior["mu"].dims == ("chain", "draw", "mu_dim_0")
    assert "sigma_squared" not in fit.idata.posterior
    assert fit.warnings == caught and len(fit.warnings) == 1
    assert "ToyWithoutSiteDims does not implement site_dims(), so the posterior's dims are named" in fit.warnings[0]
    assert "no deterministic site is written" in fit.warnings[0]


def test_em_restarts_with_different_optima_warn():
    model = FakeEM([(GOOD, _history(np.full(20, -50.0), restarts=[-50.0, -58.0, -50.2]))])
    fit, caught = quiet(fit_em, model, toy_y())
    assert len(fit.warnings) == 1 and "up to 8 nats lower" in fit.warnings[0] and caught == fit.warnings
    model = FakeEM([(GOOD, _history(np.full(20, -50.0), restarts=[-50.0, -50.3, -50.2]))])
    fit, caught = quiet(fit_em, model, toy_y())
    assert fit.warnings == [] and caught == []
    np.testing.assert_array_equal(fit.point_estimate()["mu"], GOOD["mu"])


def test_em_moving_objective_warns_unless_converged():
    rising = -100.0 + np.arange(50.0)  # still climbing 1 nat per iteration
    fit, _ = quiet(fit_em, FakeEM([(GOOD, _history(rising))]), toy_y())
    assert any("EM objective still moving" in w for w in fit.warnings)
    fit, _ = quiet(fit_em, FakeEM([(GOOD, _history(rising, converged=True))]), toy_y())
    assert fit.warnings == []


def test_em_nonfinite_estimate_retries_new_starts_then_raises():
    model = FakeEM([(BAD, _history([-1.0] * 3)), (GOOD, _history([-1.0] * 3))])
    fit, caught = quiet(fit_em, model, toy_y())
    assert len(model.keys) == 2 and not np.array_equal(model.keys[0], model.keys[1])
    assert "retried with new starts" in fit.warnings[0] and "'mu'" in fit.warnings[0]
    model = FakeEM([(BAD, _history([-1.0] * 3))] * 3)
    with pytest.raises(FitError, match="after 3 tries") as err:
        fit_em(model, toy_y())
    assert err.value.sites == {"value": ["site 'mu'"]} and len(model.keys) == 3


def test_em_objective_nonfinite_part_way():
    fit, _ = quiet(fit_em, FakeEM([(GOOD, _history([-9.0, -5.0, np.nan]))]), toy_y())
    assert "became non-finite at iteration 2" in fit.warnings[0]
    with pytest.raises(FitError, match="em objective"):
        fit_em(FakeEM([(GOOD, _history([-9.0, np.nan, -5.0]))]), toy_y())
