"""Fixed costs of a fit: a second fit of the same model config and data shapes traces and compiles
nothing new (compiled functions are cached by model class + config, guide, optimiser and shapes), and the
reuse changes no number. Float32, as users run."""

import contextlib

import jax
import jax.monitoring
import numpy as np
import pytest

from ppl_switch.infer import fit_em, fit_nuts, fit_svi
from ppl_switch import compile_cache
from ppl_switch.compile_cache import labelled_model_key, model_key
from ppl_switch.infer.draws import Static
from ppl_switch.models import HMM

_TRACE = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def count_traces():
    """Counts JAX traces (every jit cache miss traces before it compiles or reads the persistent cache)."""
    seen = []
    active = [True]

    def listener(event, duration, **_):
        if active[0] and event == _TRACE:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        active[0] = False
        jax.monitoring.unregister_event_duration_listener(listener)


def _data(num_trials=2, num_steps=25, seed=0):
    model = HMM(2, obs_dim=1)
    data, _ = model.simulate(jax.random.PRNGKey(seed), num_trials, num_steps)
    return np.asarray(data.y)


def _svi(model, y, seed=0):
    return fit_svi(model, y, num_steps=4, num_draws=5, seed=seed, progress_bar=False)


def _same_fit(a, b):
    assert a.samples.keys() == b.samples.keys()
    for name in a.samples:
        np.testing.assert_array_equal(a.samples[name], b.samples[name], err_msg=name)
    np.testing.assert_array_equal(a.losses, b.losses)
    for group in ("log_likelihood", "posterior_predictive", "posterior_states"):
        ga, gb = a.idata[group], b.idata[group]
        for name in ga.data_vars:
            np.testing.assert_array_equal(ga[name].values, gb[name].values, err_msg=f"{group}/{name}")


@pytest.fixture(scope="module")
def y():
    return _data()


@pytest.fixture(scope="module")
def first_svi(y):
    return _svi(HMM(2, obs_dim=1), y)


def test_second_svi_fit_traces_nothing(first_svi, y):
    with count_traces() as traces:
        second = _svi(HMM(2, obs_dim=1), y)  # a new instance of the same config
    assert len(traces) == 0, f"{len(traces)} new traces in a second fit of the same model and shapes"
    _same_fit(first_svi, second)


def test_other_seed_reuses_compiled_code_and_gives_its_own_numbers(first_svi, y):
    with count_traces() as traces:
        other = _svi(HMM(2, obs_dim=1), y, seed=1)
    assert len(traces) == 0
    assert not np.array_equal(other.losses, first_svi.losses)
    assert not np.array_equal(other.samples["transition_matrix"], first_svi.samples["transition_matrix"])


def test_other_config_compiles_anew(first_svi, y):
    with count_traces() as traces:
        sticky = _svi(HMM(2, obs_dim=1, sticky=5.0), y)
    assert len(traces) > 0  # a different program: nothing may be reused
    assert not np.array_equal(sticky.losses, first_svi.losses)


@pytest.mark.slow
def test_other_shape_compiles_anew(first_svi):
    longer = _data(num_steps=30)
    with count_traces() as traces:
        fit = _svi(HMM(2, obs_dim=1), longer)
    assert len(traces) > 0
    assert fit.idata["log_likelihood"]["y"].shape[-1] == 30


def test_cached_result_equals_a_cold_fit(first_svi, y, monkeypatch):
    """Nothing cached (every CompiledCache empty, and no key for the model's runner and draws): the same
    numbers (the caches only skip work)."""
    import importlib

    svi_module = importlib.import_module("ppl_switch.infer.svi")
    monkeypatch.setattr(svi_module, "model_key", lambda model: None)  # runner and draws: compiled afresh
    with compile_cache.cold():
        cold = _svi(HMM(2, obs_dim=1), y)
    _same_fit(first_svi, cold)


def test_cold_empties_every_cache_for_the_block_and_restores_them():
    cache = compile_cache.CompiledCache("test", max_size=2)
    cache["a"] = 1
    with compile_cache.cold():
        assert len(cache) == 0 and cache.get("a") is None
        assert cache.get_or_make("b", lambda: 2) == 2
    assert len(cache) == 1 and cache["a"] == 1 and "b" not in cache
    cache["b"], cache["c"] = 2, 3  # bounded: the oldest goes
    assert list(cache) == ["b", "c"] and cache.get_or_make(None, lambda: 4) == 4 and len(cache) == 2


@pytest.mark.filterwarnings("ignore::ppl_switch.errors.FitWarning")
def test_second_em_fit_traces_nothing(y):
    fit_em(HMM(2, obs_dim=1), y, seed=0, num_iters=5)
    with count_traces() as traces:
        fit_em(HMM(2, obs_dim=1), y, seed=0, num_iters=5)
    assert len(traces) == 0


def test_static_is_keyed_by_model_class_and_config():
    a, b = HMM(2, obs_dim=1), HMM(2, obs_dim=1)
    assert model_key(a) == model_key(b)
    assert Static(a.log_likelihood) == Static(b.log_likelihood)
    assert hash(Static(a.log_likelihood)) == hash(Static(b.log_likelihood))
    assert Static(a.log_likelihood) != Static(a.posterior_predictive)
    assert Static(a.log_likelihood) != Static(HMM(3, obs_dim=1).log_likelihood)
    assert Static(a) != Static(HMM(2, obs_dim=1, initial=np.array([0.3, 0.7])))
    assert model_key(HMM(2, obs_dim=1, initial=np.array([0.3, 0.7]))) != model_key(HMM(2, obs_dim=1, initial=np.array([0.7, 0.3])))

    def f(x):
        return x

    assert Static(f) == Static(f) and Static(f) != Static(lambda x: x)  # plain callables: identity


def test_a_model_without_a_key_gets_no_labelled_key():
    """A guide's set-up key is (label, model key), and None for a model without a usable config: two such
    models must not share a compiled set-up through a (label, None) key."""

    class NoConfig(HMM):
        def config(self):
            raise NotImplementedError

    assert labelled_model_key("init_to_sample", HMM(2, obs_dim=1)) == ("init_to_sample", model_key(HMM(2, obs_dim=1)))
    assert model_key(NoConfig(2, obs_dim=1)) is None
    assert labelled_model_key("init_to_sample", NoConfig(2, obs_dim=1)) is None
    assert NoConfig(2, obs_dim=1).default_guide().cache_key is None


def _nuts(y, seed=0):
    return fit_nuts(HMM(2, obs_dim=1), y, num_warmup=10, num_samples=5, seed=seed, progress_bar=False)


def test_nuts_on_other_data_of_the_same_shapes_traces_nothing_and_samples_that_data(y):
    """The data are arguments of the compiled NUTS run, not constants baked into it: a fit of another dataset of
    the same shapes (another subject, session or seed) traces nothing, and its draws are those of a fit compiled
    afresh for that dataset."""
    first = _nuts(y)
    other_y = _data(seed=3)
    with count_traces() as traces:
        other = _nuts(other_y)
    assert len(traces) == 0, f"{len(traces)} new traces in a NUTS fit of other data of the same shapes"
    with compile_cache.cold():
        cold = _nuts(other_y)
    for name in other.samples:
        np.testing.assert_array_equal(other.samples[name], cold.samples[name], err_msg=name)
        assert not np.array_equal(other.samples[name], first.samples[name]), name
