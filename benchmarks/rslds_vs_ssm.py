"""rSLDS fast path against the rSLDS authors' package on its own NASCAR recipe, same arrays, same machine.

Data: :func:`ppl_switch.datasets.rslds_nascar.simulate_reference_nascar` -- the recipe of the recurrent
SLDS NASCAR example of the authors' package (K = 4, D = 2, N = 10, recurrent-only transitions, diagonal
Gaussian dynamics with variance 1e-4, orthonormal emission columns, emission variance 1e-2), simulated
with our own code. Ours: the default path, ``fit_em(RSLDS(4, 2, obs_dim=10, transitions="recurrent_only"), y)``
with the model's default iterations and starts (float32 unless ``--x64``). Theirs (optional, needs a
separate environment with the package, see ``--ssm-python``): the example's own settings --
``SLDS(10, 4, 2, transitions="recurrent_only", dynamics="diagonal_gaussian", emissions="gaussian_orthog")``,
``initialize(y)`` (PCA, then an ARHMM fitted by 25 EM iterations), then 100 iterations of Laplace EM with
a structured mean-field posterior, ``alpha=0``; states by its Viterbi path at the posterior mean.
Both are scored by state accuracy after permutation matching against the simulated states. Times: wall
(``wall_s``, compilation and our ArviZ output included) and CPU seconds of the process (``cpu_s``, all
threads; on a machine shared with other jobs the fairer comparison).

Usage:
    python benchmarks/rslds_vs_ssm.py --seeds 0 1 2                       # ours only
    python benchmarks/rslds_vs_ssm.py --seeds 0 --ssm-python /tmp/ssm-venv/bin/python
Prints one JSON line per seed and method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

# run by the other package's interpreter: reads y from an .npz, writes the decoded states and wall times
SSM_SCRIPT = r"""
import json, sys, time
import numpy as np
import numpy.random as npr
import ssm
path, out, iters, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
npr.seed(seed)
y = np.load(path)["y"]
t0, c0 = time.perf_counter(), time.process_time()
model = ssm.SLDS(y.shape[1], 4, 2, transitions="recurrent_only", dynamics="diagonal_gaussian",
                 emissions="gaussian_orthog", single_subspace=True)
model.initialize(y)
t1, c1 = time.perf_counter(), time.process_time()
elbos, q = model.fit(y, method="laplace_em", variational_posterior="structured_meanfield", initialize=False,
                     num_iters=iters, alpha=0.0)
t2, c2 = time.perf_counter(), time.process_time()
xhat = q.mean_continuous_states[0]
zhat = model.most_likely_states(xhat, y)
np.savez(out, z=zhat, x=xhat, elbos=np.asarray(elbos))
print(json.dumps({"initialize_s": t1 - t0, "laplace_em_s": t2 - t1, "cpu_s": c2 - c0}))
"""


def run_ours(y, seed: int, x64: bool, num_iters=None, num_restarts=None) -> dict:
    from ppl_switch.infer import fit_em
    from ppl_switch.models.rslds import RSLDS

    kw = {k: v for k, v in (("num_iters", num_iters), ("num_restarts", num_restarts)) if v is not None}
    model = RSLDS(4, 2, obs_dim=y.shape[-1], transitions="recurrent_only")
    t0, c0 = time.perf_counter(), time.process_time()
    fit = fit_em(model, y, seed=seed, x64=x64, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"z": fit.samples["q_state_probs"][0, 0, 0].argmax(-1), "x": fit.samples["x"][0, 0, 0], "wall_s": wall, "cpu_s": cpu,
            "num_iterations": int(fit.diagnostics.get("num_iterations", -1)),
            "failed_starts": list(fit.diagnostics.get("failed_starts", []))}


def run_ssm(python: str, y, seed: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "y.npz"), os.path.join(tmp, "out.npz")
        np.savez(path, y=y)
        t0 = time.perf_counter()
        proc = subprocess.run([python, "-c", SSM_SCRIPT, path, out, str(iters), str(seed)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"--ssm-python run failed:\n{proc.stderr[-2000:]}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        res = np.load(out)
        return {"z": res["z"], "x": res["x"], "wall_s": times["initialize_s"] + times["laplace_em_s"], "process_wall_s": wall, **times}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--T", type=int, default=10000)
    ap.add_argument("--x64", action="store_true", help="our fit in float64 (default float32, as users run)")
    ap.add_argument("--iters", type=int, default=None, help="our iterations (default: the model's default)")
    ap.add_argument("--restarts", type=int, default=None, help="our starts (default: the model's default)")
    ap.add_argument("--ssm-python", default=None, help="python of an environment with the authors' package `ssm`")
    ap.add_argument("--ssm-iters", type=int, default=100)
    ap.add_argument("--skip-ours", action="store_true")
    args = ap.parse_args(argv)

    from ppl_switch.analysis.metrics import affine_aligned_r2, matched_state_accuracy
    from ppl_switch.datasets.rslds_nascar import simulate_reference_nascar

    for seed in args.seeds:
        d = simulate_reference_nascar(seed=seed, num_timesteps=args.T)
        y, z_true, x_true = d["y"][0], d["states"][0], d["latents"][0]
        runs = []
        if not args.skip_ours:
            runs.append(("ppl_switch", run_ours(y, seed, args.x64, args.iters, args.restarts)))
        if args.ssm_python:
            runs.append(("ssm", run_ssm(args.ssm_python, y, seed, args.ssm_iters)))
        for name, r in runs:
            row = {"method": name, "seed": seed, "T": args.T, "state_accuracy": matched_state_accuracy(z_true, r["z"], 4),
                   "latent_r2": affine_aligned_r2(r["x"], x_true), "wall_s": round(r["wall_s"], 1)}
            row.update({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k not in ("z", "x", "wall_s")})
            if name == "ppl_switch":
                row.update(x64=args.x64, iters=args.iters or "default", restarts=args.restarts or "default")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
