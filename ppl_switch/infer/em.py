"""EM runner: find a model's closed-form EM, run it, and wrap its point estimate as a Fit.

The built-in models' EMs are functions of ``(model, data, **options)`` in this package (``LIBRARY_EM``:
HMM/ARHMM Baum-Welch, LDS Kalman EM, SLDS structured mean-field EM, rSLDS Laplace EM, CLDS exact MAP-EM).
A model of your own offers EM by defining a method ``em(data, **kw)`` (or ``fit_em``); it takes precedence over the library's.
Either takes a validated SequenceData and returns a params dict or ``(params, history)``; ``history`` is an
array of per-iteration log-likelihoods (stored as ``losses = -history`` and
``diagnostics["log_likelihoods"]``) or a dict of diagnostics (its ``"log_likelihoods"`` entry is used the
same way). If it accepts a ``key`` argument it gets ``jax.random.PRNGKey(seed)``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Mapping

import jax
import numpy as np

from ppl_switch.infer.checks import data_scale_warnings, emit, moving_objective_warnings, nonfinite_entries, restart_warnings
from ppl_switch.errors import FitError
from ppl_switch.infer.fit import Fit, assemble_fit
from ppl_switch.infer.prepare import check_int, prepare_data, set_x64
from ppl_switch.infer.sharding import resolve_mesh, unsupported

_EM_METHODS = ("em", "fit_em")
#: further attempts with new starts (a new ``key``) when an EM run ends non-finite
EM_RETRIES = 2


#: the library's closed-form EM per built-in model class: class name -> (module, function of (model, data, **kw))
LIBRARY_EM = {
    "HMM": ("ppl_switch.infer.hmm_em", "chain_em"),
    "ARHMM": ("ppl_switch.infer.hmm_em", "chain_em"),
    "LDS": ("ppl_switch.infer.lds_em", "lds_em"),
    "SLDS": ("ppl_switch.infer.slds_em", "slds_em"),
    "RSLDS": ("ppl_switch.infer.rslds_em", "rslds_em"),
    "CLDS": ("ppl_switch.infer.clds_em", "clds_em"),
}


def library_function(table: Mapping[str, tuple[str, str]], model_class: type):
    """The function ``table`` names for ``model_class``'s nearest built-in base class (class name -> (module,
    function); only classes of ``ppl_switch.models`` count), imported on first use; None if there is none."""
    for cls in model_class.__mro__:
        entry = table.get(cls.__name__)
        if entry is not None and cls.__module__.startswith("ppl_switch.models."):
            return getattr(importlib.import_module(entry[0]), entry[1])
    return None


def library_em(model_class: type):
    """The library's EM function for ``model_class`` (its nearest built-in base class in ``LIBRARY_EM``: a
    subclass of HMM gets the HMM's, which refuses a changed emission), or None."""
    return library_function(LIBRARY_EM, model_class)


def _own_em(owner):
    """A model's (or model class's) own EM attribute: the method, None (``em = None``: no EM) or False (none)."""
    for name in _EM_METHODS:
        method = getattr(owner, name, False)
        if method is None or callable(method):
            return method
    return False


def has_em(model_class: type) -> bool:
    """Whether models of ``model_class`` have a closed-form EM (their own or the library's)."""
    own = _own_em(model_class)
    return own is not None and (own is not False or library_em(model_class) is not None)


def em_method(model):
    """The closed-form EM of ``model`` as a callable ``(data, **kw)``: the model's own ``em`` (or ``fit_em``)
    method if it defines one, else the library's (:func:`library_em`), else None. A model class that sets
    ``em = None`` says it has no EM (e.g. an HMM subclass whose emission the HMM's M-step does not fit)."""
    own = _own_em(model)
    if own is not False:
        return own
    function = library_em(type(model))
    return None if function is None else functools.partial(function, model)


def fit_em(model, data, *, mask=None, lengths=None, inputs=None, seed: int = 0, x64: bool = False, devices=None, **kw) -> Fit:
    """Fit by the model's closed-form EM (``model.em``); other keyword arguments go to it.

    ``devices``: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a
    ``jax.sharding.Mesh`` with a ``"trial"`` axis. The trials are padded with empty trials to a multiple
    of the device count and split over the devices; the EM's sums over trials run as cross-device
    reductions inside its compiled program (:mod:`ppl_switch.infer.sharding`). Supported by the
    HMM, ARHMM, LDS, SLDS and rSLDS EMs (same result as one device up to float rounding); an EM without a
    ``devices`` argument (the CLDS's, a user model's) raises a ValueError naming ``devices``.

    Returns a :class:`Fit` whose ``params`` is the point estimate and whose ``samples`` hold it as one
    draw of one chain ``(1, 1, ...)``. ``fit.warnings`` (also emitted as FitWarning) reports data far
    from the priors' scale, an objective still moving over its last 10% of iterations (unless the model
    says it stopped by its tolerance), restarts that ended in different optima (the spread of their final
    objectives), and an objective that became non-finite part way (the model kept the last finite
    parameters).

    Raises:
        NotImplementedError: the model has no EM; the message names the model and the runners it supports.
        FitError: the estimate is non-finite (or the model's EM raised FloatingPointError) on the first
            try and on ``EM_RETRIES`` more tries with new starts (a new ``key``; only for an EM that takes
            one); the message names the sites.
    """
    em = em_method(model)
    if em is None:
        raise NotImplementedError(
            f"model {getattr(model, 'name', type(model).__name__)!r} ({type(model).__name__}) has no closed-form "
            "EM (neither the library's nor an `em` method of its own); it supports fit_svi and fit_nuts"
        )
    seed = check_int(seed, "seed", minimum=0)
    if devices is not None:
        if "devices" not in inspect.signature(em).parameters:  # the HMM/ARHMM and LDS EMs take it
            raise unsupported(f"the EM of {type(model).__name__}", "trials")
        mesh = resolve_mesh(devices)  # checked before anything compiles
        kw = {**kw, "devices": mesh}
    set_x64(x64)
    data = prepare_data(model, data, mask=mask, lengths=lengths, inputs=inputs)
    found = data_scale_warnings(model, data)
    emit(found)
    key_em, key_post = jax.random.split(jax.random.PRNGKey(seed))
    takes_key = "key" in inspect.signature(em).parameters
    attempts = 1 + (EM_RETRIES if takes_key and kw.get("params") is None else 0)
    failures, bad = [], []
    for attempt in range(attempts):
        call_kw = {**kw, "key": jax.random.fold_in(key_em, attempt) if attempt else key_em} if takes_key else kw
        try:
            result = em(data, **call_kw)
        except FloatingPointError as err:
            failures.append(f"try {attempt + 1}: {err}")
            continue
        params, history = (result[0], result[1]) if isinstance(result, tuple) and len(result) >= 2 else (result, None)
        if not isinstance(params, Mapping):
            raise TypeError(f"{type(model).__name__}.em: expected a params dict or (params, history), got {type(result).__name__}")
        params = {name: np.asarray(value) for name, value in params.items()}
        bad = nonfinite_entries(params)
        if not bad:
            break
        failures.append(f"try {attempt + 1}: non-finite estimate at site(s) {bad}")
    else:
        raise FitError(
            f"EM ({type(model).__name__}.em): no finite estimate after {attempts} tr{'y' if attempts == 1 else 'ies'} "
            f"({'; '.join(failures)}). Check the data's scale (standardise y), try x64=True, or fit_svi.",
            sites={"value": [f"site {name!r}" for name in bad]},
        )
    notes = [f"EM: {f}; retried with new starts (key folded with the try number)" for f in failures]

    diagnostics: dict[str, Any] = {}
    losses = None
    converged = None
    if isinstance(history, Mapping):
        diagnostics.update(history)
        converged = history.get("converged")
        restarts = history.get("restart_objectives")
        history = history.get("log_likelihoods")
        if restarts is not None:
            notes += restart_warnings(restarts)
    if history is not None:
        history = np.asarray(history, dtype=float)
        notes += _history_warnings(history, converged)
        diagnostics["log_likelihoods"] = history
        losses = -history
    samples = {name: value[None, None] for name, value in params.items()}
    config = {"seed": seed, "x64": bool(jax.config.jax_enable_x64), **{k: v for k, v in kw.items() if k not in ("key", "devices")}}
    if devices is not None:
        config["num_devices"] = int(kw["devices"].devices.size)
    fit = assemble_fit(
        model, data, "em", samples, key=key_post, params=params, losses=losses, diagnostics=diagnostics, config=config, relabel=False
    )
    fit.estimate = dict(params)
    fit.warnings = found + fit.warnings + notes  # in the order they were emitted
    emit(notes)
    return fit


def _history_warnings(history: np.ndarray, converged) -> list[str]:
    """An objective that turned non-finite part way, or one still moving at the end."""
    finite = np.isfinite(history)
    if not finite.any():
        raise FitError("EM objective: non-finite at every iteration although the estimate is finite; "
                       "check the model's EM objective (stage 'em objective')")
    last = int(np.flatnonzero(finite)[-1])
    out = []
    if not finite[: last + 1].all():
        first = int(np.flatnonzero(~finite[: last + 1])[0])
        raise FitError(f"EM objective: non-finite at iteration {first} and finite again later (stage 'em objective'); "
                       "the EM went numerically wrong part way; try x64=True or standardised data")
    if last < len(history) - 1:
        out.append(f"EM objective became non-finite at iteration {last + 1} of {len(history)}; the model kept the "
                   "last finite parameters: check them (x64=True or standardised data may avoid it)")
    if converged is not True:
        out += moving_objective_warnings(history[: last + 1], what="EM objective", advice="run more iterations (num_iters)")
    return out
