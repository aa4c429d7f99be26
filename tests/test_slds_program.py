"""The SLDS and rSLDS programs sample their sites in the order their docstrings list them (the module
docstrings, :meth:`SLDS.sample_dynamics_and_emission_params`), so that a reader can match the listing to a trace."""

from __future__ import annotations

import re

import numpy as np
from numpyro import handlers

import ppl_switch.models.rslds as rslds_module
import ppl_switch.models.slds as slds_module
from ppl_switch.models.rslds import RSLDS
from ppl_switch.models.slds import SLDS


def _latent_sample_sites(model):
    """The program's unobserved sample sites in trace order, on small data with every optional site present."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 6, model.obs_dim))
    data = model.prepare(y, inputs=rng.normal(size=(2, 6, model.input_dim)))
    trace = handlers.trace(handlers.seed(model.program, 0)).get_trace(data)
    return [name for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]]


def _listed_sites(doc, known):
    """The site names of the first ``::`` table of a docstring, one per line (the first known name), in order."""
    table = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    names = []
    for line in table.splitlines():
        hits = [w for w in re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", line) if w in known]
        if hits:
            names.append(hits[0])
    return names


def test_slds_program_samples_the_listed_sites_in_order():
    model = SLDS(2, 2, obs_dim=3, input_dim=1, emission_cov="full")
    known = set(model.site_dims())
    block = _listed_sites(SLDS.sample_dynamics_and_emission_params.__doc__, known)
    assert len(block) == 11
    assert _latent_sample_sites(model) == ["initial_probs", "transition_matrix"] + block + ["x"]
    assert _listed_sites(slds_module.__doc__, known) == ["initial_probs", "transition_matrix"] + block


def test_rslds_program_samples_the_listed_sites_in_order():
    model = RSLDS(2, 2, obs_dim=3, input_dim=1, emission_cov="full", transitions="recurrent")
    known = set(model.site_dims())
    block = _listed_sites(SLDS.sample_dynamics_and_emission_params.__doc__, known)
    transitions = _listed_sites(rslds_module.__doc__, known)
    assert transitions == ["transition_weights", "transition_bias", "transition_state_logits", "transition_input_weights"]
    assert _latent_sample_sites(model) == ["initial_probs"] + block + transitions + ["x"]
