"""Loading user data from .npz and CSV files into the (trials, time, dim) layout.

``.npz``: arrays ``y`` (required; (trials, time, obs) or (time, obs)), optional ``mask``, ``lengths``,
``inputs``. Any other arrays (e.g. ``states``, ``latents`` from a simulator) are returned under ``extras``.

CSV: one row per time step, a header row, a trial column (default ``trial``), observation columns, and
optionally input columns. Rows of a trial are kept in file order, or sorted by a time column if given.
Empty cells are missing observations (masked).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ppl_switch.data import DataError

DATA_KEYS = ("y", "mask", "lengths", "inputs")


def load_npz(path) -> dict:
    """Return ``{"y", "mask", "lengths", "inputs", "extras"}`` from an .npz file (missing keys are None)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data: file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "y" not in f:
            raise DataError(f"--data: {path} has no array named 'y' (found {sorted(f.files)})")
        out = {k: (f[k] if k in f else None) for k in DATA_KEYS}
        out["extras"] = {k: f[k] for k in f.files if k not in DATA_KEYS}
    return out


def _parse_float(cell: str, where: str) -> float:
    if cell.strip() == "":
        return np.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"--data: {where}: expected a number, got {cell!r}") from None


def load_csv(
    path,
    *,
    trial_column: str = "trial",
    time_column: Optional[str] = None,
    obs_columns: Optional[Sequence[str]] = None,
    input_columns: Sequence[str] = (),
) -> dict:
    """Read a long-format CSV. Observation columns default to every column that is not trial/time/input."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data: file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"--data: {path} is empty") from None
        rows = [r for r in reader if any(c.strip() for c in r)]
    if trial_column not in header:
        raise DataError(f"--data: {path} has no trial column {trial_column!r} (columns: {header})")
    for c in [time_column, *input_columns, *(obs_columns or ())]:
        if c is not None and c not in header:
            raise DataError(f"--data: {path} has no column {c!r} (columns: {header})")
    skip = {trial_column, time_column, *input_columns}
    obs_columns = list(obs_columns) if obs_columns else [h for h in header if h not in skip]
    if not obs_columns:
        raise DataError(f"--data: {path} has no observation columns")
    col = {h: i for i, h in enumerate(header)}
    trials: dict[str, list] = {}
    for line_no, r in enumerate(rows, start=2):
        if len(r) != len(header):
            raise DataError(f"--data: {path} line {line_no}: expected {len(header)} cells, got {len(r)}")
        trials.setdefault(r[col[trial_column]].strip(), []).append((line_no, r))

    ys, us = [], []
    for trial_rows in trials.values():
        if time_column is not None:
            trial_rows = sorted(trial_rows, key=lambda lr: _parse_float(lr[1][col[time_column]], f"line {lr[0]}"))
        ys.append(np.array([[_parse_float(r[col[c]], f"line {n}, column {c}") for c in obs_columns] for n, r in trial_rows]))
        if input_columns:
            us.append(np.array([[_parse_float(r[col[c]], f"line {n}, column {c}") for c in input_columns] for n, r in trial_rows]))
    return {
        "y": ys,
        "mask": None,
        "lengths": None,
        "inputs": us if input_columns else None,
        "extras": {"trial_ids": np.array(list(trials.keys())), "obs_columns": np.array(obs_columns)},
    }


def load_data(path, **csv_options) -> dict:
    """Dispatch on the file suffix (.npz or .csv)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".csv":
        return load_csv(path, **csv_options)
    raise DataError(f"--data: expected a built-in dataset name, a .npz or a .csv file, got {path!r}")
