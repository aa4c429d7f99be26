"""``fit(model, y)``: run the method each model recommends, with its measured best settings.

A model declares its recommended runner as a class attribute (``Model.recommended_runner``, default
``("svi", {})``)::

    recommended_runner = (runner_name, options)

``options`` go to the runner; two reserved keys make the choice depend on the model's configuration:
``"requires": {attribute: allowed values}`` and ``"otherwise": (runner_name, options)``, the runner used
when an attribute is not among its allowed values (e.g. EM needs Gaussian emissions).

Runners (``RUNNERS``): ``"svi"`` (:func:`~ppl_switch.infer.svi.fit_svi`, with ``model.default_guide(data)``
where the model's guide takes the data, started by the library's start where it has one:
:func:`~ppl_switch.infer.starts.data_driven_guide`), ``"nuts"``, ``"em"``, ``"gdm_svi"`` (the GDM's GS-BBVI trainer
:func:`~ppl_switch.infer.gdm_svi.fit_gdm_svi`, which returns a :class:`Fit` itself) and
``"svi_path_refinement"`` (:func:`~ppl_switch.infer.path_refinement.fit_svi_with_path_refinement`).

What each model recommends, and why (the model cards hold the measurements):

=========  ===================================================  ===============================================
model      runner (options)                                     why
=========  ===================================================  ===============================================
hmm,       ``em`` (restarts in one vmapped program: 8 for        closed-form Baum-Welch / Kalman EM, best of
arhmm,     hmm/arhmm, 4 for lds)                                several starts: at or above hmmlearn's and
lds                                                             statsmodels' maxima on their real series, warm
                                                                fits 0.00-0.25x their time (benchmarks/baselines.py)
slds       ``em`` (4 restarts, 100 iterations); Poisson:        structured mean-field EM is the card's fast,
           ``svi`` with the Gauss-Markov path guide             monotone path; the restarts (k-means on local
                                                                dynamics + a random sticky path) choose the mode
rslds      ``em`` (3 restarts, 100 iterations); Poisson:        Laplace EM reaches 0.99 state accuracy on NASCAR
           ``svi``                                              (card); SVI/NUTS are far slower at T = 1e3-1e4
gdm        ``gdm_svi`` (start "auto", projection "auto")        GS-BBVI from the hard-state EM segmentation and a
                                                                PCA projection: 0.991 +- 0.003 state accuracy
                                                                on 30 NASCAR seeds vs 0.859 from the released
                                                                random start (card)
gpslds     ``svi_path_refinement`` (2 rounds, start scale 2)    the card's "where it stands" fit: NMSE
                                                                0.005-0.033 on 14 seeds; plain SVI leaves the
                                                                path 33,000 nats below its MAP
clds       ``em`` (200 iterations); Poisson: ``svi``            exact MAP-EM (Kalman E-step) in seconds, monotone;
           (path guide, 1000 steps at 0.01)                     Poisson has no EM: the card's path-guide SVI
=========  ===================================================  ===============================================

``fit.config`` records ``runner`` (what ran), ``runner_options`` (with the overrides),
``recommended`` (the declared runner) and, where ``otherwise`` was taken, ``fallback_reason``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ppl_switch.data import DataError
from ppl_switch.infer.checks import emit
from ppl_switch.infer.em import em_method, fit_em
from ppl_switch.infer.starts import data_driven_guide
from ppl_switch.infer.fit import Fit
from ppl_switch.infer.nuts import fit_nuts
from ppl_switch.infer.prepare import check_int, prepare_data, set_x64
from ppl_switch.infer.sharding import unsupported
from ppl_switch.infer.svi import fit_svi

_RESERVED = ("requires", "otherwise")


def _run_svi(model, data, *, seed, x64, progress_bar, **options) -> Fit:
    if "guide" not in options and "data" in inspect.signature(model.default_guide).parameters:
        options["guide"] = data_driven_guide(model, data)  # a data-driven start (PCA paths, the CLDS's EM etc.)
    return fit_svi(model, data, seed=seed, x64=x64, progress_bar=progress_bar, **options)


def _run_nuts(model, data, *, seed, x64, progress_bar, **options) -> Fit:
    return fit_nuts(model, data, seed=seed, x64=x64, progress_bar=progress_bar, **options)


def _run_em(model, data, *, seed, x64, progress_bar, **options) -> Fit:
    return fit_em(model, data, seed=seed, x64=x64, **options)


def _run_gdm_svi(model, data, *, seed, x64, progress_bar, **options) -> Fit:
    """The GDM's GS-BBVI trainer, :func:`~ppl_switch.infer.gdm_svi.fit_gdm_svi` (it checks its own result)."""
    from ppl_switch.infer.gdm_svi import fit_gdm_svi

    return fit_gdm_svi(model, data, seed=seed, x64=x64, **options)


def _run_svi_path_refinement(model, data, *, seed, x64, progress_bar, **options) -> Fit:
    from ppl_switch.infer.path_refinement import fit_svi_with_path_refinement

    set_x64(x64)
    fit, _guide, history = fit_svi_with_path_refinement(model, data, seed=seed, progress_bar=progress_bar, **options)
    fit.diagnostics["stages"] = history
    return fit


#: runner name -> function(model, data, *, seed, x64, progress_bar, **options) -> Fit
RUNNERS: dict[str, Callable[..., Fit]] = {
    "svi": _run_svi,
    "nuts": _run_nuts,
    "em": _run_em,
    "gdm_svi": _run_gdm_svi,
    "svi_path_refinement": _run_svi_path_refinement,
}


def _target(name: str, model) -> Callable:
    """The function whose keyword arguments a runner's options are checked against."""
    if name == "em":
        return em_method(model) or fit_em
    if name == "gdm_svi":
        from ppl_switch.infer.gdm_svi import fit_gdm_svi

        return fit_gdm_svi
    if name == "svi_path_refinement":
        from ppl_switch.infer.path_refinement import fit_svi_with_path_refinement

        return fit_svi_with_path_refinement
    return {"svi": fit_svi, "nuts": fit_nuts}[name]


def _check_spec(spec, where: str) -> tuple[str, dict]:
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping)):
        raise ValueError(f"{where}: expected (runner_name, options dict), got {spec!r}")
    if spec[0] not in RUNNERS:
        raise ValueError(f"{where}: unknown runner {spec[0]!r}; valid runners are {sorted(RUNNERS)}")
    return spec[0], dict(spec[1])


def resolve_runner(model) -> tuple[str, dict, dict]:
    """``(runner name, options, notes)`` that :func:`fit` runs for ``model``: its ``recommended_runner``
    with ``requires`` checked (``otherwise`` taken where an attribute is not allowed). ``notes`` holds
    ``recommended`` and, after a fallback, ``fallback_reason``."""
    cls = type(model).__name__
    name, options = _check_spec(getattr(model, "recommended_runner", ("svi", {})), f"{cls}.recommended_runner")
    notes: dict[str, Any] = {"recommended": name}
    requires = options.pop("requires", None) or {}
    otherwise = options.pop("otherwise", None)
    unmet = [f"{attr}={getattr(model, attr, None)!r} ({name!r} needs one of {list(allowed)})"
             for attr, allowed in requires.items() if getattr(model, attr, None) not in tuple(allowed)]
    if unmet:
        if otherwise is None:
            raise ValueError(f"{cls}.recommended_runner: {'; '.join(unmet)} and no 'otherwise' runner is declared")
        notes["fallback_reason"] = "; ".join(unmet)
        name, options = _check_spec(otherwise, f"{cls}.recommended_runner['otherwise']")
        for key in _RESERVED:
            options.pop(key, None)
    return name, options, notes


def _check_options(name: str, model, options: Mapping[str, Any]) -> None:
    target = _target(name, model)
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the target passes options on (e.g. a model's own em(data, **kw)), which checks them
    own = {"num_draws"} if name == "gdm_svi" else set()
    reserved = {"model", "data", "y", "self", "seed", "x64", "progress_bar", "progress", "key"}
    valid = sorted((set(params) | own) - reserved)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of the {name!r} runner for {type(model).__name__}; "
                         f"valid options are {valid}")


def fit(model, y, *, mask=None, lengths=None, inputs=None, seed: int = 0, x64: bool = False, progress_bar: bool = True,
        devices=None, **overrides) -> Fit:
    """Fit ``model`` to ``y`` with the method the model recommends (module table), e.g.

    >>> fit = ppl_switch.fit(HMM(num_states=3, obs_dim=2), y)      # doctest: +SKIP
    >>> fit.warnings, fit.point_estimate(), fit.idata               # doctest: +SKIP

    Args:
        model: a :class:`ppl_switch.models.base.Model` (its class attribute ``recommended_runner``).
        y, mask, lengths, inputs: the data, validated by ``model.prepare`` before anything compiles.
        seed: same seed, same numbers. x64: float64 for the process (default float32).
        progress_bar: show the runner's progress bar where it has one.
        devices: None, a number of devices, a list of ``jax.Device`` or a Mesh with a ``"trial"`` axis,
            passed to the runner: ``em`` (HMM, ARHMM, LDS, SLDS, rSLDS) and ``svi`` split the trials over the devices,
            ``nuts`` runs one chain per device (see :func:`fit_em`, :func:`fit_svi`, :func:`fit_nuts`);
            the other runners and EMs raise a ValueError naming ``devices``.
        **overrides: options for the runner that runs (replace the model's recommended ones), e.g.
            ``num_restarts=8`` for EM or ``num_steps=5000`` for SVI. An option the runner does not take
            is an error naming it and the valid ones.

    Returns:
        A :class:`Fit` (always with ``idata``); ``fit.config`` adds ``runner``, ``runner_options``,
        ``recommended`` and, after a fallback, ``fallback_reason``; ``fit.warnings`` lists what the
        runner's checks found.
    """
    seed = check_int(seed, "seed", minimum=0)
    if not isinstance(progress_bar, (bool, int)):
        raise ValueError(f"progress_bar: expected True or False, got {progress_bar!r}")
    name, options, notes = resolve_runner(model)
    options.update(overrides)
    _check_options(name, model, options)
    data = prepare_data(model, y, mask=mask, lengths=lengths, inputs=inputs)
    placement = {}
    if devices is not None:
        if name not in ("em", "svi", "nuts"):
            raise unsupported(f"the {name!r} runner", "trials")
        placement = {"devices": devices}
    try:
        result = RUNNERS[name](model, data, seed=seed, x64=x64, progress_bar=bool(progress_bar), **options, **placement)
    except DataError as err:
        # the data passed model.prepare, so this is a closed-form EM refusing what its updates do not cover
        # (e.g. the ARHMM's partly observed steps: a missing entry is also a regressor), before compiling: fit it by SVI
        if name != "em" or overrides:
            raise
        reason = f"EM does not cover this data ({err}); fitted with SVI on the same model instead"
        emit([reason])
        result = _run_svi(model, data, seed=seed, x64=x64, progress_bar=bool(progress_bar), **placement)
        result.warnings.insert(0, reason)  # emitted before the SVI fit's own warnings
        name, options, notes = "svi", {}, {**notes, "fallback_reason": reason}
    result.config.update(runner=name, runner_options={k: v for k, v in options.items() if k != "guide"}, **notes)
    if "guide" in options:
        result.config["runner_options"]["guide"] = type(options["guide"]).__name__
    return result


__all__ = ["RUNNERS", "fit", "resolve_runner"]
