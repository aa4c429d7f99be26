"""Small helpers shared by the model modules: constructor checks and relabelling by named dims."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np

from ppl_switch.data import DataError, check_positive_int

#: dims that index discrete states; a permutation acts on every axis carrying one of them
STATE_DIMS = ("state", "state_to")


def check_optional_dim(value, name: str) -> Optional[int]:
    """None, or an integer >= 1 (named in the error)."""
    return None if value is None else check_positive_int(value, name)


def check_nonneg_int(value, name: str) -> int:
    return check_positive_int(value, name, minimum=0)


def check_nonneg_float(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected a non-negative number, got {value!r}") from None
    if not np.isfinite(out) or out < 0:
        raise DataError(f"{name}: expected a finite non-negative number, got {value!r}")
    return out


def permute_by_dims(params: Mapping[str, Any], perm, site_dims: Mapping[str, tuple]) -> dict:
    """Relabel states: along every axis named "state"/"state_to" take ``perm`` (new k = old perm[k]).

    Axes are located from the right, so params may carry leading batch axes (chain, draw). Params not
    listed in ``site_dims`` are returned unchanged.
    """
    perm = np.asarray(perm)
    out = dict(params)
    for name, value in params.items():
        dims = site_dims.get(name)
        if dims is None:
            continue
        for i, dim in enumerate(dims):
            if dim in STATE_DIMS:
                axis = i - len(dims)
                out[name] = jax.numpy.take(out[name], perm, axis=axis) if isinstance(out[name], jax.Array) else np.take(out[name], perm, axis=axis)
    return out


def require_obs_dim(model) -> int:
    """The model's obs_dim, needed to simulate; an error naming ``obs_dim`` if it was left as None."""
    if model.obs_dim is None:
        raise ValueError(f"obs_dim: {type(model).__name__} was built with obs_dim=None; pass obs_dim to simulate")
    return model.obs_dim
