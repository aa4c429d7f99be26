"""Runners (SVI, NUTS, EM), the Fit result, decoding and save/load, on toy models defined here.

The toy models are written with plain NumPyro and a hand-written forward algorithm so that these tests
do not depend on the model zoo. ``tests/test_results.py`` imports them.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax.scipy.special import logsumexp
from numpyro.infer.autoguide import AutoDelta

from ppl_switch.data import DataError, as_sequence_data
from ppl_switch.infer import (
    Fit,
    FitError,
    fit_em,
    fit_nuts,
    fit_svi,
    load,
    pointwise_log_likelihood,
    posterior_states,
    sidecar_path,
)
from ppl_switch.models.base import Model
from ppl_switch.results import get_group, group_names

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


# ----- toy models ---------------------------------------------------------------------------------
class ToyGaussian(Model):
    """iid y[n, t, d] ~ Normal(mu[d], sigma[d]) with a deterministic site; closed-form EM (the MLE)."""

    name = "toy_gaussian"

    def __init__(self, obs_dim=1):
        self.obs_dim = obs_dim

    def program(self, data, *, record_log_lik=False):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([self.obs_dim]).to_event(1))
        sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 1.0).expand([self.obs_dim]).to_event(1))
        numpyro.deterministic("precision", 1.0 / sigma**2)
        numpyro.deterministic("scratch", 2.0 * mu)  # not in site_dims: must not be written
        numpyro.sample("y", dist.Normal(mu, sigma).mask(data.mask).to_event(3), obs=data.y)

    def site_dims(self):
        return {"mu": ("obs",), "sigma": ("obs",), "precision": ("obs",)}

    def log_likelihood(self, params, data):
        lp = dist.Normal(params["mu"], params["sigma"]).log_prob(data.y)
        return jnp.where(data.mask, lp, 0.0).sum(-1)

    def posterior_predictive(self, key, params, data):
        return params["mu"] + params["sigma"] * jax.random.normal(key, data.y.shape)

    def em(self, data):
        """The maximum-likelihood estimate (one 'EM' step is exact here)."""
        m = np.asarray(data.mask)
        y = np.asarray(data.y)
        mu = (y * m).sum((0, 1)) / m.sum((0, 1))
        sigma = np.sqrt((((y - mu) ** 2) * m).sum((0, 1)) / m.sum((0, 1)))
        ll = self.log_likelihood({"mu": mu, "sigma": sigma}, data).sum()
        return {"mu": mu, "sigma": sigma, "precision": 1 / sigma**2}, np.array([float(ll)])

    def config(self):
        return {"obs_dim": self.obs_dim}


class NaNModel(Model):
    """y ~ Normal(log(a), 1) with a ~ Normal(0, 1): the log of a negative draw makes the loss NaN."""

    name = "nan_model"
    obs_dim = 1

    def program(self, data, *, record_log_lik=False):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(jnp.log(a), 1.0).mask(data.mask).to_event(3), obs=data.y)

    def default_guide(self):
        def guide(data, record_log_lik=False):
            loc = numpyro.param("a_loc", -0.5)  # negative on purpose
            numpyro.sample("a", dist.Normal(loc, 0.01))

        return guide

    def site_dims(self):
        return {"a": ()}

    def config(self):
        return {}


def _forward(log_pi, log_A, log_e):
    """Log-space forward pass of one trial: filtered log-joints alpha (T, K)."""

    def step(alpha, le):
        alpha = logsumexp(alpha[:, None] + log_A, axis=0) + le
        return alpha, alpha

    alpha0 = log_pi + log_e[0]
    _, rest = jax.lax.scan(step, alpha0, log_e[1:])
    return jnp.concatenate([alpha0[None], rest])


def _backward(log_A, log_e):
    def step(beta, le):
        beta = logsumexp(log_A + le + beta, axis=1)
        return beta, beta

    K = log_A.shape[0]
    _, betas = jax.lax.scan(step, jnp.zeros(K), log_e[1:], reverse=True)
    return jnp.concatenate([betas, jnp.zeros((1, K))])


def _viterbi(log_pi, log_A, log_e):
    def step(delta, le):
        scores = delta[:, None] + log_A
        return scores.max(0) + le, scores.argmax(0)

    delta, back = jax.lax.scan(step, log_pi + log_e[0], log_e[1:])
    last = jnp.argmax(delta)

    def trace_back(state, bp):
        prev = bp[state]
        return prev, prev

    _, path = jax.lax.scan(trace_back, last, back, reverse=True)
    return jnp.concatenate([path, last[None]])


def _ffbs(key, log_pi, log_A, log_e):
    alphas = _forward(log_pi, log_A, log_e)
    keys = jax.random.split(key, alphas.shape[0])
    last = jax.random.categorical(keys[-1], alphas[-1])

    def step(nxt, inp):
        alpha, k = inp
        z = jax.random.categorical(k, alpha + log_A[:, nxt])
        return z, z

    _, path = jax.lax.scan(step, last, (alphas[:-1], keys[:-1]), reverse=True)
    return jnp.concatenate([path, last[None]])


class ToyHMM(Model):
    """K-state Gaussian HMM with the discrete states marginalised by a hand-written forward algorithm."""

    name = "toy_hmm"

    def __init__(self, num_states=2, obs_dim=1):
        self.num_states = num_states
        self.obs_dim = obs_dim

    def program(self, data, *, record_log_lik=False):
        K, D = self.num_states, self.obs_dim
        init = numpyro.sample("init_probs", dist.Dirichlet(jnp.ones(K)))
        trans = numpyro.sample("transition_matrix", dist.Dirichlet(jnp.ones((K, K)) + 4 * jnp.eye(K)).to_event(1))
        means = numpyro.sample("means", dist.Normal(0.0, 5.0).expand([K, D]).to_event(2))
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5).expand([D]).to_event(1))
        params = {"init_probs": init, "transition_matrix": trans, "means": means, "scale": scale}
        numpyro.factor("y", self.log_likelihood(params, data).sum())

    def site_dims(self):
        return {
            "init_probs": ("state",),
            "transition_matrix": ("state", "state_to"),
            "means": ("state", "obs"),
            "scale": ("obs",),
        }

    def _log_terms(self, params, data):
        lp = dist.Normal(params["means"], params["scale"]).log_prob(data.y[:, :, None, :])  # (N, T, K, D)
        log_e = jnp.where(data.mask[:, :, None, :], lp, 0.0).sum(-1)
        return jnp.log(params["init_probs"]), jnp.log(params["transition_matrix"]), log_e

    def log_likelihood(self, params, data):
        log_pi, log_A, log_e = self._log_terms(params, data)
        log_z = logsumexp(jax.vmap(_forward, (None, None, 0))(log_pi, log_A, log_e), axis=-1)
        ll = jnp.diff(log_z, axis=1, prepend=0.0)
        return jnp.where(data.mask.any(-1), ll, 0.0)

    def state_posterior(self, params, data):
        log_pi, log_A, log_e = self._log_terms(params, data)
        alpha = jax.vmap(_forward, (None, None, 0))(log_pi, log_A, log_e)
        beta = jax.vmap(_backward, (None, 0))(log_A, log_e)
        probs = jax.nn.softmax(alpha + beta, axis=-1)
        viterbi = jax.vmap(_viterbi, (None, None, 0))(log_pi, log_A, log_e)
        return {"state_probs": probs, "viterbi": viterbi}

    def sample_states(self, key, params, data):
        log_pi, log_A, log_e = self._log_terms(params, data)
        keys = jax.random.split(key, data.y.shape[0])
        return jax.vmap(_ffbs, (0, None, None, 0))(keys, log_pi, log_A, log_e)

    def posterior_predictive(self, key, params, data):
        # cheap for tests: states drawn independently from the filtering marginals
        log_pi, log_A, log_e = self._log_terms(params, data)
        alpha = jax.vmap(_forward, (None, None, 0))(log_pi, log_A, log_e)
        k1, k2 = jax.random.split(key)
        z = jax.random.categorical(k1, alpha)
        return params["means"][z] + params["scale"] * jax.random.normal(k2, data.y.shape)

    def simulate(self, key, num_trials, num_timesteps, *, params=None, inputs=None):
        params = params or self.default_params(key)
        k1, k2, k3 = jax.random.split(key, 3)

        def trial(k):
            ka, kb = jax.random.split(k)
            z0 = jax.random.categorical(ka, jnp.log(params["init_probs"]))

            def step(z, kk):
                zn = jax.random.categorical(kk, jnp.log(params["transition_matrix"][z]))
                return zn, zn

            _, zs = jax.lax.scan(step, z0, jax.random.split(kb, num_timesteps - 1))
            return jnp.concatenate([z0[None], zs])

        z = jax.vmap(trial)(jax.random.split(k2, num_trials))
        y = params["means"][z] + params["scale"] * jax.random.normal(k3, (num_trials, num_timesteps, self.obs_dim))
        return as_sequence_data(np.asarray(y)), {"states": np.asarray(z), **params}

    def default_params(self, key=None):
        K, D = self.num_states, self.obs_dim
        means = jnp.linspace(-2.0, 2.0, K)[:, None] * jnp.ones((K, D))
        return {
            "init_probs": jnp.ones(K) / K,
            "transition_matrix": 0.9 * jnp.eye(K) + 0.1 / K,
            "means": means,
            "scale": 0.5 * jnp.ones(D),
        }

    def state_features(self, params):
        return np.asarray(params["means"])

    def permute_states(self, params, perm):
        out = dict(params)
        out["init_probs"] = params["init_probs"][..., perm]
        out["transition_matrix"] = params["transition_matrix"][..., perm, :][..., :, perm]
        out["means"] = params["means"][..., perm, :]
        return out

    def config(self):
        return {"num_states": self.num_states, "obs_dim": self.obs_dim}


def gaussian_data(seed=0, num_trials=3, num_steps=40, mu=1.5, sigma=0.7):
    rng = np.random.default_rng(seed)
    y = mu + sigma * rng.standard_normal((num_trials, num_steps, 1))
    lengths = np.array([num_steps, num_steps - 7, num_steps - 15])[:num_trials]
    mask = rng.random(y.shape) > 0.1
    return y, mask, lengths


def hmm_data(num_trials=2, num_steps=24):
    model = ToyHMM()
    data, truth = model.simulate(jax.random.PRNGKey(3), num_trials, num_steps)
    lengths = np.array([num_steps, num_steps - 6])[:num_trials]
    mask = np.ones(data.y.shape, bool)
    mask[0, 5] = False  # one missing step inside a trial
    return model, as_sequence_data(data.y, mask=mask, lengths=lengths), truth


# ----- SVI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian_svi_fit():
    y, mask, lengths = gaussian_data()
    return fit_svi(
        ToyGaussian(), y, mask=mask, lengths=lengths, num_steps=600, learning_rate=0.05, num_draws=100, progress_bar=False
    )


def test_svi_reduces_loss_and_recovers_mean(gaussian_svi_fit):
    fit = gaussian_svi_fit
    y, mask, lengths = gaussian_data()
    assert isinstance(fit, Fit) and fit.method == "svi"
    assert fit.losses.shape == (600,) and np.isfinite(fit.losses).all()
    assert fit.losses[-50:].mean() < fit.losses[:50].mean() - 10
    valid = mask & (np.arange(y.shape[1])[None, :, None] < lengths[:, None, None])
    mle = y[valid].mean()
    assert fit.samples["mu"].shape == (1, 100, 1)
    assert abs(fit.samples["mu"].mean() - mle) < 0.05
    assert abs(fit.samples["sigma"].mean() - y[valid].std()) < 0.1
    # deterministic sites listed in site_dims are recomputed per draw; unlisted ones are dropped
    np.testing.assert_allclose(fit.samples["precision"], 1 / fit.samples["sigma"] ** 2, rtol=1e-6)
    assert "scratch" not in fit.samples
    assert set(fit.params) == {"mu_auto_loc", "mu_auto_scale", "sigma_auto_loc", "sigma_auto_scale"}


def test_svi_idata_groups(gaussian_svi_fit):
    idata = gaussian_svi_fit.idata
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data", "constant_data"} <= set(
        group_names(idata)
    )
    ll = get_group(idata, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "trial", "time") and ll.shape == (1, 100, 3, 40)
    # padded and masked steps contribute exactly 0
    y, mask, lengths = gaussian_data()
    assert np.all(ll.values[:, :, 2, 25:] == 0)
    assert np.all(ll.values[:, :, ~mask[..., 0]] == 0)
    pp = get_group(idata, "posterior_predictive")["y"]
    assert np.isnan(pp.values[:, :, 2, 25:]).all() and np.isfinite(pp.values[:, :, 0]).all()


def test_svi_pointwise_log_likelihood_matches_model(gaussian_svi_fit):
    fit = gaussian_svi_fit
    ll = get_group(fit.idata, "log_likelihood")["y"].values
    for d in (0, 57):
        params = {k: v[0, d] for k, v in fit.samples.items()}
        direct = np.asarray(fit.model.log_likelihood(params, fit.data))
        np.testing.assert_allclose(ll[0, d], direct, rtol=1e-6, atol=1e-9)


def test_svi_same_seed_same_numbers_and_quiet(gaussian_svi_fit, capsys):
    y, mask, lengths = gaussian_data()
    model = gaussian_svi_fit.model
    kw = dict(mask=mask, lengths=lengths, num_steps=600, learning_rate=0.05, num_draws=100, progress_bar=False)
    again = fit_svi(model, y, **kw)
    np.testing.assert_array_equal(again.losses, gaussian_svi_fit.losses)
    np.testing.assert_array_equal(again.samples["mu"], gaussian_svi_fit.samples["mu"])
    np.testing.assert_array_equal(
        get_group(again.idata, "posterior_predictive")["y"].values,
        get_group(gaussian_svi_fit.idata, "posterior_predictive")["y"].values,
    )
    other = fit_svi(model, y, seed=1, **kw)
    assert not np.array_equal(other.samples["mu"], again.samples["mu"])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_svi_custom_guide_and_optax_optimizer():
    y, mask, lengths = gaussian_data()
    model = ToyGaussian()
    fit = fit_svi(
        model,
        y,
        mask=mask,
        lengths=lengths,
        guide=AutoDelta(model.program),
        optimizer=optax.adam(0.1),
        num_steps=300,
        num_draws=5,
        progress_bar=False,
    )
    assert fit.samples["mu"].shape == (1, 5, 1)
    assert np.ptp(fit.samples["mu"]) == 0  # a point-mass guide gives identical draws
    valid = mask & (np.arange(40)[None, :, None] < lengths[:, None, None])
    assert abs(fit.samples["mu"][0, 0, 0] - y[valid].mean()) < 0.05
    assert fit.config["guide"] == "AutoDelta"


def test_guide_median_keeps_posterior_sites_and_raises_a_broken_median():
    """``guide_median``: the guide's median of the named sites; None where the guide has no median
    (numpyro's NotImplementedError, or no attribute); any other error in a median propagates."""
    from ppl_switch.infer.svi import guide_median

    class Guide:
        def __init__(self, median):
            self.median = median

    def broken(params):
        raise TypeError("a bug in the median")

    assert guide_median(Guide(lambda p: {"mu": p["loc"], "aux": 1.0}), {"loc": 2.0}, ["mu", "sigma"]) == {"mu": 2.0}
    assert guide_median(Guide(lambda p: {"other": 1.0}), {}, ["mu"]) is None
    with pytest.raises(TypeError, match="a bug in the median"):
        guide_median(Guide(broken), {}, ["mu"])

    def none(params):
        raise NotImplementedError

    assert guide_median(Guide(none), {}, ["mu"]) is None and guide_median(object(), {}, ["mu"]) is None


def test_svi_nan_loss_raises_fit_error_naming_site():
    y, mask, lengths = gaussian_data()
    with pytest.raises(FitError) as info:
        fit_svi(NaNModel(), y, num_steps=50, progress_bar=False)
    err = info.value
    assert err.step == 0
    assert "step 0" in str(err)
    assert "model site 'y'" in str(err)
    assert "model site 'y'" in err.sites["log_density"]
    assert "'a'" not in " ".join(err.sites["log_density"])  # the prior on a is fine


def test_svi_bad_input_fails_before_compiling():
    y, mask, lengths = gaussian_data()
    with pytest.raises(DataError, match="obs_dim=2"):
        fit_svi(ToyGaussian(obs_dim=2), y, num_steps=10)
    with pytest.raises(DataError, match="num_steps"):
        fit_svi(ToyGaussian(), y, num_steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        fit_svi(ToyGaussian(), y, learning_rate=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        fit_svi(ToyGaussian(), y, optimizer="adam")
    with pytest.raises(DataError, match="lengths"):
        fit_svi(ToyGaussian(), y, lengths=[3, 2])


# ----- NUTS, decoding -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hmm_nuts_fit():
    model, data, truth = hmm_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_nuts(
            model, data, num_warmup=80, num_samples=40, num_chains=2, chain_method="vectorized", progress_bar=False, seed=1
        )
    return fit, truth


def test_nuts_sample_stats_and_diagnostics(hmm_nuts_fit):
    fit, truth = hmm_nuts_fit
    stats = get_group(fit.idata, "sample_stats")
    assert {"diverging", "step_size", "tree_depth", "acceptance_rate", "energy", "lp"} <= set(stats.data_vars)
    assert stats["diverging"].shape == (2, 40) and stats["diverging"].dtype == bool
    assert fit.diagnostics["num_divergences"] == int(stats["diverging"].values.sum())
    assert len(fit.diagnostics["divergences_per_chain"]) == 2
    assert 0 < fit.diagnostics["mean_acceptance_rate"] <= 1
    assert fit.idata.attrs["num_divergences"] == fit.diagnostics["num_divergences"]
    assert fit.samples["means"].shape == (2, 40, 2, 1)


def test_nuts_recovers_and_relabels_hmm(hmm_nuts_fit):
    fit, truth = hmm_nuts_fit
    means = fit.samples["means"][..., 0]  # (chain, draw, K)
    # after relabelling every draw uses the same order, so the chain-wise posterior means agree
    per_chain = means.mean(1)
    np.testing.assert_allclose(per_chain[0], per_chain[1], atol=0.3)
    np.testing.assert_allclose(np.sort(per_chain[0]), np.sort(np.asarray(truth["means"][:, 0])), atol=0.4)
    assert fit.idata.attrs["relabelled"] == 1


def test_nuts_posterior_states_group(hmm_nuts_fit):
    fit, truth = hmm_nuts_fit
    states = get_group(fit.idata, "posterior_states")
    probs = states["state_probs"].values
    assert states["state_probs"].dims == ("trial", "time", "state") and probs.shape == (2, 24, 2)
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, rtol=1e-6)
    assert np.isnan(probs[1, 18:]).all() and not np.isnan(probs[1, :18]).any()  # past trial 1's length
    viterbi = states["viterbi"].values
    assert states["viterbi"].dims == ("chain", "draw", "trial", "time")
    assert (viterbi[:, :, 1, 18:] == -1).all() and set(np.unique(viterbi[:, :, 0])) <= {0, 1}
    # the decoded states match the truth up to a label permutation
    map_states = probs[0].argmax(-1)
    acc = max(np.mean(map_states == truth["states"][0]), np.mean(map_states == 1 - truth["states"][0]))
    assert acc > 0.9


def test_posterior_states_matches_per_draw_oracle(hmm_nuts_fit):
    fit, _ = hmm_nuts_fit
    sub = {k: v[:, :9] for k, v in fit.samples.items()}  # 18 draws, chunks of 7 leave a remainder
    out = posterior_states(fit.model, sub, fit.data, seed=3, chunk_size=7)
    probs, viterbi = [], []
    state_posterior = jax.jit(fit.model.state_posterior)
    for c in range(2):
        for d in range(9):
            post = state_posterior({k: v[c, d] for k, v in sub.items()}, fit.data)
            probs.append(np.asarray(post["state_probs"]))
            viterbi.append(np.asarray(post["viterbi"]))
    inside = fit.data.time_mask
    np.testing.assert_allclose(out["state_probs"][inside], np.mean(probs, 0)[inside], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(out["viterbi"].reshape(18, 2, 24)[:, inside], np.array(viterbi)[:, inside])
    # sampled paths: valid states inside, -1 outside
    samples = out["state_samples"].reshape(18, 2, 24)
    assert set(np.unique(samples[:, inside])) <= {0, 1} and (samples[:, ~inside] == -1).all()
    # same seed, same paths (and no recompilation: the decoder is cached per model and shapes)
    again = posterior_states(fit.model, sub, fit.data, seed=3, chunk_size=7)
    np.testing.assert_array_equal(again["state_samples"], out["state_samples"])


def test_pointwise_log_likelihood_sums_to_marginal(hmm_nuts_fit):
    fit, _ = hmm_nuts_fit
    sub = {k: v[:1, :3] for k, v in fit.samples.items()}
    ll = pointwise_log_likelihood(fit.model, sub, fit.data, chunk_size=2)
    assert ll.shape == (1, 3, 2, 24)
    # oracle: brute-force enumeration of all 2^T paths of a short prefix is too big; use the
    # trial-by-trial forward pass on each trial cut to its own length instead.
    log_likelihood = jax.jit(fit.model.log_likelihood)
    for d in range(3):
        params = {k: v[0, d] for k, v in sub.items()}
        for n in range(2):
            trial = fit.data.trial(n)
            total = float(log_likelihood(params, trial).sum())
            np.testing.assert_allclose(ll[0, d, n].sum(), total, rtol=1e-8)


def test_nuts_same_seed_same_draws_and_init_params():
    y, mask, lengths = gaussian_data(num_trials=1, num_steps=20)
    model = ToyGaussian()
    kw = dict(num_warmup=20, num_samples=10, progress_bar=False)
    a = fit_nuts(model, y, seed=2, **kw)
    c = fit_nuts(model, y, seed=2, **kw)
    np.testing.assert_array_equal(a.samples["mu"], c.samples["mu"])
    np.testing.assert_array_equal(get_group(a.idata, "sample_stats")["lp"], get_group(c.idata, "sample_stats")["lp"])
    assert "precision" in a.samples and "scratch" not in a.samples
    # init_params start the chain there: with no warmup, the first draws stay near a far-away start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a divergence from the far-away start
        far = fit_nuts(model, y, seed=2, num_warmup=0, num_samples=1, init_params={"mu": np.array([40.0])}, progress_bar=False)
    assert far.samples["mu"][0, 0, 0] > 20
    with pytest.raises(ValueError, match="init_params"):
        fit_nuts(model, y, init_params={"nope": 1.0}, **kw)
    with pytest.raises(ValueError, match="chain_method"):
        fit_nuts(model, y, chain_method="threads", **kw)
    with pytest.raises(ValueError, match="target_accept"):
        fit_nuts(model, y, target_accept=1.5, **kw)


@pytest.mark.parametrize("num_chains", [1, 3])
def test_sequential_chains_run_in_one_program_with_numpyros_draws(num_chains, monkeypatch):
    """fit_nuts' default "sequential" runs the chains one after another in one compiled program, start
    included, one chain too: numpyro's sampling loop is never lowered as a program of its own (numpyro's own
    sequential mode lowered and compiled it once per chain, after starting each chain op by op), and the draws
    are those of numpyro's own MCMC with the same key. With a progress bar too (the CLI's default): the bar
    counts every chain's steps from the compiled program's reports."""
    from numpyro.infer import MCMC, NUTS

    y, _, _ = gaussian_data(num_trials=1, num_steps=20)
    model = ToyGaussian()
    kw = dict(num_warmup=15, num_samples=10, num_chains=num_chains)
    lowered = []  # top-level programs lowered to XLA (also when the persistent cache then has them)

    def listener(event, duration, fun_name="", **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ours = fit_nuts(model, y, seed=4, progress_bar=False, **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert lowered and not [name for name in lowered if "_fori_collect_loop" in name], lowered
    mcmc = MCMC(NUTS(model.program), chain_method="sequential", progress_bar=False, **kw)
    mcmc.run(jax.random.split(jax.random.PRNGKey(4))[0], ours.data)
    theirs = mcmc.get_samples(group_by_chain=True)
    assert set(ours.samples) <= set(theirs)
    for name in ours.samples:
        np.testing.assert_allclose(ours.samples[name], theirs[name], rtol=1e-10, atol=1e-12, err_msg=name)
    reports = count_progress_reports(monkeypatch)
    shown = fit_nuts(model, y, seed=4, progress_bar=True, **kw)
    for name in ours.samples:
        np.testing.assert_allclose(shown.samples[name], ours.samples[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert reports == [num_chains * (kw["num_warmup"] + kw["num_samples"])]  # every step of every chain reported


def count_progress_reports(monkeypatch) -> list:
    """Replaces fit_nuts' progress bar by a counter of the steps the compiled run reports (one entry per fit,
    without the bar's completion at the end); returns the list of counts, filled as fits run."""
    import contextlib

    from ppl_switch.infer import nuts

    counts = []

    class Counter:
        def update(self, steps):
            counts[-1] += steps

    @contextlib.contextmanager
    def counting(total, num_chains, enabled):
        counts.append(0)
        nuts._ACTIVE_BAR[0] = Counter() if enabled else None
        try:
            yield
        finally:
            nuts._ACTIVE_BAR[0] = None

    monkeypatch.setattr(nuts, "_progress", counting)
    return counts


def test_vectorized_chains_report_every_chains_steps_to_the_bar(monkeypatch):
    y, _, _ = gaussian_data(num_trials=1, num_steps=20)
    reports = count_progress_reports(monkeypatch)
    fit = fit_nuts(ToyGaussian(), y, num_warmup=200, num_samples=200, num_chains=2, chain_method="vectorized", seed=1)
    assert fit.samples["mu"].shape[:2] == (2, 200)
    assert reports == [2 * 400]  # a report every 4 steps, counting both chains' steps


PARALLEL_CHAINS_SCRIPT = """
import numpy as np, numpyro, numpyro.distributions as dist
from ppl_switch.infer import fit_nuts
from ppl_switch.models.base import Model

class CorrelatedGaussian(Model):  # an LKJCholesky site: its inverse transform runs inside the chains' shard_map
    name = "correlated_gaussian"
    obs_dim = 2
    def program(self, data, *, record_log_lik=False):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        corr = numpyro.sample("corr_chol", dist.LKJCholesky(2, 2.0))
        numpyro.sample("y", dist.MultivariateNormal(mu, scale_tril=corr).expand(data.y.shape[:2]).to_event(2), obs=data.y)
    def site_dims(self):
        return {"mu": ("obs",), "corr_chol": ("obs", "obs_")}
    def config(self):
        return {}

y = np.random.default_rng(0).normal(size=(1, 30, 2)) + np.array([3.0, -1.0])
fit = fit_nuts(CorrelatedGaussian(), y, num_chains=2, chain_method="parallel", num_warmup=30, num_samples=20,
               init_params={"mu": np.array([3.0, -1.0]), "corr_chol": np.eye(2)}, progress_bar=False, seed=0)
mu = fit.samples["mu"]
assert mu.shape == (2, 20, 2), mu.shape
assert not np.allclose(mu[0], mu[1])  # two chains, not one run twice
assert np.all(np.abs(mu.mean((0, 1)) - np.array([3.0, -1.0])) < 0.6), mu.mean((0, 1))
print("ok")
"""


def test_nuts_parallel_chains_with_init_params(tmp_path):
    """chain_method="parallel" (one XLA device per chain: the device count is fixed when JAX starts, so a
    fresh interpreter) with numpy init_params and a site whose inverse transform indexes (LKJCholesky):
    numpy values there failed inside numpyro's shard_map."""
    import subprocess
    import sys

    from subprocess_env import checkout_env

    env = checkout_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", PARALLEL_CHAINS_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_nuts_dense_mass_blocks_and_tree_depth_cap():
    y, _, _ = gaussian_data(num_trials=1, num_steps=20)
    model = ToyGaussian()
    kw = dict(num_warmup=30, num_samples=20, progress_bar=False, seed=3)
    fit = fit_nuts(model, y, dense_mass=[("mu", "sigma")], max_tree_depth=2, **kw)
    # at most 2**2 - 1 leapfrog steps per draw, and the run still targets the posterior (mu near the data mean)
    assert int(np.max(get_group(fit.idata, "sample_stats")["n_steps"])) <= 3
    assert abs(float(np.mean(fit.samples["mu"])) - float(np.mean(y))) < 0.5
    with pytest.raises(ValueError, match="dense_mass"):
        fit_nuts(model, y, dense_mass=[("mu", "nope")], **kw)
    with pytest.raises(ValueError, match="dense_mass"):
        fit_nuts(model, y, dense_mass="full", **kw)
    with pytest.raises(DataError, match="max_tree_depth"):
        fit_nuts(model, y, max_tree_depth=0, **kw)


# ----- EM -----------------------------------------------------------------------------------------
def test_fit_em_dispatches_to_model_em():
    y, mask, lengths = gaussian_data()
    fit = fit_em(ToyGaussian(), y, mask=mask, lengths=lengths)
    assert fit.method == "em"
    valid = mask & (np.arange(40)[None, :, None] < lengths[:, None, None])
    np.testing.assert_allclose(fit.params["mu"], [y[valid].mean()], rtol=1e-10)
    assert fit.samples["mu"].shape == (1, 1, 1)
    ll = get_group(fit.idata, "log_likelihood")["y"].values
    np.testing.assert_allclose(ll.sum(), fit.diagnostics["log_likelihoods"][-1], rtol=1e-10)
    np.testing.assert_allclose(fit.losses, -fit.diagnostics["log_likelihoods"])


def test_fit_em_without_em_names_model_and_alternatives():
    y, _, _ = gaussian_data()
    with pytest.raises(NotImplementedError, match=r"'nan_model'.*fit_svi and fit_nuts"):
        fit_em(NaNModel(), y)


# ----- save / load --------------------------------------------------------------------------------
def _assert_same_fit(a, b):
    assert a.method == b.method and a.config == b.config
    assert set(a.samples) == set(b.samples)
    for k in a.samples:
        np.testing.assert_array_equal(a.samples[k], b.samples[k])
    for field in a.data._fields:
        va, vb = getattr(a.data, field), getattr(b.data, field)
        assert (va is None) == (vb is None)
        if va is not None:
            np.testing.assert_array_equal(va, vb)
    if a.params is None:
        assert b.params is None
    else:
        assert set(a.params) == set(b.params)
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    if a.losses is not None:
        np.testing.assert_array_equal(a.losses, b.losses)
    assert set(group_names(a.idata)) == set(group_names(b.idata))
    for g in group_names(a.idata):
        assert get_group(a.idata, g).drop_attrs().identical(get_group(b.idata, g).drop_attrs()), g


def test_save_load_round_trip_svi(gaussian_svi_fit, tmp_path, monkeypatch):
    fit = gaussian_svi_fit
    path = tmp_path / "fit.nc"
    sidecar = fit.save(path)
    assert sidecar == sidecar_path(path) and sidecar.name == "fit.nc.json"
    text = sidecar.read_text()
    assert '"toy_gaussian"' in text and '"svi"' in text and "ppl_switch" in text

    # through the registry (ppl_switch.models.get_model), as the CLI does
    import ppl_switch.models as models

    calls = []

    def get_model(name, **config):
        calls.append((name, config))
        return ToyGaussian(**config)

    monkeypatch.setattr(models, "get_model", get_model, raising=False)
    loaded = load(path)
    assert calls == [("toy_gaussian", {"obs_dim": 1})]
    _assert_same_fit(fit, loaded)
    assert "fit_params" not in group_names(loaded.idata)


def test_save_load_round_trip_nuts(hmm_nuts_fit, tmp_path):
    fit, _ = hmm_nuts_fit
    fit.save(tmp_path / "nuts.nc")
    loaded = load(tmp_path / "nuts.nc", model=ToyHMM(), backend="datatree")
    import xarray as xr

    assert isinstance(loaded.idata, xr.DataTree)
    _assert_same_fit(fit, loaded)
    assert loaded.diagnostics["num_divergences"] == fit.diagnostics["num_divergences"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load(tmp_path / "missing.nc")
