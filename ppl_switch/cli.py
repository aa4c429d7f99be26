"""The ``ppl-switch`` command line: simulate, fit, summary, plot, demo, list.

    ppl-switch demo                                   # simulate, fit, write fit.nc and a figure
    ppl-switch simulate hmm --out data.npz
    ppl-switch fit hmm --data data.npz --num-states 3 --method nuts --seed 0 --out fit.nc
    ppl-switch summary fit.nc
    ppl-switch plot fit.nc --out fit.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _parse_option(text: str) -> tuple[str, object]:
    """``name=value`` with value parsed as JSON where possible (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option: expected name=value, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.replace("-", "_"), value


def _load_data_arg(spec: str, seed: int, args) -> dict:
    from ppl_switch import datasets

    if spec in datasets.DATASETS:
        return datasets.simulate(spec, seed=seed)
    csv_options = {}
    if spec.lower().endswith(".csv"):
        csv_options = {"trial_column": args.trial_column, "time_column": args.time_column,
                       "input_columns": tuple(args.input_columns or ())}
    return datasets.load_data(spec, **csv_options)


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
    y = data["y"]
    obs_dim = (y[0] if isinstance(y, list) else np.asarray(y)).shape[-1]
    if "obs_dim" in accepted:
        kwargs.setdefault("obs_dim", int(obs_dim))
    inputs = data.get("inputs")
    if inputs is not None and "input_dim" in accepted:
        kwargs.setdefault("input_dim", int((inputs[0] if isinstance(inputs, list) else np.asarray(inputs)).shape[-1]))
    return get_model(name, **kwargs)


def run_fit(model, data: dict, method: str, *, seed: int, quiet: bool, args) -> object:
    from ppl_switch import infer

    common = dict(mask=data.get("mask"), lengths=data.get("lengths"), inputs=data.get("inputs"), seed=seed)
    if method == "svi":
        return infer.fit_svi(model, data["y"], num_steps=args.num_steps, learning_rate=args.learning_rate,
                             num_draws=args.num_draws, progress_bar=not quiet, x64=args.x64, **common)
    if method == "nuts":
        return infer.fit_nuts(model, data["y"], num_warmup=args.num_warmup, num_samples=args.num_samples,
                              num_chains=args.num_chains, progress_bar=not quiet, x64=args.x64, **common)
    if method == "em":
        return infer.fit_em(model, data["y"], num_iters=args.num_iters, **common)
    raise ValueError(f"--method: expected one of svi, nuts, em, got {method!r}")


def cmd_fit(args) -> None:
    from ppl_switch.analysis.fit_fixed_points import add_fit_fixed_points

    data = _load_data_arg(args.data, args.seed, args)
    model = build_model(args.model, data, num_states=args.num_states, latent_dim=args.latent_dim,
                        options=dict(args.option or []))
    start = time.perf_counter()
    fit = run_fit(model, data, args.method, seed=args.seed, quiet=args.quiet, args=args)
    fit.idata = add_fit_fixed_points(fit)  # the derived fixed_points group, for models that have fixed points
    fit.save(args.out)
    print(f"fitted {args.model} with {args.method} in {time.perf_counter() - start:.1f} s; wrote {args.out}")


FIT_OUTPUT = """output groups: posterior, log_likelihood (trial, time), posterior_predictive, observed_data,
constant_data, sample_stats (nuts); posterior_states (state_probs: trial, time, state) for models with
discrete or relaxed states; fixed_points for models with fixed points (at zero additive input):
  lds            fixed_point (chain, draw, latent)
  slds, rslds    fixed_point (chain, draw, state, latent)
  arhmm          fixed_point (chain, draw, state, obs)
  gdm            fixed_point (chain, draw, state, latent) in the projected space F y; fixed_point_obs (..., obs)
  clds           fixed_point (chain, draw, condition, latent) on a grid over the observed inputs
  gpslds, gpsde  fixed_point (sample, root, latent); a flow_field group when latent_dim = 2
  hmm            no fixed_points group"""


def cmd_simulate(args) -> None:
    from ppl_switch import datasets

    options = dict(args.option or [])
    out = datasets.simulate(args.name, seed=args.seed, **options)
    np.savez(args.out, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {np.shape(v)}" for k, v in out.items()))


def cmd_summary(args) -> None:
    import arviz as az

    from ppl_switch.results import load_inference_data

    idata = load_inference_data(args.fit)
    with np.printoptions(linewidth=200):
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.width", 200):
            print(az.summary(idata, var_names=args.var_names, kind="stats" if args.stats_only else "all"))


def cmd_plot(args) -> None:
    from ppl_switch.plots import plot_fit
    from ppl_switch.results import load_inference_data

    idata = load_inference_data(args.fit)
    plot_fit(idata, args.out, trial=args.trial)
    print(f"wrote {args.out}")


def cmd_demo(args) -> None:
    """Simulate a 3-state HMM dataset, fit it with NUTS, write the InferenceData and a figure."""
    from ppl_switch import datasets
    from ppl_switch.analysis.metrics import matched_state_accuracy
    from ppl_switch.plots import plot_fit
    from ppl_switch.results import get_group

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = datasets.simulate("hmm", seed=args.seed)
    model = build_model("hmm", data, num_states=3)
    print(f"simulated 'hmm': y {data['y'].shape} (trials, time, obs); fitting {model.name} with NUTS ...")
    args.num_warmup, args.num_samples, args.num_chains, args.x64 = 300, 300, 1, False
    fit = run_fit(model, data, "nuts", seed=args.seed, quiet=args.quiet, args=args)
    fit_path, fig_path = out_dir / "fit.nc", out_dir / "fit.png"
    fit.save(fit_path)
    plot_fit(fit.idata, str(fig_path), true_states=data["states"])
    probs = np.asarray(get_group(fit.idata, "posterior_states")["state_probs"])
    accuracy = matched_state_accuracy(data["states"], probs.argmax(-1), num_states=model.num_states)
    divergences = int(np.asarray(get_group(fit.idata, "sample_stats")["diverging"]).sum())
    print(f"state accuracy (after matching labels) {accuracy:.3f}; divergences {divergences}")
    print(f"wrote {fit_path} (InferenceData) and {fig_path} in {time.perf_counter() - start:.1f} s")


def cmd_list(args) -> None:
    from ppl_switch import datasets
    from ppl_switch.models import MODELS

    print("models:   " + ", ".join(sorted(MODELS)))
    print("datasets:")
    for name, (_, _, model, description) in sorted(datasets.DATASETS.items()):
        print(f"  {name:<18} for {model:<8} {description}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-switch", description="Switching and latent dynamical systems in NumPyro.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="simulate, fit with NUTS, write fit.nc and fit.png")
    p.add_argument("--out-dir", default="ppl_switch_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write a built-in dataset to .npz")
    p.add_argument("name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--option", type=_parse_option, action="append", help="simulator option name=value")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fit", help="fit a model and write InferenceData (.nc)", epilog=FIT_OUTPUT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="a built-in dataset name, a .npz or a .csv file")
    p.add_argument("--method", choices=["svi", "nuts", "em"], default="svi")
    p.add_argument("--num-states", type=int)
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--option", type=_parse_option, action="append", help="model option name=value (repeatable)")
    p.add_argument("--num-steps", type=int, default=2000, help="SVI steps")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="SVI learning rate")
    p.add_argument("--num-draws", type=int, default=200, help="SVI: posterior draws from the fitted guide")
    p.add_argument("--num-warmup", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-chains", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=100, help="EM iterations")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--trial-column", default="trial", help="CSV: the column naming the trial")
    p.add_argument("--time-column", default=None, help="CSV: sort each trial's rows by this column")
    p.add_argument("--input-columns", nargs="*", help="CSV: columns that are inputs, not observations")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("summary", help="ArviZ summary table of a fit")
    p.add_argument("fit")
    p.add_argument("--var-names", nargs="*")
    p.add_argument("--stats-only", action="store_true")
    p.add_argument("--max-rows", type=int, default=60)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("plot", help="figure of a fit: observations, predictive band, states")
    p.add_argument("fit")
    p.add_argument("--out", required=True)
    p.add_argument("--trial", type=int, default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("list", help="list models and built-in datasets")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv=None) -> int:
    from ppl_switch.data import DataError

    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, ValueError) as err:
        print(f"ppl-switch {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
