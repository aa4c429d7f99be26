"""Shared runner plumbing: argument checks, data preparation, float64, model site discovery.

Everything here runs on the host before anything is compiled, so bad input fails fast with a message
that names the argument.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, trace

from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.compile_cache import CompiledCache, model_key, shapes_key


def set_x64(x64: bool) -> None:
    """``x64=True`` turns on float64 (``jax_enable_x64``) for the whole process, not just this fit.

    ``x64=False`` leaves the current setting alone (it does not switch float64 off if something else
    turned it on), so runners never silently change the precision of other code.
    """
    if not isinstance(x64, (bool, int)):
        raise ValueError(f"x64: expected True or False, got {x64!r}")
    if x64:
        jax.config.update("jax_enable_x64", True)


def prepare_data(model, data, *, mask=None, lengths=None, inputs=None) -> SequenceData:
    """Validate ``data`` (SequenceData or raw ``y``) with ``model.prepare`` on the host."""
    if isinstance(data, SequenceData):
        if mask is not None or lengths is not None:
            raise DataError("mask/lengths: pass them inside the SequenceData, not beside it")
        # Re-validate against the model (obs_dim, input_dim, count/binary support).
        return model.prepare(data.y, mask=data.mask, lengths=data.lengths, inputs=data.inputs if inputs is None else inputs)
    return model.prepare(data, mask=mask, lengths=lengths, inputs=inputs)


def device_data(data: SequenceData) -> SequenceData:
    """The same data as JAX arrays in the current default float precision."""
    float_dtype = jnp.result_type(float)
    return SequenceData(
        y=jnp.asarray(data.y, dtype=float_dtype),
        mask=jnp.asarray(data.mask, dtype=bool),
        lengths=jnp.asarray(data.lengths, dtype=jnp.int32),
        inputs=None if data.inputs is None else jnp.asarray(data.inputs, dtype=float_dtype),
    )


def check_int(value, name: str, minimum: int = 1) -> int:
    return check_positive_int(value, name, minimum)


def check_float(value, name: str, low: float, high: float = float("inf"), *, open_low=True, open_high=True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above or value != value:
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise ValueError(f"{name}: expected a value in {lo}{low}, {high}{hi}, got {value}")
    return value


def model_sites(program, data: SequenceData, **kwargs) -> dict[str, dict[str, Any]]:
    """``{name: {"type": "sample"/"deterministic"/..., "observed": bool}}`` of a program, found by
    abstract tracing (``jax.eval_shape``: nothing is computed or compiled)."""
    sites: dict[str, dict[str, Any]] = {}

    def run(d):
        tr = trace(seed(program, jax.random.PRNGKey(0))).get_trace(d, **kwargs)
        for name, site in tr.items():
            sites[name] = {"type": site["type"], "observed": bool(site.get("is_observed", False))}
        return 0

    jax.eval_shape(run, data)
    return sites


#: posterior site names by (model class and config, data structure, shapes and dtypes)
_SITE_NAMES = CompiledCache("posterior site names", max_size=256)


def posterior_site_names(model, data: SequenceData) -> list[str]:
    """Sites written to the posterior: the program's latent sample sites, plus its deterministic sites
    that ``model.site_dims()`` lists (other deterministic sites are intermediate quantities).

    Found by an abstract trace of the program, once per model config and data shapes (cached)."""
    mkey = model_key(model)
    key = None if mkey is None else (mkey,) + shapes_key(data)
    if key is not None and key in _SITE_NAMES:
        return list(_SITE_NAMES.get(key))
    try:
        listed = set(model.site_dims())
    except NotImplementedError:
        listed = set()
    names = []
    for name, info in model_sites(model.program, data).items():
        latent = info["type"] == "sample" and not info["observed"]
        if latent or (info["type"] == "deterministic" and name in listed):
            names.append(name)
    if key is not None:
        _SITE_NAMES.put(key, tuple(names))
    return names


def implements(model, method: str) -> bool:
    """Whether ``model`` overrides the base-class ``method`` (so calling it will not just raise)."""
    from ppl_switch.models.base import Model

    own = getattr(type(model), method, None)
    return own is not None and own is not getattr(Model, method, None)
