"""The result of every runner, how it is assembled from draws, and how it is saved and loaded.

Saving writes two files and never pickles:

* ``path`` (netCDF): the InferenceData, plus two groups that :func:`load` strips again:
  ``fit_params`` (the SVI guide parameters / EM point estimate, one variable per parameter) and
  ``fit_losses`` (the loss history, dim ``step``) and ``fit_estimate`` (the runner's own point estimate);
* ``path + ".json"`` (the sidecar): model name and ``model.config()``, method, runner settings,
  diagnostics and library versions.

:func:`load` rebuilds the model with ``ppl_switch.models.get_model(name, **config)`` (or takes the model
you pass), the data from observed_data / constant_data and the samples from the posterior group.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
import xarray as xr

from ppl_switch.data import SequenceData
from ppl_switch.infer.checks import emit
from ppl_switch.infer.decode import pointwise_log_likelihood, posterior_predictive_draws, posterior_states
from ppl_switch.infer.prepare import implements
from ppl_switch.relabel import num_permuted, relabel_draws
from ppl_switch.results import (
    build_inference_data,
    get_group,
    group_names,
    load_inference_data,
    replace_groups,
    save_inference_data,
    sequence_data_from_inference_data,
)
from ppl_switch.version import __version__

SIDECAR_FORMAT = "ppl-switch-fit"
SIDECAR_VERSION = 1
_PARAMS_GROUP = "fit_params"
_LOSSES_GROUP = "fit_losses"
_ESTIMATE_GROUP = "fit_estimate"


@dataclasses.dataclass
class Fit:
    """What a runner returns.

    Attributes:
        model: the fitted Model.
        data: the validated SequenceData.
        method: "svi", "nuts" or "em".
        idata: the ArviZ output (``arviz.InferenceData`` or ``xarray.DataTree``, see :mod:`ppl_switch.results`).
        params: SVI: the guide's parameters as numpyro's ``svi.get_params`` returns them (not the model's
            parameters: an autoguide's ``*_auto_loc`` live in the model's *unconstrained* space; use
            :meth:`point_estimate` for the model's constrained values); EM: the point estimate; NUTS: None.
        samples: ``{site: (chain, draw, ...)}`` NumPy draws (relabelled if ``relabel``).
        losses: SVI: (num_steps,) negative ELBO per step; EM: negative log-likelihood per iteration if
            the model reports it; NUTS: None.
        diagnostics: NUTS: divergences, acceptance, step sizes, tree depth, r_hat/ess; EM: what the
            model's ``em`` reports; always ``relabelled_draws``.
        config: the runner settings (JSON-serialisable); :func:`ppl_switch.fit` adds ``runner`` and
            ``runner_options`` (the recommended runner that ran and what it was given).
        warnings: what the runner's checks found (non-convergence, disagreeing restarts, data far from
            the priors' scale; :mod:`ppl_switch.infer.checks`). Each was also emitted as a
            :class:`~ppl_switch.errors.FitWarning`, and ``repr(fit)`` lists them.
        estimate: the point estimate :meth:`point_estimate` returns when the runner computed one
            itself (SVI: the guide's median); None = the mean of ``samples``.
        guide: SVI: the fitted guide, whose parameters are ``params`` (the GDM's: its amortised encoder,
            see :func:`ppl_switch.infer.gdm_svi.encode`); None for NUTS, EM and a fit loaded from disk.
    """

    model: Any
    data: SequenceData
    method: str
    idata: Any
    params: Optional[dict[str, np.ndarray]] = None
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    losses: Optional[np.ndarray] = None
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    estimate: Optional[dict[str, np.ndarray]] = None
    guide: Any = dataclasses.field(default=None, repr=False, compare=False)

    def point_estimate(self) -> dict[str, np.ndarray]:
        """The model's own parameters (and latent sites) in their constrained space, one value per site,
        shaped as the site (no chain/draw dims).

        * SVI: the fitted guide's median in the constrained space (``guide.median``, e.g. AutoNormal:
          the constrained image of its ``loc``); for a guide without ``median``, the mean of the draws;
        * NUTS: the posterior mean over chains and draws, after relabelling;
        * EM: the estimate itself (its single draw);
        * GDM (``fit_gdm_svi``): the MAP point estimates, ``z`` as the mean of its draws.

        The mean of constrained draws can leave a constraint that is not convex (e.g. the mean of
        correlation Cholesky factors is not one); use the draws for such sites.
        """
        if self.estimate is not None:
            return {name: np.array(value) for name, value in self.estimate.items()}
        return {name: np.asarray(value).mean(axis=(0, 1)) for name, value in self.samples.items()}

    @property
    def num_divergences(self) -> Optional[int]:
        return self.diagnostics.get("num_divergences")

    def __repr__(self) -> str:
        chains, draws = np.shape(next(iter(self.samples.values())))[:2] if self.samples else (0, 0)
        extra = ""
        if self.losses is not None and len(self.losses):
            extra = f", final loss {float(self.losses[-1]):.6g}"
        if self.num_divergences is not None:
            extra += f", {self.num_divergences} divergences"
        text = (
            f"Fit(model={getattr(self.model, 'name', type(self.model).__name__)!r}, method={self.method!r}, "
            f"{chains} chain(s) x {draws} draws, trials={self.data.num_trials}{extra})"
        )
        if self.warnings:
            text += f"\n{len(self.warnings)} warning(s):" + "".join(f"\n  - {w}" for w in self.warnings)
        return text

    def save(self, path) -> pathlib.Path:
        """Write ``path`` (netCDF) and ``path + ".json"`` (sidecar); returns the sidecar path."""
        path = pathlib.Path(path)
        groups = {}
        if self.params:
            groups[_PARAMS_GROUP] = xr.Dataset(
                {
                    name: ([f"{name}_dim_{i}" for i in range(np.ndim(v))], np.asarray(v))
                    for name, v in self.params.items()
                }
            )
        if self.estimate:
            groups[_ESTIMATE_GROUP] = xr.Dataset(
                {
                    name: ([f"{name}_dim_{i}" for i in range(np.ndim(v))], np.asarray(v))
                    for name, v in self.estimate.items()
                }
            )
        if self.losses is not None:
            groups[_LOSSES_GROUP] = xr.Dataset({"loss": (("step",), np.asarray(self.losses))})
        meta = json.dumps(_jsonable(self._sidecar(path.name)), indent=2)  # first: a model without config() fails here
        save_inference_data(replace_groups(self.idata, groups), path)
        sidecar = sidecar_path(path)
        sidecar.write_text(meta)
        return sidecar

    def _sidecar(self, netcdf_name: str) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "model": getattr(self.model, "name", type(self.model).__name__),
            "model_config": self.model.config(),
            "method": self.method,
            "config": self.config,
            "diagnostics": self.diagnostics,
            "warnings": list(self.warnings),
            "netcdf": netcdf_name,
            "versions": _versions(),
        }


def sidecar_path(path) -> pathlib.Path:
    """The JSON sidecar of a saved fit: ``<path>.json`` (e.g. ``fit.nc`` -> ``fit.nc.json``)."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def _versions() -> dict[str, str]:
    out = {"ppl_switch": __version__}
    for package in ("numpyro", "jax", "arviz", "xarray"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _prepared(model, data: SequenceData) -> SequenceData:
    """``data`` rebuilt from a file, through ``model.prepare`` again (what the fit saw: e.g. the GDM fills
    its missing regressor entries there)."""
    return model.prepare(data.y, mask=data.mask, lengths=data.lengths, inputs=data.inputs)


def load(path, *, model=None, backend: str = "auto") -> Fit:
    """Restore a :class:`Fit` written by :meth:`Fit.save`.

    Args:
        path: the netCDF file (its ``.json`` sidecar must sit beside it).
        model: the model to attach; default ``ppl_switch.models.get_model(name, **config)`` from the sidecar.
        backend: container of the restored ``idata`` ("auto", "legacy", "datatree").
    """
    path = pathlib.Path(path)
    sidecar = sidecar_path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no saved fit at {path}")
    if not sidecar.exists():
        raise FileNotFoundError(f"path: the sidecar {sidecar} written by Fit.save is missing")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{sidecar}: not a ppl-switch fit sidecar (format={meta.get('format')!r})")
    if model is None:
        from ppl_switch.models import get_model  # lazy: models import the runners' layer below them

        model = get_model(meta["model"], **meta["model_config"])
    idata = load_inference_data(path, backend=backend)
    names = group_names(idata)
    params = None
    if _PARAMS_GROUP in names:
        params = {name: np.asarray(v.values) for name, v in get_group(idata, _PARAMS_GROUP).data_vars.items()}
    losses = np.asarray(get_group(idata, _LOSSES_GROUP)["loss"].values) if _LOSSES_GROUP in names else None
    estimate = None
    if _ESTIMATE_GROUP in names:
        estimate = {name: np.asarray(v.values) for name, v in get_group(idata, _ESTIMATE_GROUP).data_vars.items()}
    idata = replace_groups(idata, {_PARAMS_GROUP: None, _LOSSES_GROUP: None, _ESTIMATE_GROUP: None})
    posterior = get_group(idata, "posterior")
    samples = {name: np.asarray(v.values) for name, v in posterior.data_vars.items()}
    return Fit(
        model=model,
        data=_prepared(model, sequence_data_from_inference_data(idata)),
        method=meta["method"],
        idata=idata,
        params=params,
        samples=samples,
        losses=losses,
        diagnostics=meta.get("diagnostics") or {},
        config=meta.get("config") or {},
        warnings=list(meta.get("warnings") or []),
        estimate=estimate,
    )


def assemble_fit(
    model,
    data: SequenceData,
    method: str,
    samples: Mapping[str, Any],
    *,
    key,
    params=None,
    losses=None,
    sample_stats=None,
    diagnostics=None,
    config=None,
    relabel: bool = True,
    extra_groups=None,
    backend: str = "auto",
) -> Fit:
    """Relabel states, compute the per-draw quantities the model supports, and build the Fit.

    Optional model methods that a model does not implement (``log_likelihood``, ``posterior_predictive``,
    ``state_posterior``) are skipped; their groups are then absent, listed in the attr ``skipped`` and
    named in ``fit.warnings`` (emitted as FitWarning), with what is lost and which method to write. Without
    ``site_dims`` the posterior's dims get generic names and deterministic sites are left out; that too is
    named in ``fit.warnings``.
    """
    samples = {name: np.asarray(v) for name, v in samples.items()}
    diagnostics = dict(diagnostics or {})
    num_states = int(getattr(model, "num_states", 0) or 0)
    perms = None
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    unaligned = []
    if relabel and num_states > 1 and num_chains * num_draws > 1:
        if implements(model, "state_features"):
            samples, perms = relabel_draws(model, samples)
        else:
            unaligned = [
                f"{type(model).__name__} does not implement state_features(), so state labels were not aligned "
                "across draws (label switching can mix states in summaries); define state_features and "
                "permute_states (see ppl_switch.models.base.Model) to align them"
            ]
    diagnostics["relabelled_draws"] = 0 if perms is None else num_permuted(perms)

    key_pp, key_states = jax.random.split(key)
    skipped = []
    log_lik = pred = states = None
    if implements(model, "log_likelihood"):
        log_lik = pointwise_log_likelihood(model, samples, data)
    else:
        skipped.append("log_likelihood")
    if implements(model, "posterior_predictive"):
        pred = posterior_predictive_draws(model, samples, data, key_pp)
    else:
        skipped.append("posterior_predictive")
    if num_states > 0:
        if implements(model, "state_posterior"):
            states = posterior_states(model, samples, data, key=key_states)
        else:
            skipped.append("posterior_states")

    missing = [
        f"{type(model).__name__} does not implement {_OPTIONAL_METHODS[group][0]}(), so the InferenceData has no "
        f"{group} group ({_OPTIONAL_METHODS[group][1]}); define {type(model).__name__}.{_OPTIONAL_METHODS[group][0]} "
        "(see ppl_switch.models.base.Model) to add it"
        for group in skipped
    ]
    if not implements(model, "site_dims"):
        missing.append(
            f"{type(model).__name__} does not implement site_dims(), so the posterior's dims are named "
            "<site>_dim_<i> and no deterministic site is written; define "
            f"{type(model).__name__}.site_dims (see ppl_switch.models.base.Model) to name the dims and list the "
            "deterministic sites to keep"
        )
    missing = unaligned + missing
    emit(missing)
    attrs = {
        "method": method,
        "relabelled": perms is not None,
        "num_relabelled_draws": diagnostics["relabelled_draws"],
        "skipped": ",".join(skipped),
    }
    if "num_divergences" in diagnostics:
        attrs["num_divergences"] = int(diagnostics["num_divergences"])
    idata = build_inference_data(
        model,
        data,
        samples,
        log_likelihood=log_lik,
        posterior_predictive=pred,
        posterior_states=states,
        sample_stats=sample_stats,
        extra_groups=extra_groups,
        attrs=attrs,
        backend=backend,
    )
    return Fit(
        model=model,
        data=data,
        method=method,
        idata=idata,
        params=params,
        samples=samples,
        losses=None if losses is None else np.asarray(losses),
        diagnostics=diagnostics,
        config=dict(config or {}),
        warnings=missing,
    )


#: group -> (the model method that fills it, what a user loses without it)
_OPTIONAL_METHODS = {
    "log_likelihood": ("log_likelihood", "no LOO/WAIC or model comparison"),
    "posterior_predictive": ("posterior_predictive", "no posterior predictive checks or plots"),
    "posterior_states": ("state_posterior", "no decoded states"),
}


__all__ = ["Fit", "load", "assemble_fit", "sidecar_path"]
