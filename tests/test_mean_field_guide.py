"""MeanFieldNormal against numpyro's AutoNormal: the same family, parameters, start, draws and median, with the
set-up compiled (ppl_switch/guides/mean_field.py); and fit_svi's compiled init gives the eager init's start."""

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_median, init_to_sample

from ppl_switch.guides.full_rank import FullRankNormal
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.infer import fit_svi
from ppl_switch.models import HMM

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def program(y):
    """Every kind of support the models use, a plate, and a deterministic site."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    sd = numpyro.sample("sd", dist.HalfNormal(1.0))
    probs = numpyro.sample("probs", dist.Dirichlet(jnp.ones(3)))
    corr = numpyro.sample("corr", dist.LKJCholesky(2, 2.0))
    numpyro.deterministic("cov", sd**2 * corr @ corr.T)
    with numpyro.plate("group", 4):
        offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu[0] + offset[:, None] + probs[0] + corr[1, 0], sd), obs=y)


Y = np.linspace(-1.0, 2.0, 20).reshape(4, 5)


def _init(guide, strategy_seed=0):
    svi = SVI(program, guide, optax.adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(strategy_seed), Y)
    return svi, state


@pytest.mark.parametrize("strategy", [init_to_sample, init_to_median(num_samples=15)], ids=["sample", "median"])
def test_same_start_parameters_draws_and_median_as_autonormal(strategy):
    ours, theirs = MeanFieldNormal(program, init_loc_fn=strategy), AutoNormal(program, init_loc_fn=strategy)
    svi_a, state_a = _init(ours)
    svi_b, state_b = _init(theirs)
    params_a, params_b = svi_a.get_params(state_a), svi_b.get_params(state_b)
    assert params_a.keys() == params_b.keys() and len(params_a) == 10
    for name in params_a:
        np.testing.assert_allclose(params_a[name], params_b[name], rtol=1e-12, atol=1e-12, err_msg=name)
    # at other parameters too: draws of every site under the same key, and the median with the deterministic site
    moved = {k: v + 0.1 * (i + 1) for i, (k, v) in enumerate(params_b.items())}
    draw = lambda g: handlers.trace(handlers.substitute(handlers.seed(g, 3), data=moved)).get_trace(Y)  # noqa: E731
    tr_a, tr_b = draw(ours), draw(theirs)
    assert [k for k, s in tr_a.items() if s["type"] == "sample"] == [k for k, s in tr_b.items() if s["type"] == "sample"]
    for name in ("mu", "sd", "probs", "corr", "offset"):
        np.testing.assert_allclose(tr_a[name]["value"], tr_b[name]["value"], rtol=1e-12, err_msg=name)
    med_a, med_b = ours.median(moved), theirs.median(moved)
    assert med_a.keys() == med_b.keys() and "cov" in med_a
    for name in med_a:
        np.testing.assert_allclose(med_a[name], med_b[name], rtol=1e-12, err_msg=name)


def test_a_start_with_no_finite_density_raises():
    def impossible(y):
        scale = numpyro.sample("scale", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Uniform(0.0, scale), obs=y)

    svi = SVI(impossible, MeanFieldNormal(impossible), optax.adam(0.01), Trace_ELBO())
    with pytest.raises(RuntimeError, match="Cannot find valid initial parameters"):
        svi.init(jax.random.PRNGKey(0), jnp.array([-1.0]))


def sometimes_valid(y):
    """Half of the prior's draws give no finite density."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.factor("keep_positive", jnp.where(mu[0] > 0, 0.0, -jnp.inf))
    numpyro.sample("y", dist.Normal(mu[1], 1.0), obs=y)


@pytest.mark.parametrize("strategy", [init_to_sample, init_to_median(num_samples=15)], ids=["sample", "median"])
def test_a_failed_first_try_goes_on_with_numpyros_search(strategy):
    """The set-up's straight-line first try is numpyro's first try: where it fails, the whole search runs and
    the start is AutoNormal's (a later try); where it succeeds, the same."""
    first_try, _, _ = MeanFieldNormal(sometimes_valid, init_loc_fn=strategy)._compile_set_up(())
    outcomes = {}
    for seed in range(12):
        ours, theirs = MeanFieldNormal(sometimes_valid, init_loc_fn=strategy), AutoNormal(sometimes_valid, init_loc_fn=strategy)
        handlers.seed(ours.set_up, seed)(Y)
        handlers.seed(theirs._setup_prototype, seed)(Y)  # numpyro's start search, op by op
        np.testing.assert_allclose(ours.init_locs["mu"], theirs._init_locs["mu"], rtol=1e-12, err_msg=str(seed))
        assert theirs._init_locs["mu"][0] > 0
        key = handlers.seed(numpyro.prng_key, seed)()  # the key each set-up drew
        outcomes[seed] = bool(first_try(key, (Y,), {})[1])
    assert not all(outcomes.values()) and any(outcomes.values()), outcomes  # both paths were taken


def _count_traces(fn):
    seen = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(seen)


def test_set_up_is_compiled_once_per_cache_key_and_shapes():
    make = lambda: MeanFieldNormal(program, init_loc_fn=init_to_sample, cache_key=("test", "program"))  # noqa: E731
    first = make()
    handlers.seed(first.set_up, 0)(Y)
    second = make()
    assert _count_traces(lambda: handlers.seed(second.set_up, 1)(Y)) == 0
    assert [s[0] for s in second.sites] == ["mu", "sd", "probs", "corr", "offset"]
    assert not np.allclose(second.init_locs["mu"], first.init_locs["mu"])  # its own key: its own prior draw
    third = make()
    assert _count_traces(lambda: handlers.seed(third.set_up, 1)(Y[:, :3])) > 0  # other shapes: a new program


def test_fit_svi_compiled_init_starts_where_the_eager_init_does():
    """fit_svi sets the default guide up with the key svi.init would give it: the same losses as a fit with
    numpyro's AutoNormal (same family and strategy) and its eager init."""
    model = HMM(2, obs_dim=2)
    data, _ = model.simulate(jax.random.PRNGKey(0), 2, 15)
    kw = dict(num_steps=10, num_draws=4, seed=5, progress_bar=False)
    ours = fit_svi(model, data.y, **kw)
    assert isinstance(model.default_guide(), MeanFieldNormal)
    theirs = fit_svi(model, data.y, guide=AutoNormal(model.program, init_loc_fn=init_to_sample, init_scale=0.1), **kw)
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-10)
    for name in ours.estimate:
        np.testing.assert_allclose(ours.estimate[name], theirs.estimate[name], rtol=1e-8, atol=1e-10, err_msg=name)


def flagged(y, *, extra=False):
    """A Python flag that changes which sites exist (as ``record_log_lik`` adds a site to the models)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    if extra:
        numpyro.sample("spread", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_python_flags_are_part_of_the_compiled_set_up_and_median():
    """A bool keyword is not traced (the program branches on it) and is part of the cache key: the same key
    and shapes with the other flag value set up the other program; start and median match AutoNormal's."""
    key = ("test", "flagged")
    on = MeanFieldNormal(flagged, init_loc_fn=init_to_sample, cache_key=key)
    handlers.seed(on.set_up, 0)(Y, extra=True)
    off = MeanFieldNormal(flagged, init_loc_fn=init_to_sample, cache_key=key)
    handlers.seed(off.set_up, 0)(Y, extra=False)
    assert [s[0] for s in on.sites] == ["mu", "spread"] and [s[0] for s in off.sites] == ["mu"]
    medians = []
    for guide in (MeanFieldNormal(flagged, init_loc_fn=init_to_sample, cache_key=key), AutoNormal(flagged, init_loc_fn=init_to_sample)):
        svi = SVI(flagged, guide, optax.adam(0.01), Trace_ELBO())
        medians.append(guide.median(svi.get_params(svi.init(jax.random.PRNGKey(0), Y, extra=True))))
    assert medians[0].keys() == medians[1].keys() == {"mu", "spread"}
    for name in medians[1]:
        np.testing.assert_allclose(medians[0][name], medians[1][name], rtol=1e-12, err_msg=name)


def test_full_rank_normal_is_automultivariatenormal_with_a_compiled_set_up():
    """FullRankNormal against numpyro's AutoMultivariateNormal on the same program and key: the same start
    (vector layout in the program's order), and at other parameters the same draws and densities of every
    site (the Jacobian terms included), posterior draws with the deterministic site, q and the median."""
    ours, theirs = FullRankNormal(program, init_loc_fn=init_to_sample), AutoMultivariateNormal(program, init_loc_fn=init_to_sample)
    svi_a, state_a = _init(ours)
    svi_b, state_b = _init(theirs)
    params_a, params_b = svi_a.get_params(state_a), svi_b.get_params(state_b)
    assert params_a.keys() == params_b.keys() == {"auto_loc", "auto_scale_tril"}
    for name in params_a:
        np.testing.assert_allclose(params_a[name], params_b[name], rtol=1e-12, atol=1e-12, err_msg=name)
    n = params_b["auto_loc"].shape[0]
    vector = np.arange(n, dtype=float)  # the layout: numpyro's unpacking of any vector
    layout_a, layout_b = ours.unpack_latent(vector), theirs._unpack_latent(vector)
    assert list(layout_a) == list(layout_b)
    for name in layout_b:
        np.testing.assert_array_equal(layout_a[name], layout_b[name], err_msg=name)
    moved = {"auto_loc": params_b["auto_loc"] + 0.1 * np.arange(n),
             "auto_scale_tril": 1.5 * params_b["auto_scale_tril"] + 0.05 * np.tril(np.ones((n, n)), -1)}
    draw = lambda g: handlers.trace(handlers.substitute(handlers.seed(g, 3), data=moved)).get_trace(Y)  # noqa: E731
    tr_a, tr_b = draw(ours), draw(theirs)
    sites = [k for k, s in tr_b.items() if s["type"] == "sample"]
    assert [k for k, s in tr_a.items() if s["type"] == "sample"] == sites and "_auto_latent" in sites
    for name in sites:
        np.testing.assert_allclose(tr_a[name]["value"], tr_b[name]["value"], rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(tr_a[name]["fn"].log_prob(tr_a[name]["value"]), tr_b[name]["fn"].log_prob(tr_b[name]["value"]),
                                   rtol=1e-12, err_msg=name)
    post_a = ours.sample_posterior(jax.random.PRNGKey(5), moved, sample_shape=(3,))
    post_b = theirs.sample_posterior(jax.random.PRNGKey(5), moved, sample_shape=(3,))
    assert post_a.keys() == post_b.keys() and "cov" in post_a
    for name in post_b:
        np.testing.assert_allclose(post_a[name], post_b[name], rtol=1e-12, err_msg=name)
    q_a, q_b = ours.get_posterior(moved), theirs.get_posterior(moved)
    np.testing.assert_allclose(q_a.scale_tril, q_b.scale_tril, rtol=1e-12)
    median_b = theirs._unpack_and_constrain(moved["auto_loc"], moved)  # numpyro's constrained loc
    median_a = ours.median(moved)
    assert median_a.keys() == median_b.keys()
    for name in median_b:
        np.testing.assert_allclose(median_a[name], median_b[name], rtol=1e-12, err_msg=name)


def test_full_rank_normal_refuses_a_subsampled_plate():
    def subsampled(y):
        with numpyro.plate("group", 10, subsample_size=4):
            numpyro.sample("offset", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="subsampled"):
        handlers.seed(FullRankNormal(subsampled).set_up, 0)(Y)
