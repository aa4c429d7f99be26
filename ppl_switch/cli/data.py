"""The data and the model of ``ppl-switch fit``: a built-in dataset or a .npz / .csv file, and the model
built from the command-line options with the dims the data determine."""

from __future__ import annotations

import numpy as np

from ppl_switch.cli.checks import UsageError, check_csv_columns, check_data, check_model_options, check_npz_arrays


def model_without_data(name: str, options: dict):
    """Model ``name`` built from the command-line options alone (the data's dims left to their defaults):
    bad option values fail here, before the data is loaded, and its recommended runner is known."""
    from ppl_switch.models import get_model

    return get_model(name, **options)


def load_data_arg(spec: str, seed: int, args) -> dict:
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
