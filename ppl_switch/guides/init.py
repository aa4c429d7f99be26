"""Initialisation strategies shared by the default guides."""

from __future__ import annotations

import jax.numpy as jnp
from numpyro.infer.initialization import init_to_median


def init_to_values_then_median(values: dict):
    """numpyro init strategy: ``values[name]`` for the latent sites named there, else the prior median."""
    median = init_to_median(num_samples=15)

    def init(site=None):
        if site is not None and site["type"] == "sample" and not site["is_observed"] and site["name"] in values:
            return jnp.asarray(values[site["name"]])
        return median(site)

    return init
