"""Sequence data in the layout every model uses, and its validation.

Observations are ``(trials, time, obs_dim)``. A single trial ``(time, obs_dim)`` is promoted to one trial;
ragged trials come as a list of ``(time_i, obs_dim)`` arrays (padded here) or as a padded array plus
``lengths``. Missing entries come as a boolean ``mask`` shaped like ``y`` (True = observed). Steps past a
trial's length are never observed. NaN placeholders under the mask are replaced by zeros so that they
never reach a likelihood or a gradient; a NaN or inf that the mask claims is observed is an error.

All checks run on host (NumPy) before anything is compiled, and every error names the argument.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

ArrayLike = Union[np.ndarray, Sequence]


class DataError(ValueError):
    """Raised for malformed data; the message names the argument and what was expected."""


class SequenceData(NamedTuple):
    """Padded, validated trials. A NamedTuple, so it is a JAX pytree (``inputs`` may be None).

    Attributes:
        y: (trials, time, obs_dim) float array; zeros where not observed.
        mask: (trials, time, obs_dim) bool, True where observed (False past each trial's length).
        lengths: (trials,) int, number of valid steps of each trial.
        inputs: (trials, time, input_dim) float array or None; zeros past each trial's length.
    """

    y: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    inputs: Optional[np.ndarray] = None

    @property
    def num_trials(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_timesteps(self) -> int:
        return int(self.y.shape[1])

    @property
    def obs_dim(self) -> int:
        return int(self.y.shape[2])

    @property
    def input_dim(self) -> int:
        return 0 if self.inputs is None else int(self.inputs.shape[2])

    @property
    def time_mask(self):
        """(trials, time) bool: True for steps inside each trial's length."""
        t = np.arange(self.y.shape[1]) if isinstance(self.lengths, np.ndarray) else None
        if t is None:  # traced: use jax.numpy
            import jax.numpy as jnp

            return jnp.arange(self.y.shape[1])[None, :] < self.lengths[:, None]
        return t[None, :] < self.lengths[:, None]

    @property
    def step_observed(self):
        """(trials, time) bool: True where at least one entry of the step is observed."""
        return self.mask.any(axis=-1)

    def trial(self, i: int) -> "SequenceData":
        """Trial ``i`` cut to its own length, as a one-trial SequenceData."""
        n = int(self.lengths[i])
        inputs = None if self.inputs is None else self.inputs[i : i + 1, :n]
        return SequenceData(self.y[i : i + 1, :n], self.mask[i : i + 1, :n], self.lengths[i : i + 1], inputs)


def _pad_list(arrays: Sequence, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Pad a list of (time_i, dim) arrays to (trials, max_time, dim); NaN marks the padding."""
    if len(arrays) == 0:
        raise DataError(f"{name}: expected at least one trial, got an empty list")
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    for i, a in enumerate(arrays):
        if a.ndim == 1:
            arrays[i] = a = a[:, None]
        if a.ndim != 2:
            raise DataError(f"{name}[{i}]: expected a (time, dim) array, got shape {a.shape}")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise DataError(f"{name}: every trial must have the same last dimension, got {sorted(dims)}")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    out = np.full((len(arrays), lengths.max(), dims.pop()), np.nan, dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out, lengths


def _as_3d(x, name: str, dtype) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Return (array of rank 3, lengths if x was a ragged list else None)."""
    if isinstance(x, (list, tuple)) and len(x) > 0 and np.ndim(x[0]) >= 1:
        shapes = {np.shape(a) for a in x}
        if len(shapes) > 1 or np.ndim(x[0]) == 2:
            return _pad_list(x, name, dtype)
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(
            f"{name}: expected shape (trials, time, dim) or (time, dim) or a list of (time, dim) arrays, "
            f"got shape {arr.shape}"
        )
    return arr, None


def as_sequence_data(
    y,
    *,
    mask=None,
    lengths=None,
    inputs=None,
    input_dim: Optional[int] = None,
    obs_dim: Optional[int] = None,
    counts: bool = False,
    binary: bool = False,
) -> SequenceData:
    """Validate and pad data into a :class:`SequenceData`.

    Args:
        y: (trials, time, obs_dim), (time, obs_dim), or a list of (time_i, obs_dim) arrays.
        mask: bool, same shape as (padded) ``y``; True = observed. NaN in ``y`` outside it is fine.
        lengths: (trials,) ints in [1, time]; inferred from a list ``y``.
        inputs: like ``y`` with input_dim columns, or None.
        input_dim: if given, the input dimension the model expects (0 means no inputs allowed).
        obs_dim: if given, the observation dimension the model expects.
        counts: observations must be non-negative integers (Poisson emissions).
        binary: observations must be 0 or 1 (Bernoulli emissions).
    """
    if isinstance(y, SequenceData):
        if mask is not None or lengths is not None:
            raise DataError("mask/lengths: pass them inside the SequenceData, not beside it")
        y, mask, lengths, inputs = y.y, y.mask, y.lengths, y.inputs if inputs is None else inputs
    y_arr, list_lengths = _as_3d(y, "y", np.float64)
    num_trials, num_steps, dim = y_arr.shape
    if num_steps < 1 or dim < 1:
        raise DataError(f"y: expected at least one time step and one dimension, got shape {y_arr.shape}")
    if obs_dim is not None and dim != obs_dim:
        raise DataError(f"y: the model expects obs_dim={obs_dim}, got last dimension {dim}")

    if lengths is None:
        lengths = list_lengths if list_lengths is not None else np.full(num_trials, num_steps)
    elif list_lengths is not None and not np.array_equal(np.asarray(lengths), list_lengths):
        raise DataError(f"lengths: {list(np.asarray(lengths))} disagrees with the list of trials {list(list_lengths)}")
    lengths = np.asarray(lengths)
    if lengths.ndim == 0:
        lengths = lengths[None]
    if lengths.shape != (num_trials,):
        raise DataError(f"lengths: expected shape ({num_trials},) (one per trial), got {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer) and not np.all(lengths == np.round(lengths)):
        raise DataError(f"lengths: expected integers, got {lengths}")
    lengths = lengths.astype(np.int32)
    if lengths.min() < 1 or lengths.max() > num_steps:
        raise DataError(f"lengths: expected values in [1, {num_steps}], got min {lengths.min()} max {lengths.max()}")
    in_length = np.arange(num_steps)[None, :, None] < lengths[:, None, None]

    if mask is None:
        mask_arr = np.broadcast_to(in_length, y_arr.shape) & ~np.isnan(y_arr)
    else:
        mask_arr, mask_lengths = _as_3d(mask, "mask", object)
        if mask_lengths is not None and not np.array_equal(mask_lengths, lengths):
            raise DataError(f"mask: a list of trials of lengths {mask_lengths.tolist()}, but the trials of y have "
                            f"lengths {lengths.tolist()}; pass one mask per trial, shaped like that trial of y")
        if mask_arr.shape[:2] != y_arr.shape[:2] or mask_arr.shape[2] not in (1, dim):
            raise DataError(f"mask: expected shape {y_arr.shape} (same as y), got {mask_arr.shape}")
        if mask_lengths is not None:  # a ragged list: its padding (NaN) is past each trial's end, unobserved
            mask_arr = np.where(in_length, mask_arr, False)
        mask_arr = np.where(mask_arr == None, False, mask_arr)  # noqa: E711  (None entries: unobserved)
        if not np.all(np.isin(mask_arr, [True, False, 0, 1])):
            raise DataError("mask: expected booleans (True = observed)")
        mask_arr = np.broadcast_to(mask_arr.astype(bool), y_arr.shape) & in_length
    mask_arr = np.ascontiguousarray(mask_arr)

    bad = mask_arr & ~np.isfinite(y_arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"y: {int(bad.sum())} entries marked observed are NaN or inf (first at trial, time, dim = {where}); "
            "mark them False in `mask` if they are missing"
        )
    hidden = ~mask_arr.any(axis=(1, 2))
    if hidden.any():
        raise DataError(f"mask: trial(s) {np.flatnonzero(hidden).tolist()} have no observed entry at all")
    y_clean = np.where(mask_arr, y_arr, 0.0)
    if counts:
        obs = y_clean[mask_arr]
        if (obs < 0).any() or not np.all(obs == np.round(obs)):
            raise DataError("y: Poisson emissions expect non-negative integer counts")
    if binary:
        obs = y_clean[mask_arr]
        if not np.all((obs == 0) | (obs == 1)):
            raise DataError("y: Bernoulli emissions expect 0/1 observations")

    inputs_arr = None
    if inputs is not None:
        inputs_arr, _ = _as_3d(inputs, "inputs", np.float64)
        if inputs_arr.shape[:2] != (num_trials, num_steps):
            raise DataError(
                f"inputs: expected shape ({num_trials}, {num_steps}, input_dim) to match y, got {inputs_arr.shape}"
            )
        valid = np.broadcast_to(in_length, inputs_arr.shape)
        if not np.isfinite(inputs_arr[valid]).all():
            raise DataError("inputs: NaN or inf inside the trials' lengths")
        inputs_arr = np.where(valid, inputs_arr, 0.0)
    if input_dim is not None:
        got = 0 if inputs_arr is None else inputs_arr.shape[2]
        if got != input_dim:
            raise DataError(f"inputs: the model expects input_dim={input_dim}, got {got}")
    return SequenceData(y_clean, mask_arr, lengths, inputs_arr)


def partly_observed_steps(mask) -> bool:
    """Whether some step of a (..., T, D) mask has observed and missing entries both (what the closed-form
    EMs with a full emission covariance check before compiling)."""
    mask = np.asarray(mask)
    return bool((mask.any(-1) & ~mask.all(-1)).any())


def interpolate_missing(data: SequenceData) -> SequenceData:
    """A fully observed copy of ``data`` (its mask True inside the trials; :func:`missing_share` says how
    much it filled): each dimension of each trial linearly interpolated in time between its
    observed entries (held constant before the first and after the last); a dimension a trial never
    observes takes that dimension's mean over all trials. For what needs every entry of a regressor (the
    GDM's F y_{t-1}, its data-driven start): the likelihood leaves missing entries out, not this.

    Raises:
        DataError: a dimension is observed at no step (nothing to fill it from).
    """
    inside = np.asarray(data.time_mask)
    observed = np.asarray(data.mask) & inside[..., None]
    y = np.array(data.y, float)
    never = ~observed.any((0, 1))
    if never.any():
        raise DataError(f"data: dimensions {np.flatnonzero(never).tolist()} are observed at no step; drop them")
    dim_means = np.nansum(np.where(observed, y, 0.0), (0, 1)) / observed.sum((0, 1))
    for trial, length in enumerate(np.asarray(data.lengths)):
        steps = np.arange(length)
        for n in range(data.obs_dim):
            seen = observed[trial, :length, n]
            if seen.all():
                continue
            y[trial, :length, n] = (np.interp(steps, steps[seen], y[trial, :length, n][seen]) if seen.any()
                                    else dim_means[n])
    filled = SequenceData(y=np.where(inside[..., None], y, 0.0), mask=np.broadcast_to(inside[..., None], y.shape).copy(),
                          lengths=np.asarray(data.lengths), inputs=data.inputs)
    return filled


def missing_share(data: SequenceData) -> float:
    """The share of entries inside the trials that are missing (mask False)."""
    inside = np.asarray(data.time_mask)
    missing = inside[..., None] & ~np.asarray(data.mask)
    return float(missing.sum() / max(inside.sum() * data.obs_dim, 1))


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """Return ``value`` as int, or raise naming ``name`` if it is not an integer >= minimum."""
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < minimum:
        raise DataError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)
