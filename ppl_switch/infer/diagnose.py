"""Find the sites behind a non-finite SVI loss.

The model and guide are traced at given guide parameters with the same random key the failing SVI step
used (so the same latent draw is replayed); then every site is checked for a non-finite value, a
non-finite log-density, and a non-finite gradient of its log-density with respect to the (unconstrained)
guide parameters. Guide parameters that are themselves non-finite are listed too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace


def _finite(x) -> bool:
    return bool(jnp.all(jnp.isfinite(jnp.asarray(x)))) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) else True


def _traces(model, guide, params, key, args):
    model_key, guide_key = jax.random.split(key)
    guide_tr = trace(substitute(seed(guide, guide_key), data=params)).get_trace(*args)
    model_tr = trace(substitute(replay(seed(model, model_key), guide_tr), data=params)).get_trace(*args)
    return model_tr, guide_tr


def _site_log_densities(model_tr, guide_tr) -> dict[str, jax.Array]:
    out = {}
    for where, tr in (("model", model_tr), ("guide", guide_tr)):
        for name, site in tr.items():
            if site["type"] == "sample":
                lp = scale_and_mask(site["fn"].log_prob(site["value"]), scale=site["scale"])
                out[f"{where} site {name!r}"] = jnp.sum(lp)
    return out


def nonfinite_sites(
    model: Callable,
    guide: Callable,
    unconstrained_params: dict[str, Any],
    constrain_fn: Callable,
    keys: Sequence[jax.Array],
    args: tuple,
) -> dict[str, list[str]]:
    """Names of sites with non-finite values, log-densities or gradients, and non-finite guide params.

    Tries each key in ``keys`` (the failing step's particle keys first) until something non-finite is
    found. Returns ``{"params": [...], "value": [...], "log_density": [...], "gradient": [...]}``.
    """
    found = {"params": [], "value": [], "log_density": [], "gradient": []}
    found["params"] = sorted(name for name, value in unconstrained_params.items() if not _finite(value))
    params = constrain_fn(unconstrained_params)
    for key in keys:
        model_tr, guide_tr = _traces(model, guide, params, key, args)
        for where, tr in (("model", model_tr), ("guide", guide_tr)):
            for name, site in tr.items():
                if site["type"] in ("sample", "deterministic") and not _finite(site["value"]):
                    label = f"{where} {site['type']} site {name!r}"
                    if label not in found["value"]:
                        found["value"].append(label)
        densities = _site_log_densities(model_tr, guide_tr)
        found["log_density"] = [label for label, lp in densities.items() if not _finite(lp)]

        def densities_of(u):
            return _site_log_densities(*_traces(model, guide, constrain_fn(u), key, args))

        grads = jax.jacrev(densities_of)(unconstrained_params)
        found["gradient"] = [
            label
            for label, g in grads.items()
            if label not in found["log_density"] and not all(_finite(v) for v in jax.tree.leaves(g))
        ]
        if any(found.values()):
            break
    return found


def describe(found: dict[str, list[str]]) -> str:
    parts = []
    if found.get("log_density"):
        parts.append("non-finite log-density at " + ", ".join(found["log_density"]))
    if found.get("value"):
        parts.append("non-finite values at " + ", ".join(found["value"]))
    if found.get("gradient"):
        parts.append("non-finite gradient of the log-density at " + ", ".join(found["gradient"]))
    if found.get("params"):
        parts.append("non-finite guide parameters " + ", ".join(repr(p) for p in found["params"]))
    if not parts:
        return "no single site could be identified (the loss may overflow only in sum)"
    return "; ".join(parts)
