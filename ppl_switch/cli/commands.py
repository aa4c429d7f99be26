"""The subcommands (``cmd_*``, each called with the parsed arguments) and their settings and help texts."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
import warnings

import numpy as np

from ppl_switch.cli.checks import (
    NUTS_DEFAULT_CHAINS,
    UsageError,
    check_method,
    check_model_options,
    check_readable_file,
    check_writable,
    one_line,
    prepare_out_dir,
    runner_overrides,
)
from ppl_switch.cli.data import build_model, load_data_arg, model_without_data
from ppl_switch.cli.report import collect_warnings, report_fit, run_fit


def cmd_fit(args) -> None:
    # everything the arguments alone decide, before loading data (a built-in dataset is simulated) or compiling
    options = dict(args.option or [])
    check_method(args.model, args.method)
    from ppl_switch.models import model_options

    flags = {"num_states": args.num_states, "latent_dim": args.latent_dim}  # build_model notes and drops the others
    accepted = model_options(args.model)
    given = {**options, **{k: v for k, v in flags.items() if v is not None and k in accepted}}
    check_model_options(args.model, given)
    overrides = runner_overrides(args, args.method, model_without_data(args.model, given))
    out = check_writable(args.out, "--out")
    check_writable(out.with_name(out.name + ".json"), "--out")  # the sidecar beside it

    from ppl_switch.analysis.fit_fixed_points import add_fit_fixed_points

    data = load_data_arg(args.data, args.seed, args)
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
        reason = one_line(err)
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
