"""Fixed costs of a fit: where the CPU time of a small fit goes, and how often JAX traces and compiles.

    python benchmarks/fixed_cost.py                 # SVI (20 steps), NUTS (tiny), EM on the 3 x 200 HMM
    python benchmarks/fixed_cost.py --runners svi   # only SVI

For each runner the fit runs twice on the same data with a *new* model instance of the same config: the
first fit pays every trace and compile, the second should reuse them (module-level caches keyed by the
model's config, shapes and dtype). Each stage is timed in process CPU seconds (all threads) and wall
seconds by wrapping the library functions of that stage; "rest" is the fit's total minus its stages.
Traces and compiles are counted with JAX's own monitoring events (``jaxpr_trace_duration``,
``backend_compile_duration``), and ``program`` counts Python executions of ``HMM.program`` (every trace
of it, abstract or not).

The ratio printed for SVI is the issue's target: total CPU of the fit / CPU of its SVI steps (the jitted
chunks of steps, their one compile included), to be <= 3.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
import warnings

import jax
import jax.monitoring
import numpy as np

from ppl_switch import datasets
em_mod = importlib.import_module("ppl_switch.infer.em")
fit_mod = importlib.import_module("ppl_switch.infer.fit")  # (ppl_switch.infer.fit is the function)
nuts_mod = importlib.import_module("ppl_switch.infer.nuts")
svi_mod = importlib.import_module("ppl_switch.infer.svi")
from ppl_switch.models import HMM

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"


class Counter:
    """Counts JAX traces/compiles (and their seconds) and stage CPU/wall times while active."""

    def __init__(self):
        self.events = {_TRACE: [0, 0.0], _COMPILE: [0, 0.0]}
        self.stages: dict[str, list[float]] = {}
        self.program_calls = 0
        self.active = False

    def listener(self, event, duration, **_):
        if self.active and event in self.events:
            self.events[event][0] += 1
            self.events[event][1] += duration

    def add(self, stage, cpu, wall):
        row = self.stages.setdefault(stage, [0.0, 0.0, 0])
        row[0] += cpu
        row[1] += wall
        row[2] += 1


COUNTER = Counter()
jax.monitoring.register_event_duration_secs_listener(COUNTER.listener)


def timed(stage, fn):
    def wrapper(*args, **kwargs):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTER.add(stage, time.process_time() - c0, time.perf_counter() - w0)

    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def patched(targets):
    """targets: [(owner, attribute, stage)]; wraps each with ``timed`` for the duration."""
    saved = []
    for owner, attr, stage in targets:
        original = getattr(owner, attr)
        saved.append((owner, attr, original))
        setattr(owner, attr, timed(stage, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def _chunk_runner_timed(make):
    def wrapper(*args, **kwargs):
        return timed("SVI steps", make(*args, **kwargs))

    return wrapper


def _count_program(cls):
    original = cls.program

    def program(self, *args, **kwargs):
        COUNTER.program_calls += 1
        return original(self, *args, **kwargs)

    return original, program


ASSEMBLY = [
    (fit_mod, "relabel_draws", "relabel"),
    (fit_mod, "pointwise_log_likelihood", "log-likelihood"),
    (fit_mod, "posterior_predictive_draws", "predictive"),
    (fit_mod, "posterior_states", "posterior states"),
    (fit_mod, "build_inference_data", "InferenceData"),
]
STAGES = {
    "svi": [
        (svi_mod, "prepare_data", "prepare data"),
        (svi_mod, "data_scale_warnings", "data checks"),
        (svi_mod.SVI, "init", "SVI.init"),
        (svi_mod, "posterior_site_names", "site names"),
        (svi_mod, "draws_from_guide", "draws from guide"),
        (svi_mod, "guide_median", "guide median"),
        *ASSEMBLY,
    ],
    "nuts": [
        (nuts_mod, "prepare_data", "prepare data"),
        (nuts_mod, "data_scale_warnings", "data checks"),
        (nuts_mod, "posterior_site_names", "site names"),
        (nuts_mod.MCMC, "run", "MCMC.run"),
        (nuts_mod, "_convergence", "R-hat/ESS"),
        *ASSEMBLY,
    ],
    "em": [
        (em_mod, "prepare_data", "prepare data"),
        (em_mod, "data_scale_warnings", "data checks"),
        (HMM, "em", "model.em"),
        *ASSEMBLY,
    ],
}
RUNS = {
    "svi": lambda m, y: svi_mod.fit_svi(m, y, num_steps=20, seed=0, progress_bar=False),
    "nuts": lambda m, y: nuts_mod.fit_nuts(m, y, num_warmup=20, num_samples=20, num_chains=1, seed=0, progress_bar=False),
    "em": lambda m, y: em_mod.fit_em(m, y, seed=0, num_iters=20),
}


def measure(runner: str, y: np.ndarray, repeat: int = 2) -> list[dict]:
    """Fit ``repeat`` times (a new HMM(3, obs_dim=2) each time); per fit the stage table and counts."""
    rows = []
    original, counted = _count_program(HMM)
    HMM.program = counted
    try:
        for _ in range(repeat):
            global COUNTER
            COUNTER.stages, COUNTER.program_calls = {}, 0
            COUNTER.events = {_TRACE: [0, 0.0], _COMPILE: [0, 0.0]}
            targets = STAGES[runner]
            extra = [(svi_mod, "_make_chunk_runner", None)] if runner == "svi" else []
            saved_make = svi_mod._make_chunk_runner
            if extra:
                svi_mod._make_chunk_runner = _chunk_runner_timed(saved_make)
            COUNTER.active = True
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                with patched(targets), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fit = RUNS[runner](HMM(3, obs_dim=2), y)
            finally:
                COUNTER.active = False
                svi_mod._make_chunk_runner = saved_make
            total = (time.process_time() - c0, time.perf_counter() - w0)
            rows.append(
                {
                    "total": total,
                    "stages": dict(COUNTER.stages),
                    "traces": tuple(COUNTER.events[_TRACE]),
                    "compiles": tuple(COUNTER.events[_COMPILE]),
                    "program": COUNTER.program_calls,
                    "fit": fit,
                }
            )
    finally:
        HMM.program = original
    return rows


def report(runner: str, rows: list[dict]) -> None:
    names = list(dict.fromkeys(name for row in rows for name in row["stages"]))
    print(f"\n== {runner}: HMM(3, obs_dim=2), 3 trials x 200 steps; CPU s / wall s per fit (fit 1 = cold, fit 2 = same config, new model)")
    header = f"{'stage':<20}" + "".join(f"{'fit ' + str(i + 1) + ' cpu':>12}{'wall':>8}" for i in range(len(rows)))
    print(header)
    for name in names:
        line = f"{name:<20}"
        for row in rows:
            cpu, wall, _ = row["stages"].get(name, (0.0, 0.0, 0))
            line += f"{cpu:>12.2f}{wall:>8.2f}"
        print(line)
    line = f"{'rest':<20}"
    for row in rows:
        cpu = row["total"][0] - sum(v[0] for v in row["stages"].values())
        wall = row["total"][1] - sum(v[1] for v in row["stages"].values())
        line += f"{cpu:>12.2f}{wall:>8.2f}"
    print(line)
    line = f"{'TOTAL':<20}" + "".join(f"{row['total'][0]:>12.2f}{row['total'][1]:>8.2f}" for row in rows)
    print(line)
    for key, label in (("traces", "jit traces"), ("compiles", "XLA compiles")):
        print(f"{label:<20}" + "".join(f"{row[key][0]:>12d}{row[key][1]:>7.1f}s" for row in rows))
    print(f"{'program runs':<20}" + "".join(f"{row['program']:>12d}{'':>8}" for row in rows))
    if runner == "svi":
        for i, row in enumerate(rows):
            steps = row["stages"]["SVI steps"][0]
            print(f"fit {i + 1}: total CPU / SVI-steps CPU = {row['total'][0]:.2f} / {steps:.2f} = {row['total'][0] / steps:.2f} (target <= 3)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", nargs="+", default=["svi", "nuts", "em"], choices=sorted(RUNS))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    y = datasets.simulate("hmm", seed=0)["y"]
    print(f"jax {jax.__version__}, devices {jax.devices()}, y {y.shape} {y.dtype}, x64={jax.config.jax_enable_x64}")
    for runner in args.runners:
        report(runner, measure(runner, y, args.repeat))


if __name__ == "__main__":
    main()
