"""The ``ppl-switch`` command line: simulate, fit, summary, plot, demo, list.

    ppl-switch demo                                   # simulate, fit, write fit.nc and a figure
    ppl-switch simulate hmm --out data.npz
    ppl-switch fit hmm --data data.npz --num-states 3 --seed 0 --out fit.nc    # the model's recommended method
    ppl-switch fit hmm --data data.npz --num-states 3 --method nuts --out fit.nc
    ppl-switch summary fit.nc
    ppl-switch plot fit.nc --out fit.png

Errors never show a traceback unless ``--debug`` is given. A mistake in the arguments or the input files
is one line ``ppl-switch CMD: error: ARGUMENT: what is wrong; the fix`` and exit status 2, found before
any data is loaded or anything is compiled wherever the arguments alone decide it (model options, the
method, output paths, file columns). A fit that fails numerically (FitError) is one line and exit
status 1; any other exception is one line with its type, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import inspect
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from ppl_switch.errors import FitError  # plain Python: costs the CLI no JAX import

#: runner flag (argparse dest) -> the explicit methods that take it. All default to None and reach the
#: runner only when given, so the runner's (or, for --method auto, the model's recommended) value applies.
RUNNER_FLAGS = {
    "num_steps": ("svi",),
    "learning_rate": ("svi",),
    "num_draws": ("svi",),
    "num_warmup": ("nuts",),
    "num_samples": ("nuts",),
    "num_chains": ("nuts",),
    "init": ("nuts",),
    "num_iters": ("em",),
}
#: chains of ``--method nuts`` when --num-chains is not given: split R-hat needs at least two
NUTS_DEFAULT_CHAINS = 2
METHODS = ("auto", "svi", "nuts", "em")
#: the CLI flag of a model's constructor argument (others are set with --option NAME=VALUE)
MODEL_FLAGS = {"num_states": "--num-states", "latent_dim": "--latent-dim"}
#: constructor arguments the CLI fills in from the data
DATA_DIMS = ("obs_dim", "input_dim")


class UsageError(ValueError):
    """A bad argument or input file. The message starts with the argument's name and says how to fix it."""


# ----- checks that need only the arguments (run before any data is loaded) -----------------------------


def check_writable(path, flag: str) -> Path:
    """``path`` can be created or overwritten: its folder exists and takes a new file, and it is not a folder.

    Probes by creating (and removing) a temporary file in the folder, which is what saving will do; a
    permission check alone would pass for root on a read-only mount.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file name, e.g. {path / 'fit.nc'}")
    if not folder.exists():
        raise UsageError(f"{flag}: directory {folder} does not exist; create it first (mkdir -p {folder}) or choose another path")
    if not folder.is_dir():
        raise UsageError(f"{flag}: {folder} is not a directory; choose a path inside a directory")
    _probe_folder(folder, flag)
    return path


def prepare_out_dir(path, flag: str) -> Path:
    """Create the output folder ``path`` (and its parents) and check that files can be written there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} exists and is not a directory; choose a directory name")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag}: cannot create directory {path} ({err.strerror}); choose a writable location") from None
    _probe_folder(path, flag)
    return path


def _probe_folder(folder: Path, flag: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ppl_switch_write_test_"):
            pass
    except OSError as err:
        raise UsageError(f"{flag}: cannot write to directory {folder} ({err.strerror}); choose a writable location") from None


def check_readable_file(path, name: str, what: str) -> Path:
    """``path`` is an existing file; ``what`` says where a right one comes from."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{name}: {path} does not exist; pass {what}")
    if not path.is_file():
        raise UsageError(f"{name}: {path} is not a file; pass {what}")
    return path


def _model_class(name: str):
    from ppl_switch.models import MODELS

    if name not in MODELS:
        raise UsageError(f"MODEL: unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} (ppl-switch list)")
    return MODELS[name]


def supported_methods(name: str) -> list[str]:
    """The ``--method`` values model ``name`` supports: SVI and NUTS for every model, EM where the library has
    one for it or the model defines its own."""
    from ppl_switch.infer.em import has_em

    return ["auto", "svi", "nuts"] + (["em"] if has_em(_model_class(name)) else [])


def check_method(name: str, method: str) -> None:
    methods = supported_methods(name)
    if method not in methods:
        raise UsageError(
            f"--method: model {name!r} has no {method.upper()} fit; its methods are {', '.join(methods)} "
            "(auto = the model's recommended one)"
        )


def check_model_options(name: str, given) -> None:
    """Every option ``given`` is one model ``name`` takes, and every constructor argument without a default
    (other than the dims the data determine) is given; the message names the flag to add."""
    from ppl_switch.models import model_options

    cls = _model_class(name)
    accepted = model_options(name)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise UsageError(
            f"--option: {', '.join(unknown)} is not an option of model {name!r}; its options are {', '.join(accepted)}"
        )
    signature = inspect.signature(cls.__init__).parameters
    missing = [
        p for p, par in signature.items()
        if p != "self" and par.default is inspect.Parameter.empty
        and par.kind not in (par.VAR_POSITIONAL, par.VAR_KEYWORD) and p not in given and p not in DATA_DIMS
    ]
    if missing:
        flags = [MODEL_FLAGS.get(p, f"--option {p}=VALUE") for p in missing]
        example = " ".join(f"{MODEL_FLAGS[p]} 2" for p in missing if p in MODEL_FLAGS)
        raise UsageError(
            f"{', '.join(flags)}: model {name!r} requires {' and '.join(missing)}"
            + (f"; add e.g. {example}" if example else "; add it")
        )


#: the recommended runner (ppl_switch.infer.recommended) -> the explicit method whose flags it takes
RUNNER_FAMILY = {"svi": "svi", "gdm_svi": "svi", "svi_path_refinement": "svi", "nuts": "nuts", "em": "em"}


def runner_overrides(args, method: str, model=None) -> dict:
    """The runner flags the user gave (None = not given), checked against the method that will run: an
    explicit ``method``, or for "auto" the recommended runner of ``model`` (a model built without data)."""
    given = {dest: getattr(args, dest) for dest in RUNNER_FLAGS if getattr(args, dest, None) is not None}
    runs = method
    if method == "auto" and model is not None:
        from ppl_switch.infer.recommended import resolve_runner

        runner = resolve_runner(model)[0]
        runs = RUNNER_FAMILY.get(runner, runner)
    for dest in given:
        if runs != "auto" and runs not in RUNNER_FLAGS[dest]:
            flag, owner = "--" + dest.replace("_", "-"), RUNNER_FLAGS[dest][0]
            what = f"--method {method}" if method != "auto" else f"the recommended method of {args.model!r} ({runs})"
            raise UsageError(f"{flag}: applies to --method {owner}, not to {what}; drop it or pass --method {owner}")
    if method == "nuts":
        given.setdefault("num_chains", NUTS_DEFAULT_CHAINS)
    return given


def _model_without_data(name: str, options: dict):
    """Model ``name`` built from the command-line options alone (the data's dims left to their defaults):
    bad option values fail here, before the data is loaded, and its recommended runner is known."""
    from ppl_switch.models import get_model

    return get_model(name, **options)


def check_npz_arrays(path) -> None:
    """The .npz file opens and holds an array named ``y`` (reads only its index, not the arrays)."""
    path = check_readable_file(path, "--data", "a built-in dataset name (ppl-switch list), a .npz or a .csv file")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
    except (OSError, ValueError) as err:
        raise UsageError(f"--data: cannot read {path} as .npz ({err}); save the data with numpy.savez") from None
    if "y" not in names:
        raise UsageError(
            f"--data: {path} has no array named 'y' (arrays: {', '.join(names) or 'none'}); save the observations "
            "as y, e.g. numpy.savez(path, y=y) with y of shape (trials, time, obs)"
        )


def check_csv_columns(path, args) -> None:
    """The CSV's header has the trial, time and input columns named on the command line."""
    path = check_readable_file(path, "--data", "a built-in dataset name (ppl-switch list), a .npz or a .csv file")
    try:
        with open(path, newline="") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"--data: cannot read {path} as CSV ({err}); pass a text file with a header row") from None
    if not header:
        raise UsageError(f"--data: {path} is empty; a CSV needs a header row and one row per time step")
    columns = ", ".join(header)
    if args.trial_column not in header:
        raise UsageError(
            f"--trial-column: {path} has no column {args.trial_column!r} (columns: {columns}); pass "
            "--trial-column NAME with the column that numbers the trials, or add one (a single trial: all rows 1)"
        )
    if args.time_column is not None and args.time_column not in header:
        raise UsageError(f"--time-column: {path} has no column {args.time_column!r} (columns: {columns})")
    missing = [c for c in args.input_columns or () if c not in header]
    if missing:
        raise UsageError(f"--input-columns: {path} has no column(s) {', '.join(map(repr, missing))} (columns: {columns})")


# ----- data -------------------------------------------------------------------------------------------


def _load_data_arg(spec: str, seed: int, args) -> dict:
    """A built-in dataset simulated with ``seed``, or a .npz / .csv file; arrays checked by :func:`check_data`."""
    from ppl_switch import datasets

    if spec in datasets.DATASETS:
        return datasets.simulate(spec, seed=seed)
    csv_options = {}
    if spec.lower().endswith(".npz"):
        check_npz_arrays(spec)
    if spec.lower().endswith(".csv"):
        check_csv_columns(spec, args)
        csv_options = {"trial_column": args.trial_column, "time_column": args.time_column,
                       "input_columns": tuple(args.input_columns or ())}
    try:
        data = datasets.load_data(spec, **csv_options)
    except ValueError as err:
        if "allow_pickle" not in str(err):  # NumPy's refusal to unpickle an object array
            raise
        raise UsageError(
            f"--data: {spec} holds object arrays ({', '.join(_object_arrays(spec))}), e.g. ragged trials saved as "
            "one array, which ppl-switch does not unpickle; save numeric arrays instead: y padded to "
            "(trials, time, obs) with NaN and an integer `lengths` array (or a `mask`)"
        ) from None
    check_data(data, spec)
    return data


def _object_arrays(path) -> list[str]:
    names = []
    with np.load(path, allow_pickle=False) as f:
        for name in f.files:
            try:
                f[name]
            except ValueError:
                names.append(repr(name))
    return names


def check_data(data: dict, spec: str) -> None:
    """Cheap checks of loaded arrays that NumPy would otherwise fail on with a message naming no argument:
    no trials, and arrays that are not numbers (strings, objects)."""
    y = data.get("y")
    if y is None:
        raise UsageError(f"--data: {spec} has no observations `y`; save them as an array named y (trials, time, obs)")
    for name in ("y", "mask", "lengths", "inputs"):
        value = data.get(name)
        if value is None:
            continue
        arrays = value if isinstance(value, list) else [value]
        for array in arrays:
            array = np.asarray(array)
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise UsageError(
                    f"--data: {name} in {spec} has dtype {array.dtype}, not numbers; save {name} as a numeric array"
                )
    if (len(y) == 0 or any(np.size(trial) == 0 for trial in y)) if isinstance(y, list) else np.size(y) == 0:
        got = "no trials" if isinstance(y, list) else f"shape {np.shape(y)}"
        raise UsageError(f"--data: {spec} holds no observations (y has {got}); y needs at least one trial with one time step")


def build_model(name: str, data: dict, *, num_states=None, latent_dim=None, options=None, log=print):
    """Construct model ``name`` from CLI options; dims the data determine are filled in from it."""
    from ppl_switch.models import get_model, model_options

    accepted = model_options(name)
    kwargs = dict(options or {})
    for key, value, flag in (("num_states", num_states, "--num-states"), ("latent_dim", latent_dim, "--latent-dim")):
        if value is None:
            continue
        if key in accepted:
            kwargs[key] = value
        else:
            log(f"note: {flag} does not apply to model {name!r}; ignored")
    check_model_options(name, kwargs)
    y = data["y"]
    obs_dim = (y[0] if isinstance(y, list) else np.asarray(y)).shape[-1]
    if "obs_dim" in accepted:
        kwargs.setdefault("obs_dim", int(obs_dim))
    inputs = data.get("inputs")
    if inputs is not None and "input_dim" in accepted:
        kwargs.setdefault("input_dim", int((inputs[0] if isinstance(inputs, list) else np.asarray(inputs)).shape[-1]))
    return get_model(name, **kwargs)


# ----- fitting ----------------------------------------------------------------------------------------


def run_fit(model, data: dict, method: str, *, seed: int, quiet: bool, x64: bool = False, overrides=None):
    """Fit with ``method`` ("auto" = ``ppl_switch.infer.fit``, the model's recommended method). ``overrides``
    (the runner flags given) go to the runner; anything not given keeps the runner's default."""
    from ppl_switch import infer

    common = dict(mask=data.get("mask"), lengths=data.get("lengths"), inputs=data.get("inputs"), seed=seed, x64=x64)
    overrides = dict(overrides or {})
    if method == "auto":
        return infer.fit(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "svi":
        return infer.fit_svi(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "nuts":
        return infer.fit_nuts(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "em":
        return infer.fit_em(model, data["y"], **common, **overrides)
    raise UsageError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")


@contextlib.contextmanager
def collect_warnings():
    """Record the Python warnings raised inside (each message once) instead of printing them with a source
    line; :func:`report_fit` prints them as ``warning: ...`` beside the fit's own warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        yield caught


def fit_warnings(fit, caught=()) -> list[str]:
    """The fit's warnings (``Fit.warnings``) and the Python warnings raised during it, each once, in order."""
    messages = [str(m) for m in getattr(fit, "warnings", None) or []]
    for record in caught:
        text = str(record.message).strip()
        if text and text not in messages:
            messages.append(text)
    return messages


def diagnostic_summary(fit) -> str:
    """One line: R-hat, ESS and divergences for NUTS; the final objective and whether it converged for SVI
    and EM. "Converged" is the runners' own test (:func:`ppl_switch.infer.checks.moving_objective_warnings`:
    the mean of the last 10% of the trace against the 10% before it), or EM's tolerance where it stopped it."""
    from ppl_switch.infer.checks import objective_movement

    d = fit.diagnostics or {}
    chains, draws = np.shape(next(iter(fit.samples.values())))[:2] if fit.samples else (0, 0)
    if fit.method == "nuts":
        parts = [f"{chains} chain(s) x {draws} draws"]
        has_r_hat = d.get("max_r_hat") is not None  # None (or absent) with one chain
        parts.append(f"max R-hat {d['max_r_hat']:.3f}" if has_r_hat else "no R-hat (needs >= 2 chains: --num-chains)")
        if d.get("min_ess") is not None:
            parts.append(f"min bulk ESS {d['min_ess']:.0f}")
        parts.append(f"{d.get('num_divergences', 0)} divergences")
        return "diagnostics: nuts, " + ", ".join(parts)
    if fit.method == "em" and d.get("log_likelihoods") is not None:
        trace, name, unit = np.atleast_1d(np.asarray(d["log_likelihoods"], dtype=float)), "log-likelihood", "iterations"
    elif fit.losses is not None and len(fit.losses):
        trace, name, unit = np.asarray(fit.losses, dtype=float), "negative ELBO" if fit.method == "svi" else "loss", "steps"
    else:
        return f"diagnostics: {fit.method}, no objective recorded"
    finite = trace[np.isfinite(trace)]
    line = f"diagnostics: {fit.method}, final {name} {float(trace[-1]):.6g} after {len(trace)} {unit}, "
    if d.get("converged") is True:
        return line + "converged (tolerance reached)"
    movement = objective_movement(finite) if len(finite) else None
    if movement is None:
        return line + "convergence not assessed (too few values)"
    if movement["change"] > movement["threshold"]:
        return line + "not converged (the objective is still moving)"
    return line + "converged (no change beyond tolerance over the last 10%)"


def report_fit(fit, caught=()) -> None:
    """Print every warning of the fit to stderr as ``warning: ...``, then the one-line diagnostic summary."""
    messages = fit_warnings(fit, caught)
    for message in messages:
        print(f"warning: {' '.join(message.split())}", file=sys.stderr)
    print(diagnostic_summary(fit), file=sys.stderr)


def cmd_fit(args) -> None:
    # everything the arguments alone decide, before loading data (a built-in dataset is simulated) or compiling
    options = dict(args.option or [])
    check_method(args.model, args.method)
    from ppl_switch.models import model_options

    flags = {"num_states": args.num_states, "latent_dim": args.latent_dim}  # build_model notes and drops the others
    accepted = model_options(args.model)
    given = {**options, **{k: v for k, v in flags.items() if v is not None and k in accepted}}
    check_model_options(args.model, given)
    overrides = runner_overrides(args, args.method, _model_without_data(args.model, given))
    out = check_writable(args.out, "--out")
    check_writable(out.with_name(out.name + ".json"), "--out")  # the sidecar beside it

    from ppl_switch.analysis.fit_fixed_points import add_fit_fixed_points

    data = _load_data_arg(args.data, args.seed, args)
    model = build_model(args.model, data, num_states=args.num_states, latent_dim=args.latent_dim, options=options)
    start = time.perf_counter()
    with collect_warnings() as caught:
        fit = run_fit(model, data, args.method, seed=args.seed, quiet=args.quiet, x64=args.x64, overrides=overrides)
        fit.idata = add_fit_fixed_points(fit)  # the derived fixed_points group, for models that have fixed points
    fit.save(out)
    report_fit(fit, caught)
    how = fit.method if args.method != "auto" else f"{fit.config.get('runner', fit.method)} (the recommended method)"
    print(f"fitted {args.model} with {how} in {time.perf_counter() - start:.1f} s; wrote {out}")


FIT_OUTPUT = """output groups: posterior, log_likelihood (trial, time), posterior_predictive, observed_data,
constant_data, sample_stats (nuts); posterior_states (state_probs: trial, time, state) for models with
discrete or relaxed states; fixed_points for models with fixed points (at zero additive input):
  lds            fixed_point (chain, draw, latent)
  slds, rslds    fixed_point (chain, draw, state, latent)
  arhmm          fixed_point (chain, draw, state, obs)
  gdm            fixed_point (chain, draw, state, latent) in the projected space F y; fixed_point_obs (..., obs)
  clds           fixed_point (chain, draw, condition, latent) on a grid over the observed inputs
  gpslds, gpsde  fixed_point (sample, root, latent); a flow_field group when latent_dim = 2
  hmm            no fixed_points group

After the fit, every warning (convergence, divergences, ...) is printed as "warning: ..." and a one-line
diagnostic summary: R-hat, ESS and divergences (nuts); the final objective and convergence (svi, em)."""


# ----- the other commands -----------------------------------------------------------------------------


def cmd_simulate(args) -> None:
    from ppl_switch import datasets

    if args.name not in datasets.DATASETS:
        raise UsageError(f"NAME: unknown dataset {args.name!r}; choose one of {', '.join(sorted(datasets.DATASETS))}")
    options = dict(args.option or [])
    module, function, _, _ = datasets.DATASETS[args.name]
    simulator = getattr(importlib.import_module(module), function)
    params = inspect.signature(simulator).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params) | ({"seed"} & set(options)))
        if unknown:
            valid = [p for p in params if p != "seed"]
            raise UsageError(
                f"--option: {', '.join(unknown)} is not an option of dataset {args.name!r}; its options are {', '.join(valid)}"
            )
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # np.savez appends .npz
    check_writable(out, "--out")
    arrays = datasets.simulate(args.name, seed=args.seed, **options)
    np.savez(out, **arrays)
    print(f"wrote {out}: " + ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items()))


FIT_FILE = "the .nc file written by `ppl-switch fit --out` (or `ppl-switch demo`)"


def load_fit_file(path):
    """The InferenceData of a fit file, or a UsageError naming FIT."""
    from ppl_switch.results import load_inference_data

    path = check_readable_file(path, "FIT", FIT_FILE)
    try:
        return load_inference_data(path)
    except (OSError, ValueError) as err:
        reason = _one_line(err)
        reason = reason if len(reason) <= 80 else reason[:77] + "..."
        raise UsageError(f"FIT: cannot read {path} as a netCDF fit ({type(err).__name__}: {reason}); pass {FIT_FILE}") from None


def _fit_method(path) -> str:
    """The method recorded in the fit's sidecar (``FIT.json``), or "" when there is none."""
    from ppl_switch.infer import sidecar_path

    try:
        return str(json.loads(sidecar_path(path).read_text()).get("method", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def cmd_summary(args) -> None:
    import arviz as az
    import pandas as pd

    from ppl_switch.results import get_group, group_names

    idata = load_fit_file(args.fit)
    if "posterior" not in group_names(idata):
        raise UsageError(f"FIT: {args.fit} has no posterior group; pass {FIT_FILE}")
    posterior = get_group(idata, "posterior")
    unknown = [v for v in args.var_names or () if v not in posterior.data_vars]
    if unknown:
        raise UsageError(
            f"--var-names: {', '.join(unknown)} not in the posterior of {args.fit}; its variables are "
            f"{', '.join(map(str, posterior.data_vars))}"
        )
    chains, draws = posterior.sizes.get("chain", 1), posterior.sizes.get("draw", 1)
    kind = "stats" if args.stats_only or chains < 2 else "all"
    method = _fit_method(args.fit)
    with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200), \
            warnings.catch_warnings(), \
            np.errstate(all="ignore"):
        # entries constant by construction (e.g. a Cholesky factor's unit diagonal) make ArviZ divide 0 by 0;
        # their R-hat shows as NaN, the warnings add nothing
        warnings.simplefilter("ignore", RuntimeWarning)
        if draws < 2:
            print(f"note: {args.fit} holds one draw ({method or 'a point estimate'}): showing its values", file=sys.stderr)
            table = az.summary(idata, var_names=args.var_names, kind="stats")
            print(table[["mean"]].rename(columns={"mean": "value"}))
            return
        if chains < 2 and not args.stats_only:
            print(
                f"note: {args.fit} has one chain{f' ({method})' if method else ''}: R-hat and ESS need >= 2 chains, so "
                "this shows posterior statistics only; fit with --method nuts --num-chains 2 for them",
                file=sys.stderr,
            )
        print(az.summary(idata, var_names=args.var_names, kind=kind))


def cmd_plot(args) -> None:
    from ppl_switch.plots import plot_fit
    from ppl_switch.results import get_group, group_names

    out = check_writable(args.out, "--out")
    idata = load_fit_file(args.fit)
    if "observed_data" not in group_names(idata):
        raise UsageError(f"FIT: {args.fit} has no observed_data group; pass {FIT_FILE}")
    num_trials = get_group(idata, "observed_data")["y"].sizes.get("trial", 1)
    if not 0 <= args.trial < num_trials:
        raise UsageError(f"--trial: {args.fit} has {num_trials} trial(s), numbered 0 to {num_trials - 1}; got {args.trial}")
    plot_fit(idata, str(out), trial=args.trial)
    print(f"wrote {out}")


#: the demo's data and NUTS settings. The chains start from a short SVI fit: from the prior, one of the two
#: chains stuck in a poor mode of the HMM posterior (seed 0: max R-hat 17.9, chain log densities -1802 vs
#: -1317); from SVI, max R-hat 1.002, min bulk ESS 698. --quick (hidden, for the tests) is smaller and starts
#: from the prior, which saves the SVI fit's compilation (CPU 49.5 s against 73.8 s on the shared 2-core machine)
DEMO = {"num_trials": 3, "num_timesteps": 200, "num_warmup": 300, "num_samples": 300, "num_chains": NUTS_DEFAULT_CHAINS,
        "init": "svi"}
DEMO_QUICK = {**DEMO, "num_trials": 2, "num_timesteps": 100, "num_warmup": 100, "num_samples": 100, "init": "prior"}


def cmd_demo(args) -> None:
    """Simulate a 3-state HMM dataset, fit it with NUTS, write the InferenceData and a figure."""
    from ppl_switch import datasets
    from ppl_switch.analysis.metrics import matched_state_accuracy
    from ppl_switch.plots import plot_fit
    from ppl_switch.results import get_group

    out_dir = prepare_out_dir(args.out_dir, "--out-dir")
    settings = DEMO_QUICK if args.quick else DEMO
    start = time.perf_counter()
    data = datasets.simulate("hmm", seed=args.seed, num_trials=settings["num_trials"], num_timesteps=settings["num_timesteps"])
    model = build_model("hmm", data, num_states=3)
    chains, origin = settings["num_chains"], "a short SVI fit" if settings["init"] == "svi" else "the prior"
    print(f"simulated 'hmm': y {data['y'].shape} (trials, time, obs); fitting {model.name} with NUTS, {chains} chains "
          f"started from {origin} ...")
    overrides = {k: settings[k] for k in ("num_warmup", "num_samples", "num_chains", "init")}
    with collect_warnings() as caught:
        fit = run_fit(model, data, "nuts", seed=args.seed, quiet=args.quiet, overrides=overrides)
    fit_path, fig_path = out_dir / "fit.nc", out_dir / "fit.png"
    fit.save(fit_path)
    plot_fit(fit.idata, str(fig_path), true_states=data["states"])
    report_fit(fit, caught)
    probs = np.asarray(get_group(fit.idata, "posterior_states")["state_probs"])
    accuracy = matched_state_accuracy(data["states"], probs.argmax(-1), num_states=model.num_states)
    print(f"state accuracy (after matching labels) {accuracy:.3f}; divergences {fit.num_divergences}")
    print(f"wrote {fit_path} (InferenceData) and {fig_path} in {time.perf_counter() - start:.1f} s")


def cmd_list(args) -> None:
    from ppl_switch import datasets
    from ppl_switch.models import MODELS

    print("models:   " + ", ".join(sorted(MODELS)))
    print("datasets:")
    for name, (_, _, model, description) in sorted(datasets.DATASETS.items()):
        print(f"  {name:<18} for {model:<8} {description}")


# ----- the parser and the error handling ----------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default: argparse's "(default: X)", unless the help already says what the default is."""

    def _get_help_string(self, action):
        help_text = action.help.render() if isinstance(action.help, _LazyHelp) else (action.help or "")
        if "default:" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        if action.required or (not action.option_strings and action.default is None):
            return help_text  # required: no default to show
        return super()._get_help_string(action) if help_text else "(default: %(default)s)"


class _LazyHelp(str):
    """A help text computed when the help is shown, not when the parser is built: the texts below read
    the runners' and models' signatures, and importing those (JAX, NumPyro) would make every command,
    ``ppl-switch list`` included, pay for it. The str value is a placeholder that argparse only tests
    for being non-empty; :class:`HelpFormatter` renders the real text."""

    def __new__(cls, make):
        obj = super().__new__(cls, "(computed when shown)")
        obj.make = make
        return obj

    def render(self) -> str:
        return self.make()


def _runner_default(runner: str, name: str) -> str:
    """The default of a runner's keyword, read from its signature so that the help stays true."""
    from ppl_switch import infer

    default = inspect.signature(getattr(infer, runner)).parameters[name].default
    return f"{runner}'s {default}"


def _requirement(option: str) -> str:
    """Which models require ``option`` (no default), for the help."""
    from ppl_switch.models import MODELS

    required = [name for name, cls in sorted(MODELS.items())
                if inspect.signature(cls.__init__).parameters.get(option, inspect.Parameter("x", 1, default=0)).default
                is inspect.Parameter.empty]
    return f"required by {', '.join(required)}; default: the model's where it has one"


def make_parser() -> argparse.ArgumentParser:
    """The ``ppl-switch`` parser; ``parser.subcommands`` maps each command to its sub-parser."""
    parser = argparse.ArgumentParser(prog="ppl-switch", description="Switching and latent dynamical systems in NumPyro.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", dest="debug_main", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = {}

    def add(name, **kw):
        p = sub.add_parser(name, parents=[common], formatter_class=HelpFormatter, **kw)
        parser.subcommands[name] = p
        return p

    p = add("demo", help="simulate, fit with NUTS, write fit.nc and fit.png",
            description=f"Simulate a 3-state Gaussian HMM ({DEMO['num_trials']} trials x {DEMO['num_timesteps']} steps), "
                        f"fit it with NUTS\n({DEMO['num_chains']} chains x {DEMO['num_samples']} draws after "
                        f"{DEMO['num_warmup']} warmup, started from a short SVI fit), print the\nstate accuracy and "
                        "the diagnostics, and write OUT_DIR/fit.nc and OUT_DIR/fit.png.")
    p.add_argument("--out-dir", default="ppl_switch_demo", help="folder for fit.nc and fit.png (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the fit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # a smaller run, for the tests
    p.set_defaults(func=cmd_demo)

    p = add("simulate", help="write a built-in dataset to .npz")
    p.add_argument("name", metavar="NAME", help="a built-in dataset (ppl-switch list)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--out", required=True, help="the .npz file to write (required)")
    p.add_argument("--option", type=_parse_option, action="append",
                   help="simulator option NAME=VALUE, repeatable, e.g. num_timesteps=100 (default: the simulator's)")
    p.set_defaults(func=cmd_simulate)

    p = add("fit", help="fit a model and write InferenceData (.nc)", epilog=FIT_OUTPUT)
    p.add_argument("model", metavar="MODEL", help="a model name (ppl-switch list)")
    p.add_argument("--data", required=True, help="a built-in dataset name, a .npz or a .csv file (required)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto: the model's recommended method (ppl_switch.infer.fit); svi, nuts or em (models with EM)")
    p.add_argument("--num-states", type=int, help=_LazyHelp(lambda: f"number of discrete states ({_requirement('num_states')})"))
    p.add_argument("--latent-dim", type=int, help=_LazyHelp(lambda: f"latent dimension ({_requirement('latent_dim')})"))
    p.add_argument("--seed", type=int, default=0, help="seed of the fit (and of a built-in dataset)")
    p.add_argument("--out", required=True, help="the .nc file to write, with FILE.json beside it (required)")
    p.add_argument("--option", type=_parse_option, action="append",
                   help="model option NAME=VALUE, repeatable, e.g. emission=poisson (default: the model's)")
    auto = "; with --method auto, the recommended method's"
    p.add_argument("--num-steps", type=int, help=_LazyHelp(lambda: f"SVI steps (default: {_runner_default('fit_svi', 'num_steps')}{auto})"))
    p.add_argument("--learning-rate", type=float,
                   help=_LazyHelp(lambda: f"SVI learning rate (default: {_runner_default('fit_svi', 'learning_rate')}{auto})"))
    p.add_argument("--num-draws", type=int, help=_LazyHelp(lambda: "SVI: posterior draws from the fitted guide "
                                                 f"(default: {_runner_default('fit_svi', 'num_draws')}{auto})"))
    p.add_argument("--num-warmup", type=int,
                   help=_LazyHelp(lambda: f"NUTS warmup steps (default: {_runner_default('fit_nuts', 'num_warmup')}{auto})"))
    p.add_argument("--num-samples", type=int,
                   help=_LazyHelp(lambda: f"NUTS draws per chain (default: {_runner_default('fit_nuts', 'num_samples')}{auto})"))
    p.add_argument("--num-chains", type=int, help=f"NUTS chains (default: {NUTS_DEFAULT_CHAINS}, the fewest that give "
                                                  f"R-hat{auto})")
    p.add_argument("--init", choices=["prior", "svi"],
                   help=_LazyHelp(lambda: "NUTS start: prior (random, a different point per chain) or svi (every chain from a short "
                        f"SVI fit; keeps chains out of poor modes) (default: {_runner_default('fit_nuts', 'init')}{auto})"))
    p.add_argument("--num-iters", type=int, help="EM iterations (default: the model's EM setting, e.g. 100 for slds)")
    p.add_argument("--x64", action="store_true", help="compute in float64 (default: float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trial-column", default="trial", help="CSV: the column numbering the trials")
    p.add_argument("--time-column", help="CSV: sort each trial's rows by this column (default: file order)")
    p.add_argument("--input-columns", nargs="*", help="CSV: columns that are inputs, not observations (default: none)")
    p.set_defaults(func=cmd_fit)

    p = add("summary", help="ArviZ summary table of a fit")
    p.add_argument("fit", metavar="FIT", help="a .nc file written by ppl-switch fit")
    p.add_argument("--var-names", nargs="*", help="posterior variables to show (default: all)")
    p.add_argument("--stats-only", action="store_true", help="mean, sd and HDI only (no R-hat, ESS)")
    p.add_argument("--max-rows", type=int, default=60, help="rows of the table to print")
    p.set_defaults(func=cmd_summary)

    p = add("plot", help="figure of a fit: observations, predictive band, states")
    p.add_argument("fit", metavar="FIT", help="a .nc file written by ppl-switch fit")
    p.add_argument("--out", required=True, help="the image to write, e.g. fit.png (required)")
    p.add_argument("--trial", type=int, default=0, help="which trial to draw (0-based)")
    p.set_defaults(func=cmd_plot)

    p = add("list", help="list models and built-in datasets")
    p.set_defaults(func=cmd_list)
    return parser


def _parse_option(text: str) -> tuple[str, object]:
    """``name=value`` with value parsed as JSON where possible (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.replace("-", "_"), value


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def main(argv=None) -> int:
    """Run the command; returns the exit status (0 ok, 1 a failed fit or an unexpected error, 2 a usage error)."""
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors (exit 2) and --help (exit 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    from ppl_switch.data import DataError

    prefix = f"ppl-switch {args.command}: error:"
    try:
        args.func(args)
    except Exception as err:
        if args.debug or args.debug_main:
            traceback.print_exc()
        if isinstance(err, (UsageError, DataError, ValueError)):
            print(f"{prefix} {_one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, NotImplementedError):  # a runner the model lacks, found late
            print(f"{prefix} {_one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, FitError):
            print(f"{prefix} {_one_line(err)}", file=sys.stderr)
            return 1
        hint = "" if args.debug or args.debug_main else " (rerun with --debug for the traceback)"
        print(f"{prefix} {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ppl-switch {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
