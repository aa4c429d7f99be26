"""ArviZ output: turn posterior draws and derived quantities into InferenceData, save and load it.

Schema (the same for both containers):

==================== ======================================= ===========================================
group                variables                               dims
==================== ======================================= ===========================================
posterior            one per parameter / latent site         chain, draw, + ``model.site_dims()[name]``
sample_stats         diverging, step_size, tree_depth, ...   chain, draw
log_likelihood       y                                       chain, draw, trial, time
posterior_predictive y                                       chain, draw, trial, time, obs
observed_data        y (NaN where not observed)              trial, time, obs
constant_data        mask, lengths, inputs                   (trial, time, obs), (trial,), (trial, time, input)
posterior_states     state_probs (posterior mean marginals)  trial, time, state
                     viterbi, state_samples (-1 past length) chain, draw, trial, time
extra groups         e.g. fixed_points                       as given
==================== ======================================= ===========================================

Every dim gets an integer-range coordinate. Sites missing from ``site_dims`` get dims ``<name>_dim_<i>``.

The pointwise log-likelihood is per (trial, time) step and is **0 at steps with no observed entry**
(padding past a trial's length, fully missing steps). ``az.loo`` runs on it directly and those steps
contribute exactly 0 to elpd, but their Pareto k-hat is ``inf`` (a constant log-likelihood has no tail to
fit), so arviz flags a warning. For model comparison prefer :func:`observed_step_log_likelihood`
(leave-one-step-out over observed steps only: same elpd, no spurious k-hat) or
:func:`trial_log_likelihood` (leave-one-trial-out: the log-likelihood summed over time).

Containers (``backend``): ``"legacy"`` -> ``arviz.InferenceData`` (arviz < 1); ``"datatree"`` ->
``xarray.DataTree`` (the arviz >= 1 / arviz-base layout: one child node per group, global attrs at the
root); ``"auto"`` -> datatree when arviz >= 1 is installed, else legacy. Both are written to the same
netCDF layout (one netCDF group per InferenceData group), so either backend reads files of the other.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from typing import Any, Mapping, Optional

import numpy as np
import xarray as xr

from ppl_switch.data import SequenceData, as_sequence_data
from ppl_switch.version import __version__

CHAIN_DRAW = ("chain", "draw")
BACKENDS = ("auto", "legacy", "datatree")


# ----- backend selection ------------------------------------------------------------------------
def _arviz_major() -> int:
    try:
        return int(importlib.metadata.version("arviz").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 1  # arviz-base only: the DataTree world


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"datatree"`` if arviz >= 1 is installed, else ``"legacy"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "datatree" if _arviz_major() >= 1 else "legacy"
    return backend


def credible_interval_convention() -> tuple[float, str]:
    """(probability, kind) of every credible interval the library draws: ArviZ's default for the installed
    generation, so figures agree with ``az.summary`` and ``ppl-switch summary``.

    arviz >= 1: ``rcParams["stats.ci_prob"]`` and ``rcParams["stats.ci_kind"]`` (0.89, "eti" unless changed);
    arviz < 1: ``rcParams["stats.hdi_prob"]`` (0.94 unless changed) and "hdi", what its summary reports.
    """
    import arviz as az

    rc = az.rcParams
    if "stats.ci_kind" in rc:  # arviz >= 1 (0.2x has "stats.ci_prob" as an alias of hdi_prob, but no kind)
        return float(rc["stats.ci_prob"]), str(rc["stats.ci_kind"])
    return float(rc["stats.ci_prob" if "stats.ci_prob" in rc else "stats.hdi_prob"]), "hdi"


def _library_attrs() -> dict[str, str]:
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "creation_library": "ppl_switch",
        "creation_library_version": __version__,
        "inference_library": "numpyro",
        "inference_library_version": version("numpyro"),
    }


# ----- building datasets ------------------------------------------------------------------------
def _dataset(variables: Mapping[str, tuple[tuple[str, ...], Any]], attrs: Mapping[str, Any]) -> xr.Dataset:
    """A Dataset from ``{name: (dims, array)}`` with an integer-range coordinate for every dim."""
    data_vars = {}
    sizes: dict[str, tuple[int, str]] = {}
    for name, (dims, value) in variables.items():
        value = np.asarray(value)
        if value.ndim != len(dims):
            raise ValueError(f"{name}: array of shape {value.shape} does not match dims {dims}")
        for dim, size in zip(dims, value.shape):
            if dim in sizes and sizes[dim][0] != size:
                other_size, other = sizes[dim]
                raise ValueError(
                    f"{name}: dim {dim!r} has size {size} but {other!r} gives it size {other_size}; "
                    "give different things different dim names (model.site_dims())"
                )
            sizes[dim] = (size, name)
        data_vars[name] = (dims, value)
    coords = {dim: np.arange(size) for dim, (size, _) in sizes.items()}
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs))


def _site_dims(model) -> dict[str, tuple[str, ...]]:
    try:
        return {name: tuple(dims) for name, dims in model.site_dims().items()}
    except NotImplementedError:
        return {}


def _posterior_variables(samples, site_dims, num_chains, num_draws):
    variables = {}
    for name, value in samples.items():
        value = np.asarray(value)
        if value.shape[:2] != (num_chains, num_draws):
            raise ValueError(
                f"samples[{name!r}]: expected leading (chain, draw) = {(num_chains, num_draws)}, got {value.shape}"
            )
        event_ndim = value.ndim - 2
        dims = site_dims.get(name)
        if dims is None:
            dims = tuple(f"{name}_dim_{i}" for i in range(event_ndim))
        elif len(dims) != event_ndim:
            raise ValueError(
                f"samples[{name!r}]: model.site_dims() gives dims {dims} but a draw has shape {value.shape[2:]}"
            )
        variables[name] = (CHAIN_DRAW + dims, value)
    return variables


def _chain_draw_shape(samples, *others) -> tuple[int, int]:
    for group in (samples, *others):
        for value in (group or {}).values():
            shape = np.shape(value)
            if len(shape) >= 2:
                return int(shape[0]), int(shape[1])
    raise ValueError("samples: expected at least one array with leading (chain, draw) dims")


def observed_data_variables(data: SequenceData) -> dict[str, Any]:
    """observed_data and constant_data variables for ``data`` (y is NaN where not observed)."""
    y = np.where(np.asarray(data.mask), np.asarray(data.y, dtype=float), np.nan)
    constant = {
        "mask": (("trial", "time", "obs"), np.asarray(data.mask, dtype=bool)),
        "lengths": (("trial",), np.asarray(data.lengths, dtype=np.int32)),
    }
    if data.inputs is not None:
        constant["inputs"] = (("trial", "time", "input"), np.asarray(data.inputs))
    return {"observed_data": {"y": (("trial", "time", "obs"), y)}, "constant_data": constant}


def build_inference_data(
    model,
    data: SequenceData,
    samples: Mapping[str, Any],
    *,
    log_likelihood=None,
    posterior_predictive=None,
    posterior_states: Optional[Mapping[str, Any]] = None,
    sample_stats: Optional[Mapping[str, Any]] = None,
    extra_groups: Optional[Mapping[str, Any]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
    backend: str = "auto",
):
    """Assemble the InferenceData of a fit (schema in the module docstring).

    Args:
        model: the Model (its ``site_dims()`` names the posterior dims; ``name`` goes to attrs).
        data: the SequenceData that was fitted.
        samples: ``{site: (chain, draw, ...)}`` posterior draws.
        log_likelihood: (chain, draw, trial, time) pointwise log-likelihood (0 where unobserved), or None.
        posterior_predictive: (chain, draw, trial, time, obs) replicated observations, or None.
        posterior_states: output of :func:`ppl_switch.infer.posterior_states`: ``state_probs``
            (trial, time, state), ``viterbi`` and ``state_samples`` (chain, draw, trial, time).
        sample_stats: ``{stat: (chain, draw)}`` (e.g. diverging, step_size, tree_depth).
        extra_groups: ``{group: xr.Dataset or {var: (dims, array)}}`` for derived groups.
        attrs: global attributes (numbers or strings; booleans are stored as 0/1).
        backend: "auto", "legacy" (arviz.InferenceData) or "datatree" (xarray.DataTree).
    """
    backend = resolve_backend(backend)
    num_chains, num_draws = _chain_draw_shape(samples, sample_stats)
    lib_attrs = _library_attrs()
    groups: dict[str, xr.Dataset] = {}

    groups["posterior"] = _dataset(_posterior_variables(samples, _site_dims(model), num_chains, num_draws), lib_attrs)
    if sample_stats:
        groups["sample_stats"] = _dataset({k: (CHAIN_DRAW, v) for k, v in sample_stats.items()}, lib_attrs)
    if log_likelihood is not None:
        groups["log_likelihood"] = _dataset({"y": (CHAIN_DRAW + ("trial", "time"), log_likelihood)}, lib_attrs)
    if posterior_predictive is not None:
        groups["posterior_predictive"] = _dataset(
            {"y": (CHAIN_DRAW + ("trial", "time", "obs"), posterior_predictive)}, lib_attrs
        )
    for group, variables in observed_data_variables(data).items():
        groups[group] = _dataset(variables, lib_attrs)
    if posterior_states:
        state_dims = {
            "state_probs": ("trial", "time", "state"),
            "viterbi": CHAIN_DRAW + ("trial", "time"),
            "state_samples": CHAIN_DRAW + ("trial", "time"),
        }
        unknown = set(posterior_states) - set(state_dims)
        if unknown:
            raise ValueError(f"posterior_states: unknown entries {sorted(unknown)}; expected {sorted(state_dims)}")
        groups["posterior_states"] = _dataset(
            {k: (state_dims[k], v) for k, v in posterior_states.items()}, lib_attrs
        )
    for group, content in (extra_groups or {}).items():
        if group in groups:
            raise ValueError(f"extra_groups: group {group!r} already exists")
        groups[group] = content if isinstance(content, xr.Dataset) else _dataset(content, lib_attrs)

    root_attrs = {**lib_attrs, "model": getattr(model, "name", type(model).__name__)}
    root_attrs.update({k: _attr_value(k, v) for k, v in (attrs or {}).items()})
    return _container(groups, root_attrs, backend)


def _attr_value(name: str, value):
    """netCDF attributes: numbers, strings, 1-d number arrays; bools become 0/1."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and np.asarray(value).dtype.kind in "iuf":
        return np.asarray(value)
    raise ValueError(f"attrs[{name!r}]: expected a number, string or list of numbers, got {type(value).__name__}")


def _container(groups: Mapping[str, xr.Dataset], attrs: Mapping[str, Any], backend: str):
    if backend == "legacy":
        import arviz as az

        return az.InferenceData(attrs=dict(attrs), **groups)
    tree = xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})
    tree.attrs = dict(attrs)
    return tree


# ----- reading either container -----------------------------------------------------------------
def is_datatree(idata) -> bool:
    return isinstance(idata, xr.DataTree)


def group_names(idata) -> list[str]:
    """Names of the groups of an InferenceData or DataTree."""
    return list(idata.children) if is_datatree(idata) else list(idata.groups())


def get_group(idata, name: str) -> xr.Dataset:
    """Group ``name`` as an ``xr.Dataset`` from either container."""
    if name not in group_names(idata):
        raise KeyError(f"group {name!r} not in {group_names(idata)}")
    return idata[name].to_dataset() if is_datatree(idata) else idata[name]


def global_attrs(idata) -> dict[str, Any]:
    return dict(idata.attrs)


def replace_groups(idata, groups: Mapping[str, Optional[xr.Dataset]]):
    """A new container of the same kind with groups replaced / added (``None`` removes a group)."""
    current = {name: get_group(idata, name) for name in group_names(idata)}
    for name, ds in groups.items():
        if ds is None:
            current.pop(name, None)
        else:
            current[name] = ds
    return _container(current, global_attrs(idata), "datatree" if is_datatree(idata) else "legacy")


def to_backend(idata, backend: str):
    """Convert between the legacy InferenceData and the DataTree container."""
    backend = resolve_backend(backend)
    groups = {name: get_group(idata, name) for name in group_names(idata)}
    return _container(groups, global_attrs(idata), backend)


def save_inference_data(idata, path) -> None:
    """Write either container to netCDF (one netCDF group per InferenceData group)."""
    groups = {name: get_group(idata, name) for name in group_names(idata)}
    tree = _container(groups, global_attrs(idata), "datatree")
    tree.to_netcdf(str(path), mode="w")


def load_inference_data(path, backend: str = "auto"):
    """Read a file written by :func:`save_inference_data` (or arviz's ``to_netcdf``) fully into memory."""
    backend = resolve_backend(backend)
    tree = xr.open_datatree(str(path))
    try:
        groups = {name: tree[name].to_dataset().load() for name in tree.children}
        attrs = dict(tree.attrs)
    finally:
        tree.close()
    return _container(groups, attrs, backend)


def sequence_data_from_inference_data(idata) -> SequenceData:
    """Rebuild the fitted SequenceData from observed_data and constant_data."""
    observed = get_group(idata, "observed_data")
    constant = get_group(idata, "constant_data")
    inputs = constant["inputs"].values if "inputs" in constant else None
    return as_sequence_data(
        observed["y"].values,
        mask=constant["mask"].values.astype(bool),
        lengths=constant["lengths"].values,
        inputs=inputs,
    )


# ----- log-likelihood views for model comparison ------------------------------------------------
def trial_log_likelihood(idata):
    """Same container with log_likelihood "y" summed over time: (chain, draw, trial), for per-trial loo."""
    ll = get_group(idata, "log_likelihood")
    summed = xr.Dataset({"y": ll["y"].sum("time")}, attrs=ll.attrs)
    return replace_groups(idata, {"log_likelihood": summed})


def observed_step_log_likelihood(idata):
    """Same container with log_likelihood "y" over observed (trial, time) steps only: (chain, draw, step).

    Steps with no observed entry (padding, fully missing steps) are dropped; coords ``trial_index`` and
    ``time_index`` say where each step came from.
    """
    ll = get_group(idata, "log_likelihood")["y"]
    observed = get_group(idata, "constant_data")["mask"].values.any(axis=-1)
    trial_idx, time_idx = np.nonzero(observed)
    values = ll.values[:, :, trial_idx, time_idx]
    ds = xr.Dataset(
        {"y": (CHAIN_DRAW + ("step",), values)},
        coords={
            "chain": ll["chain"].values,
            "draw": ll["draw"].values,
            "step": np.arange(len(trial_idx)),
            "trial_index": ("step", trial_idx),
            "time_index": ("step", time_idx),
        },
        attrs=get_group(idata, "log_likelihood").attrs,
    )
    return replace_groups(idata, {"log_likelihood": ds})
