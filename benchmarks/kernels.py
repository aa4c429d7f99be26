"""Time the message-passing kernels (HMM and Kalman, sequential and parallel) against dynamax.

    python benchmarks/kernels.py                                   # all sizes, writes benchmarks/kernels.json
    python benchmarks/kernels.py --only hmm --max-T 10000 --repeats 3
    python benchmarks/kernels.py --only kalman --interleave 4 2 10000 --repeats 30   # D N T, one process

Each (family, size, T, implementation) runs in its own subprocess with a time-out (``--timeout``), so an
implementation that hangs or runs out of memory is recorded as such and the run goes on (jaxlib's
batched LAPACK hung inside dynamax's parallel Kalman smoother with jaxlib 0.10). In the subprocess each kernel is
jit-compiled and called once (compile time excluded), then called ``--repeats`` times; we record the
median and the minimum wall-clock time and the minimum process CPU time per call. On a shared machine
the CPU time is the steadiest figure (XLA runs single-threaded on CPU here: ``import ppl_switch``
disables Eigen's thread pool). The markdown tables printed at the end are what benchmarks/results.md
records, with the machine line.

On a GPU, where starting the device in each subprocess would dominate, ``--one-process-per-size`` times the
implementations alternately with every length of a size in one subprocess and reports wall times (set
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that the parent and child processes share the device):

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/kernels.py --one-process-per-size --repeats 10 --repeats-long 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
HMM_SIZES = ((25,),)  # K
KALMAN_SIZES = ((4, 2), (10, 50))  # (D, N)
IMPLS = ("ours_seq", "dynamax_seq", "ours_par", "dynamax_par")


def machine_line() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    devices = ", ".join(str(d) for d in jax.devices())
    return f"{cpu}; {os.cpu_count()} cores; jax {jax.__version__}; devices: {devices}"


def time_call(fn: Callable, args: tuple, repeats: int) -> dict:
    """Compile with one call, then time ``repeats`` calls (seconds): median/min wall, min CPU."""
    import jax

    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_median": statistics.median(wall), "wall_min": min(wall), "cpu_min": min(cpu)}


def _load_problem(family: str, size: tuple[int, ...], num_timesteps: int):
    """(the ``{family}_kernels`` module, its problem's arguments) with the repository importable."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ppl_switch  # noqa: F401  (sets the single-threaded Eigen flag before any compilation)

    module = __import__(f"{family}_kernels")
    return module, module.problem(num_timesteps, *size)


def worker(family: str, impl: str, size: tuple[int, ...], num_timesteps: int, repeats: int) -> list[dict]:
    """Time both kernels of one implementation at one size; runs inside the subprocess."""
    import jax

    module, args = _load_problem(family, size, num_timesteps)
    return [
        {"family": family, "kernel": kernel, "impl": impl, "size": list(size), "T": num_timesteps,
         **time_call(jax.jit(fn), args, repeats)}
        for kernel, fn in module.kernels(impl).items()
    ]


def interleaved(family: str, size: tuple[int, ...], num_timesteps: int, repeats: int, impls=IMPLS) -> list[dict]:
    """Time the kernels of ``impls`` alternately in this process, the order rotating by one each repeat (seconds per call: min CPU time, min and
    median wall time): on a loaded machine this compares implementations under the same conditions, at the
    risk of a hang. An implementation whose kernels cannot be built or compiled (dynamax missing, or broken
    by the installed jax) becomes rows with ``"failed"`` set; the others are still timed."""
    import jax

    module, args = _load_problem(family, size, num_timesteps)
    fns, rows, outputs = {}, [], {}
    for impl in impls:
        try:
            built = {(impl, k): jax.jit(fn) for k, fn in module.kernels(impl).items()}
            for key, fn in built.items():
                outputs[key] = jax.block_until_ready(fn(*args))
        except Exception as err:  # noqa: BLE001  (recorded in the row, the other implementations go on)
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            rows += [{"family": family, "kernel": k, "impl": impl, "size": list(size), "T": num_timesteps,
                      "failed": message} for k in ("filter", "smoother")]
            continue
        fns.update(built)
    cpu = {key: [] for key in fns}
    wall = {key: [] for key in fns}
    order = list(fns.items())
    for repeat in range(repeats):
        # the order rotates: a call right after the parallel kernels runs ~0.7 ms slower (measured on jax 0.12.1,
        # HMM K = 25, T = 1e4, whichever implementation took that place), so no kernel may always hold it
        shift = repeat % len(order)
        for key, fn in order[shift:] + order[:shift]:
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    rows += [
        {"family": family, "kernel": k, "impl": impl, "size": list(size), "T": num_timesteps,
         "cpu_min": min(cpu[impl, k]), "wall_min": min(wall[impl, k]), "wall_median": statistics.median(wall[impl, k])}
        for impl, k in fns
    ]
    for row in rows:  # the parallel kernels' largest deviation from the sequential ones, on this device and dtype
        if row["impl"] == "ours_par" and ("ours_seq", row["kernel"]) in outputs and "failed" not in row:
            pairs = zip(jax.tree.leaves(outputs["ours_seq", row["kernel"]]), jax.tree.leaves(outputs["ours_par", row["kernel"]]))
            row["max_abs_diff_vs_seq"] = max(float(abs(a - b).max()) for a, b in pairs)
    return rows


def sweep_worker(family: str, size: tuple[int, ...], lengths: list[int], repeats: int, repeats_long: int,
                 impls) -> None:
    """:func:`interleaved` at every length in one process (one device start-up per size, which dominates on
    a GPU); prints one JSON line per length as soon as it is timed."""
    for T in lengths:
        rows = interleaved(family, tuple(size), T, repeats if T < 100_000 else repeats_long, impls)
        print(json.dumps(rows), flush=True)


def run_sweep(family: str, size, lengths, repeats: int, repeats_long: int, impls, timeout: float) -> list[dict]:
    """:func:`sweep_worker` in a subprocess; what it printed before a time-out or crash is kept."""
    spec = json.dumps([family, list(size), list(lengths), repeats, repeats_long, list(impls)])
    try:
        done = subprocess.run([sys.executable, __file__, "--sweep-worker", spec], capture_output=True, text=True,
                              timeout=timeout)
        stdout, failed = done.stdout, None if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired as err:
        partial = err.stdout or ""
        stdout = partial.decode() if isinstance(partial, bytes) else partial
        failed = f"timed out after {timeout:.0f} s"
    rows = [row for line in stdout.splitlines() if line.startswith("[") for row in json.loads(line)]
    if failed:
        print(f"  {family} size={size}: {failed} after {len(rows)} rows", file=sys.stderr, flush=True)
    return rows


def run_isolated(family: str, impl: str, size, num_timesteps: int, repeats: int, timeout: float) -> list[dict]:
    """:func:`worker` in a subprocess; a time-out or crash becomes a row with ``"failed"`` set."""
    spec = json.dumps([family, impl, list(size), num_timesteps, repeats])
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout:.0f} s"
    else:
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        failed = f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
    print(f"  {family} {impl} size={size} T={num_timesteps}: {failed}", file=sys.stderr, flush=True)
    return [{"family": family, "kernel": k, "impl": impl, "size": list(size), "T": num_timesteps, "failed": failed}
            for k in ("filter", "smoother")]


def markdown_table(rows: list[dict], field: str) -> str:
    """One line per (kernel, size, T): ``field`` in ms per implementation, then ours/dynamax ratios."""
    cells: dict[tuple, dict[str, str | float]] = {}
    for r in rows:
        key = (r["kernel"], tuple(r["size"]), r["T"])
        cells.setdefault(key, {})[r["impl"]] = "failed" if "failed" in r else r[field]
    header = ["kernel", "size", "T"] + [f"{i} (ms)" for i in IMPLS] + ["seq ours/dynamax", "par ours/dynamax",
                                                                      "ours seq/par"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ms(v):
        return "-" if v is None else (v if isinstance(v, str) else f"{1e3 * v:.2f}")

    def ratio(a, b):
        return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"

    for (kernel, size, T), t in sorted(cells.items()):
        line = [kernel, "x".join(map(str, size)), str(T)] + [ms(t.get(i)) for i in IMPLS]
        line += [ratio(t.get("ours_seq"), t.get("dynamax_seq")), ratio(t.get("ours_par"), t.get("dynamax_par")),
                 ratio(t.get("ours_seq"), t.get("ours_par"))]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["hmm", "kalman"], default=None)
    parser.add_argument("--max-T", type=int, default=100_000, help="largest series length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per implementation and size")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=str(Path(__file__).with_name("kernels.json")))
    parser.add_argument("--interleave", nargs="+", type=int, metavar="N",
                        help="SIZE... T: time the --impls of --only alternately in one process")
    parser.add_argument("--field", default="cpu_min", choices=["cpu_min", "wall_min", "wall_median"],
                        help="what --interleave tabulates (wall times are steadier than CPU time for sub-ms calls)")
    parser.add_argument("--one-process-per-size", action="store_true",
                        help="time the --impls alternately, all lengths of a size in one process (use on a GPU, where "
                             "the device start-up dominates; tables then give wall times)")
    parser.add_argument("--repeats-long", type=int, default=None, help="repeats at T = 1e5 (default: --repeats)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.sweep_worker:
        sweep_worker(*json.loads(args.sweep_worker))
        return
    if args.interleave:
        rows = interleaved(args.only or "hmm", tuple(args.interleave[:-1]), args.interleave[-1], args.repeats, args.impls)
        print(markdown_table(rows, args.field))
        return

    lengths = [t for t in (100, 1_000, 10_000, 100_000) if t <= args.max_T]
    families = {"hmm": HMM_SIZES, "kalman": KALMAN_SIZES}
    rows = []
    results = {"machine": machine_line(), "command": "python " + " ".join(sys.argv), "rows": rows}
    for family, sizes in families.items():
        if args.only not in (None, family):
            continue
        for size in sizes:
            if args.one_process_per_size:
                rows += run_sweep(family, size, lengths, args.repeats, args.repeats_long or args.repeats, args.impls,
                                  args.timeout)
                Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later size is cut short
                continue
            for T in lengths:
                for impl in args.impls:
                    rows += run_isolated(family, impl, size, T, args.repeats, args.timeout)
                    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nmachine: {results['machine']}\ncommand: {results['command']}")
    for field in ("wall_median", "wall_min") if args.one_process_per_size else ("cpu_min", "wall_median"):
        for family in families:
            family_rows = [r for r in rows if r["family"] == family]
            if family_rows:
                print(f"\n{family}, {field}\n" + markdown_table(family_rows, field))


if __name__ == "__main__":
    main()
