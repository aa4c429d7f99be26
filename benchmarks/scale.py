"""Scale-out benchmark: EM throughput on 1 device against N devices as the number of trials grows.

For each model (HMM EM, LDS EM, SLDS structured mean-field EM, rSLDS Laplace EM), trial count and device count (1 = ``devices=None``, the plain path; N =
``devices=N``, trials split over N devices, :mod:`ppl_switch.infer.sharding`), a fresh process simulates
the data (fixed seed: the same data for 1 and N devices), runs the EM once to compile it, then times a
second, identical run. Reported per row:

* ``trial-steps/s``: trials x T x E-steps of the timed run / its wall time (one restart; E-steps =
  iterations + 1; the loop may stop early on its tolerance, so the count is taken from the run);
* ``first s``: the first call (compilation included), ``run s``: the fastest of ``--repeat`` timed calls,
  ``cpu s``: the CPU time of that call (all threads): on N host devices about N x ``run s`` when the N
  cores are free for it, less when other processes share them;
* ``peak RSS MiB``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process (data, compilation and
  the run; on a GPU also the device's ``peak_bytes_in_use`` where the backend reports it).

``--check`` compares the 1- and N-device runs of each size: same iteration count, log-likelihood history
and parameters within rounding, and prints agree/DIFFER with the largest relative difference (to each
array's scale, see :func:`compare`). Float32: rtol 1e-3 -- the sums over 1e5-1e7 steps are added in another order on
N devices, and EM iterations amplify that (measured: 2e-4 on HMM means after 10 iterations at 100 x 1000);
``--x64`` runs in float64, rtol 1e-9 (measured there: 4e-14), which separates rounding from a real difference.

On a CPU the N devices are host devices (``--xla_force_host_platform_device_count=N``, set for the child
processes); ppl_switch runs XLA's CPU Eigen single-threaded (ppl_switch/__init__.py), so each host device
is one core's worth of work and N devices can use N cores.

    python benchmarks/scale.py                      # 100, 300, 1000 trials x T = 1000, N = cores
    python benchmarks/scale.py --check --trials 100 300 --iters 10
    python benchmarks/scale.py --big                # 1000, 3000, 10000 trials
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# child: one (model, trials, devices) configuration in a fresh process
# ----------------------------------------------------------------------------------------------


def _model(model_name: str):
    from ppl_switch.models import HMM, LDS, RSLDS, SLDS

    return {"hmm": lambda: HMM(num_states=3, obs_dim=2), "lds": lambda: LDS(latent_dim=2, obs_dim=4),
            "slds": lambda: SLDS(num_states=3, latent_dim=2, obs_dim=4),
            "rslds": lambda: RSLDS(num_states=3, latent_dim=2, obs_dim=4)}[model_name]()


def _simulate(model_name: str, num_trials: int, num_timesteps: int, seed: int = 0):
    """(N, T, D) float32 observations: a sticky 3-state Gaussian HMM (D = 2), a rotating 2-D LDS (D = 4), or
    draws of the SLDS / rSLDS itself (3 regimes, D = 2 latents, 4 observed) at parameters from its prior."""
    import numpy as np

    if model_name in ("slds", "rslds"):
        import jax

        data, _ = _model(model_name).simulate(jax.random.PRNGKey(seed), num_trials, num_timesteps)
        return np.asarray(data.y, np.float32)

    rng = np.random.default_rng(seed)
    N, T = num_trials, num_timesteps
    if model_name == "hmm":
        K = 3
        P = np.full((K, K), 0.05 / (K - 1)) + (0.95 - 0.05 / (K - 1)) * np.eye(K)
        means = np.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]])
        z = np.empty((N, T), np.int64)
        z[:, 0] = rng.integers(K, size=N)
        u = rng.random((N, T))
        cdf = np.cumsum(P, 1)
        for t in range(1, T):
            z[:, t] = (u[:, t, None] > cdf[z[:, t - 1]]).sum(1)
        return (means[z] + 0.7 * rng.normal(size=(N, T, 2))).astype(np.float32)
    theta = 0.1
    A = 0.98 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    C = rng.normal(size=(4, 2))
    x = np.empty((N, T, 2))
    x[:, 0] = rng.normal(size=(N, 2))
    for t in range(1, T):
        x[:, t] = x[:, t - 1] @ A.T + 0.3 * rng.normal(size=(N, 2))
    return (x @ C.T + 0.5 * rng.normal(size=(N, T, 4))).astype(np.float32)


def child(spec: dict) -> dict:
    import resource

    import jax
    import numpy as np

    from ppl_switch.infer.em import em_method

    name, N, T, ndev = spec["model"], spec["trials"], spec["timesteps"], spec["devices"]
    if spec.get("x64"):
        jax.config.update("jax_enable_x64", True)
    if ndev > len(jax.devices()):
        raise SystemExit(f"devices: {ndev} requested, JAX sees {len(jax.devices())}")
    model = _model(name)
    data = model.prepare(_simulate(name, N, T))
    kw = dict(num_iters=spec["iters"], num_restarts=1, key=jax.random.PRNGKey(0), devices=None if ndev == 1 else ndev)
    em = em_method(model)  # the library's EM (HMM: Baum-Welch, LDS: Kalman EM, SLDS: structured MF, rSLDS: Laplace)
    t0 = time.perf_counter()
    em(data, **kw)  # compiles
    first = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeat"]):  # the same program, cached; the fastest run (the machine may be shared)
        t0, c0 = time.perf_counter(), time.process_time()
        params, history = em(data, **kw)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    run, cpu = min(times)
    # E-steps: the SLDS EM runs all its iterations (its history has one objective per E-step)
    e_steps = int(history["num_iterations"]) + 1 if "num_iterations" in history else len(history["log_likelihoods"])
    out = {
        **spec,
        "first_s": first,
        "run_s": run,
        "cpu_s": cpu,
        "e_steps": e_steps,
        "trial_steps_per_s": N * T * e_steps / run,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "log_likelihoods": np.asarray(history["log_likelihoods"], float).tolist(),
        "params": {k: np.asarray(v, float).ravel().tolist() for k, v in params.items() if k not in ("x", "q_state_probs")},
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def run_child(spec: dict, num_host_devices: int, timeout: float) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={num_host_devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict, rtol: float = 1e-4) -> tuple[bool, str]:
    """Whether two runs agree: same E-steps; log-likelihood history within ``rtol`` of its largest |entry|;
    each parameter array within ``rtol`` of max(its largest |entry|, 1) (the simulated data are on a unit
    scale, so a parameter near 0, e.g. a bias, is compared at that scale, not at its own)."""
    import numpy as np

    if a["e_steps"] != b["e_steps"]:
        return False, f"E-steps {a['e_steps']} vs {b['e_steps']}"
    worst, where = 0.0, ""
    pairs = [("log_likelihoods", a["log_likelihoods"], b["log_likelihoods"])]
    pairs += [(k, a["params"][k], b["params"][k]) for k in a["params"]]
    for name, x, y in pairs:
        x, y = np.asarray(x), np.asarray(y)
        scale = np.max(np.abs(x)) if name == "log_likelihoods" else max(np.max(np.abs(x)), 1.0)
        err = float(np.max(np.abs(x - y)) / max(scale, 1e-30))
        if err > worst:
            worst, where = err, name
    return worst <= rtol, f"max relative difference {worst:.2e} ({where})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["hmm", "lds"], choices=["hmm", "lds", "slds", "rslds"])
    parser.add_argument("--trials", nargs="+", type=int, default=None, help="default 100 300 1000 (--big: 1000 3000 10000)")
    parser.add_argument("--big", action="store_true", help="1000, 3000 and 10000 trials")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=20, help="EM iterations (M-steps) per run")
    parser.add_argument("--devices", type=int, default=None, help="N (default: JAX's device count on an accelerator, else the CPU cores)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (the fastest is reported)")
    parser.add_argument("--x64", action="store_true", help="float64 (separates rounding from real differences in --check)")
    parser.add_argument("--check", action="store_true", help="print whether the 1- and N-device results agree")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--json", help="also write every row (with histories and parameters) to this file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    ndev = args.devices or os.cpu_count() or 1
    trials = args.trials or ([1000, 3000, 10000] if args.big else [100, 300, 1000])
    counts = [1] if ndev == 1 else [1, ndev]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start; "
          f"T = {args.timesteps}, {args.iters} EM iterations, 1 restart, {'float64' if args.x64 else 'float32'}, fastest of {args.repeat} runs")
    print("| model | trials | devices | trial-steps/s | speed-up | first s | run s | cpu s | E-steps | peak RSS MiB |" + (" agrees |" if args.check else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.check else ""))
    rows = []
    for name in args.models:
        for N in trials:
            base = None
            for n in counts:
                spec = {"model": name, "trials": N, "timesteps": args.timesteps, "iters": args.iters, "devices": n,
                        "repeat": args.repeat, "x64": args.x64}
                r = run_child(spec, ndev, args.timeout)
                rows.append(r)
                if "error" in r:
                    print(f"| {name} | {N} | {n} | error: {r['error']} |")
                    continue
                speed = "" if base is None else f"{r['trial_steps_per_s'] / base['trial_steps_per_s']:.2f}x"
                check = ""
                if args.check:
                    rtol = 1e-9 if args.x64 else 1e-3
                    check = "" if base is None else (lambda ok, msg: f" {'agree' if ok else 'DIFFER'}: {msg} |")(*compare(base, r, rtol))
                    check = check or " (baseline) |"
                mem = f"{r['peak_rss_mib']:.0f}" + (f" (device {r['device_peak_mib']:.0f})" if "device_peak_mib" in r else "")
                print(f"| {name} | {N} | {n} | {r['trial_steps_per_s']:.3g} | {speed or '1x'} | {r['first_s']:.1f} | "
                      f"{r['run_s']:.2f} | {r['cpu_s']:.2f} | {r['e_steps']} | {mem} |{check}", flush=True)
                if n == 1:
                    base = r
    done = [r for r in rows if "error" not in r]
    if done:
        print(f"# jax {done[0]['jax']}, platform {done[0]['platform']} ({done[0]['device_kind']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
