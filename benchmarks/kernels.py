"""Time the message-passing kernels (HMM and Kalman, sequential and parallel) against dynamax.

    python benchmarks/kernels.py                      # full sizes (T up to 1e5), writes benchmarks/kernels.json
    python benchmarks/kernels.py --max-T 10000 --repeats 3

Compile time is excluded (each kernel is called once, then timed); the figure is the median of repeats.
The markdown tables printed at the end are what benchmarks/results.md records, with the machine line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hmm_kernels  # noqa: E402
import kalman_kernels  # noqa: E402


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


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    """Pivot rows into one line per (keys..., T) with a column per impl and ratios ours/dynamax."""
    impls = sorted({r["impl"] for r in rows})
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), {})[r["impl"]] = r["seconds"]
    header = keys + [f"{i} (ms)" for i in impls]
    ratio_cols = [(ours, ref) for ours in impls if not ours.startswith("dynamax") for ref in impls if ref.startswith("dynamax")]
    ratio_cols = [(o, r) for o, r in ratio_cols if o.split("_")[-1] == r.split("_")[-1]]
    header += [f"{o}/{r}" for o, r in ratio_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, times in sorted(groups.items()):
        cells = [str(k) for k in key] + [f"{1e3 * times[i]:.3f}" if i in times else "-" for i in impls]
        cells += [f"{times[o] / times[r]:.2f}" if o in times and r in times else "-" for o, r in ratio_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-T", type=int, default=100_000, help="largest series length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["hmm", "kalman"], default=None)
    parser.add_argument("--out", default=str(Path(__file__).with_name("kernels.json")))
    args = parser.parse_args(argv)
    lengths = tuple(t for t in (100, 1_000, 10_000, 100_000) if t <= args.max_T)

    results = {"machine": machine_line(), "command": "python " + " ".join(sys.argv)}
    if args.only in (None, "hmm"):
        results["hmm"] = hmm_kernels.run(lengths=lengths, repeats=args.repeats)
    if args.only in (None, "kalman"):
        results["kalman"] = kalman_kernels.run(lengths=lengths, repeats=args.repeats)
    Path(args.out).write_text(json.dumps(results, indent=1))

    print(f"machine: {results['machine']}\ncommand: {results['command']}\n")
    if "hmm" in results:
        print(markdown_table(results["hmm"], ["kernel", "T"]) + "\n")
    if "kalman" in results:
        print(markdown_table(results["kalman"], ["kernel", "D", "N", "T"]))


if __name__ == "__main__":
    main()
