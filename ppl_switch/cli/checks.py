"""Checks of the arguments and input files, run before anything is loaded or compiled, and UsageError.

Each failed check raises :class:`UsageError` with a message that starts with the argument's name and says
how to fix it; ``main`` prints it as one line with exit status 2.
"""

from __future__ import annotations

import csv
import inspect
import tempfile
from pathlib import Path

import numpy as np


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


def one_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message, with " [...]" when more follow."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" [...]" if len(lines) > 1 else "")


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


# ----- checks of the loaded arrays --------------------------------------------------------------------


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
