"""EM runner: dispatch to a model's own closed-form EM and wrap its point estimate as a Fit.

A model that offers EM defines ``em(data, **kw)`` (or ``fit_em(data, **kw)``) taking a validated
SequenceData and returning either a params dict or ``(params, history)``; ``history`` is an array of
per-iteration log-likelihoods (stored as ``losses = -history`` and ``diagnostics["log_likelihoods"]``)
or a dict of diagnostics (its ``"log_likelihoods"`` entry is used the same way). If the method accepts a
``key`` argument it gets ``jax.random.PRNGKey(seed)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import numpy as np

from ppl_switch.infer.fit import Fit, assemble_fit
from ppl_switch.infer.prepare import check_int, prepare_data, set_x64

_EM_METHODS = ("em", "fit_em")


def _em_method(model):
    for name in _EM_METHODS:
        method = getattr(model, name, None)
        if callable(method):
            return method
    return None


def fit_em(model, data, *, mask=None, lengths=None, inputs=None, seed: int = 0, x64: bool = False, **kw) -> Fit:
    """Fit by the model's closed-form EM (``model.em``); other keyword arguments go to it.

    Returns a :class:`Fit` whose ``params`` is the point estimate and whose ``samples`` hold it as one
    draw of one chain ``(1, 1, ...)``.

    Raises:
        NotImplementedError: the model has no EM; the message names the model and the runners it supports.
    """
    em = _em_method(model)
    if em is None:
        raise NotImplementedError(
            f"model {getattr(model, 'name', type(model).__name__)!r} ({type(model).__name__}) has no closed-form "
            "EM (no `em` method); it supports fit_svi and fit_nuts"
        )
    seed = check_int(seed, "seed", minimum=0)
    set_x64(x64)
    data = prepare_data(model, data, mask=mask, lengths=lengths, inputs=inputs)
    key_em, key_post = jax.random.split(jax.random.PRNGKey(seed))
    if "key" in inspect.signature(em).parameters:
        kw = {**kw, "key": key_em}
    result = em(data, **kw)
    params, history = result if isinstance(result, tuple) else (result, None)
    if not isinstance(params, Mapping):
        raise TypeError(f"{type(model).__name__}.em: expected a params dict or (params, history), got {type(result).__name__}")
    params = {name: np.asarray(value) for name, value in params.items()}

    diagnostics: dict[str, Any] = {}
    losses = None
    if isinstance(history, Mapping):
        diagnostics.update(history)
        history = history.get("log_likelihoods")
    if history is not None:
        history = np.asarray(history, dtype=float)
        diagnostics["log_likelihoods"] = history
        losses = -history
    samples = {name: value[None, None] for name, value in params.items()}
    config = {"seed": seed, "x64": bool(jax.config.jax_enable_x64), **{k: v for k, v in kw.items() if k != "key"}}
    return assemble_fit(
        model, data, "em", samples, key=key_post, params=params, losses=losses, diagnostics=diagnostics, config=config, relabel=False
    )
