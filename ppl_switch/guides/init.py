"""Initialisation strategies shared by the default guides.

A numpyro init strategy is called once without a site (``strategy()``) and must then return a
``functools.partial`` that numpyro calls per site; a plain closure would be replaced by whatever it
returns for ``site=None``. Both strategies here therefore return partials of module-level functions.
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.initialization import init_to_median, init_to_sample


def _values_then_median(site=None, *, values: dict, num_samples: int = 15):
    if site is None:
        return partial(_values_then_median, values=values, num_samples=num_samples)
    if site["type"] == "sample" and not site["is_observed"] and site["name"] in values:
        return jnp.asarray(values[site["name"]])
    return init_to_median(site, num_samples=num_samples)


def init_to_values_then_median(values: dict, num_samples: int = 15):
    """numpyro init strategy: ``values[name]`` (constrained space) for the latent sites named there, else
    the prior median (of ``num_samples`` prior draws)."""
    return partial(_values_then_median, values=dict(values), num_samples=num_samples)


def _sample_named_then_median(site=None, *, names: tuple):
    if site is None:
        return partial(_sample_named_then_median, names=names)
    if site["type"] == "sample" and not site["is_observed"] and site["name"] in names:
        return init_to_sample(site)
    return init_to_median(site)


def init_to_sample_then_median(names) -> partial:
    """numpyro init strategy: a prior draw for the latent sites in ``names`` (to break a symmetry, e.g. an
    emission matrix whose prior median is 0), else the prior median."""
    return partial(_sample_named_then_median, names=tuple(names))


def parameter_program(program, hidden, init_values=None):
    """``program`` as a guide's parameter block sees it when it sets itself up: the sites in ``hidden``
    (the path, drawn by the guide's own code) blocked, and fixed at their start value in ``init_values``
    where one of the right shape is given.

    The set-up evaluates the program once at the start values and rejects them if the density or its
    gradient is not finite. A hidden path would otherwise be a prior draw given the start parameters,
    and a long prior path under a data-driven start drift can overflow (numpyro's "Cannot find valid
    initial parameters"); the start path is the realistic one to check them against.
    """
    paths = {k: np.asarray(v) for k, v in (init_values or {}).items() if k in hidden}

    def start_path(site):
        if site["type"] != "sample":  # a hidden name may also be a deterministic site (x of a whitened path)
            return None
        value = paths.get(site["name"])
        if value is not None and value.shape == tuple(site["fn"].shape(site["kwargs"].get("sample_shape", ()))):
            return value
        return None

    if paths:
        program = handlers.substitute(program, substitute_fn=start_path)
    return handlers.block(program, hide=list(hidden))
