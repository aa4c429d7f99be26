"""The ``ppl-switch`` argument parser and its help texts (those that read signatures are computed when shown)."""

from __future__ import annotations

import argparse
import inspect
import json

from ppl_switch.cli.checks import METHODS, NUTS_DEFAULT_CHAINS
from ppl_switch.cli.commands import DEMO, FIT_OUTPUT, cmd_demo, cmd_fit, cmd_list, cmd_plot, cmd_simulate, cmd_summary


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
