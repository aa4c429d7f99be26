"""The shared init strategies really reach the guides' initial locations.

numpyro calls a strategy once without a site and keeps what that returns; a closure that falls back to
``init_to_median()`` there is silently replaced by the plain median (the bug these tests pin down).
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from ppl_switch.guides.init import init_to_sample_then_median, init_to_values_then_median
import pytest

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def model():
    numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("scale", dist.HalfNormal(1.0).expand([2]).to_event(1))
    numpyro.sample("c", dist.Normal(0.0, 1.0).expand([400]).to_event(1))
    numpyro.sample("other", dist.Normal(0.0, 1.0).expand([400]).to_event(1))


def initial_locs(strategy):
    guide = AutoNormal(model, init_loc_fn=strategy)
    state = SVI(model, guide, optax.adam(0.01), Trace_ELBO()).init(jax.random.PRNGKey(0))
    return {k.removesuffix("_auto_loc"): np.asarray(v) for k, v in state.optim_state[1][0].items() if k.endswith("_auto_loc")}


def test_given_values_are_the_initial_locations_in_unconstrained_space():
    locs = initial_locs(init_to_values_then_median({"a": np.array([1.7, -0.3, 2.5]), "scale": np.array([0.05, 3.0])}))
    np.testing.assert_allclose(locs["a"], [1.7, -0.3, 2.5], rtol=1e-6)
    np.testing.assert_allclose(np.exp(locs["scale"]), [0.05, 3.0], rtol=1e-6)
    # the other sites start at a prior median estimate: close to 0 for N(0, 1)
    assert np.abs(locs["c"]).mean() < 0.5


def test_named_sites_start_at_a_prior_draw_the_rest_at_the_median():
    locs = initial_locs(init_to_sample_then_median(["c"]))
    # a draw of N(0, 1) has spread ~1; a median of 15 draws has spread ~0.32
    assert np.std(locs["c"]) > 0.7
    assert np.std(locs["other"]) < 0.5
