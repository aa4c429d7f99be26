"""The cost of a user's first fit of a model: one fresh process, nothing compiled before.

    python benchmarks/first_fit.py slds                 # the model's example_config, 2 trials x 12 steps, 20 SVI steps
    python benchmarks/first_fit.py clds --x64
    python benchmarks/first_fit.py hmm --runner nuts    # fit_nuts' defaults (2 chains, "sequential"), 20 + 20 steps
    python benchmarks/first_fit.py hmm --runner nuts --num-chains 1
    python benchmarks/first_fit.py slds --programs 5    # also the 5 programs that took longest to compile
    python benchmarks/first_fit.py hmm --runner nuts --datasets 3   # then 2 more datasets of the same shapes

Prints the wall seconds of the runner (after imports and the simulation), how many XLA compilations it made
and their seconds (JAX's ``backend_compile_duration`` events), and the first and last loss (SVI) or the
chains' mean log densities (NUTS), so that a change to the set-up can be checked to leave the numbers alone.
With ``--datasets N`` the same fit then runs on N - 1 more simulated datasets (seeds 1, 2, ...) of the same
shapes, as a user fitting the next subject would: each line says what that fit compiled.
The shapes are those of the conformance suite's fixtures (tests/test_conformance.py), whose first fit per
model dominates the default test run.
Compare two commits by running this from a worktree of each on the same idle machine.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.monitoring

from ppl_switch.infer.nuts import DEFAULT_NUM_CHAINS, fit_nuts
from ppl_switch.infer.svi import fit_svi
from ppl_switch.models import MODELS
from ppl_switch.results import get_group

_COMPILE = "/jax/core/compile/backend_compile_duration"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--x64", action="store_true", help="float64 (the conformance suite's precision)")
    parser.add_argument("--runner", choices=("svi", "nuts"), default="svi")
    parser.add_argument("--num-chains", type=int, default=DEFAULT_NUM_CHAINS, help="NUTS chains")
    parser.add_argument("--programs", type=int, default=0, help="list the N programs that took longest to compile")
    parser.add_argument("--datasets", type=int, default=1, help="fit N datasets of the same shapes, one after another")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)
    cls = MODELS[args.model]
    model = cls(**(cls.example_config or {}))
    compiles, fits_compiled = [], []  # (seconds, program name): all, and those of the fits (not the simulations)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, fun_name="", **_: compiles.append((duration, fun_name)) if event == _COMPILE else None)
    for dataset in range(args.datasets):
        data, _ = model.simulate(jax.random.PRNGKey(dataset), 2, 12)
        before = len(compiles)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 20 steps: "still moving" (SVI), R-hat and ESS (NUTS) are expected
            if args.runner == "svi":
                fit = fit_svi(model, data, num_steps=20, num_draws=8, seed=0, progress_bar=False)
                numbers = f"loss first/last {fit.losses[0]:.4f} {fit.losses[-1]:.4f}"
            else:
                fit = fit_nuts(model, data, num_warmup=20, num_samples=20, num_chains=args.num_chains, seed=0,
                               progress_bar=False)
                lp = get_group(fit.idata, "sample_stats")["lp"].values
                numbers = f"{args.num_chains} chain(s), mean log density per chain {[round(float(v), 3) for v in lp.mean(1)]}"
        wall = time.perf_counter() - start
        made = compiles[before:]
        fits_compiled += made
        which = "first" if dataset == 0 else f"dataset {dataset}:"
        print(f"{args.model} ({'float64' if args.x64 else 'float32'}, jax {jax.__version__}): {which} fit_{args.runner} "
              f"{wall:.1f} s; {len(made)} XLA compilations, {sum(t for t, _ in made):.1f} s; {numbers}")
    for seconds, name in sorted(fits_compiled, reverse=True)[:args.programs]:
        print(f"  {seconds:6.2f} s  {name}")


if __name__ == "__main__":
    main()
