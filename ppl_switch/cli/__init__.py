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

Modules: ``checks`` (argument and file checks, UsageError), ``data`` (loading the data, building the
model), ``report`` (running a fit and reporting it), ``commands`` (the ``cmd_*`` functions), ``parser``
(the parser and its help texts). Importing the package loads neither JAX nor ``ppl_switch.infer``: the
commands import what they need when they run, so ``ppl-switch list`` and ``--help`` stay fast.
"""

from __future__ import annotations

import sys
import traceback

from ppl_switch.cli.checks import (
    MODEL_FLAGS,
    RUNNER_FAMILY,
    RUNNER_FLAGS,
    UsageError,
    check_model_options,
    one_line,
    runner_overrides,
    supported_methods,
)
from ppl_switch.cli.commands import cmd_demo, cmd_fit, cmd_list, cmd_plot, cmd_simulate, cmd_summary
from ppl_switch.cli.parser import make_parser
from ppl_switch.cli.report import diagnostic_summary, report_fit, run_fit
from ppl_switch.errors import FitError  # plain Python: costs the CLI no JAX import

__all__ = [
    "MODEL_FLAGS", "RUNNER_FAMILY", "RUNNER_FLAGS", "UsageError", "check_model_options", "cmd_demo", "cmd_fit",
    "cmd_list", "cmd_plot", "cmd_simulate", "cmd_summary", "diagnostic_summary", "main", "make_parser",
    "report_fit", "run_fit", "runner_overrides", "supported_methods",
]


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
            print(f"{prefix} {one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, NotImplementedError):  # a runner the model lacks, found late
            print(f"{prefix} {one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, FitError):
            print(f"{prefix} {one_line(err)}", file=sys.stderr)
            return 1
        hint = "" if args.debug or args.debug_main else " (rerun with --debug for the traceback)"
        print(f"{prefix} {type(err).__name__}: {one_line(err)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ppl-switch {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
