"""Robustness suite: every model's default path (``ppl_switch.fit(model, y, ...)``) on simulated data across
regimes nobody tuned it for (issue 24 item 4).

A *cell* is one model x one setting of the axes below x one precision; each cell is fitted on several
seeds. Every (cell, seed) runs in a fresh subprocess (clean float32/float64 state; a crash or a hang is
contained by a per-fit timeout) and appends one JSON line to ``--out``; a rerun skips the (cell, seed)
pairs already there, so an interrupted run resumes. ``--report`` prints the per-cell markdown table.

Axes (which apply depends on the model, see ``GRIDS``):
    noise    observation noise sd                   T        time steps per trial
    K        discrete states                        latent   continuous latent dimension
    obs      observed dimension                     missing  share of entries hidden (mask False, y NaN)
    ragged   three trials of lengths T, 0.7T, 0.4T given as a list of arrays (else one trial)
    dtype    float32 (users' default) or float64 (``x64=True``)

Generators (true parameters known; the noise axis sets the observation noise of each):
    hmm, arhmm, lds   the model's own ``simulate`` with ``default_params`` and its noise scale replaced
    slds              the SLDS tutorial's system (ppl_switch.datasets.slds_tutorial; K = 2, D = 2) with the
                      emission noise redrawn at sd ``noise`` (the tutorial's own is sqrt(0.2) = 0.447); obs > 2
                      maps x through a random (obs, 2) matrix
    rslds             the rSLDS NASCAR lane track (datasets.rslds_nascar, K = 4, D = 2), emission_noise = noise
    gdm               the GDM paper's NASCAR track (datasets.nascar, K = 4), noise_std = noise (standard: 0.01)

Per fit: ``status`` (ok | nonfinite | refused: a FitError naming its stage | rejected: a ValueError on
input the generator made valid | error: any other exception | crash: the subprocess died | timeout),
state accuracy after matching (ppl_switch.analysis.metrics.matched_state_accuracy, over the steps
inside each trial), latent R² after affine alignment (models with a continuous latent), fit.warnings,
convergence diagnostics, wall and CPU seconds (the fit only, data and imports excluded).

Targets (issue 24): every fit finite or refused with a named error; >= 95% of target cells at the
model's accuracy bar (``BARS``; a cell is at the bar when the mean accuracy of its seeds is).

Usage:
    python benchmarks/robustness.py --preset quick --out benchmarks/robustness.jsonl --budget 45
    python benchmarks/robustness.py --models hmm --noise 0.1 1 --T 100 --seeds 0 1 2 --dtype float32
    python benchmarks/robustness.py --report --out benchmarks/robustness.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

AXES = ("noise", "T", "K", "latent", "obs", "missing", "ragged", "dtype")

#: per model: the values of every axis in the full grid (an axis with one value does not apply)
GRIDS: dict[str, dict[str, list]] = {
    "hmm": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000, 10000], K=[2, 4, 6], latent=[0], obs=[2, 10, 50],
                missing=[0.0, 0.2], ragged=[False, True], dtype=["float32", "float64"]),
    "arhmm": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000, 10000], K=[2, 4, 6], latent=[0], obs=[2, 10, 50],
                  missing=[0.0, 0.2], ragged=[False, True], dtype=["float32", "float64"]),
    "lds": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000, 10000], K=[1], latent=[2, 3, 4], obs=[2, 10, 50],
                missing=[0.0, 0.2], ragged=[False, True], dtype=["float32", "float64"]),
    "slds": dict(noise=[0.01, 0.1, 0.447, 1.0], T=[100, 1000, 10000], K=[2], latent=[2], obs=[2, 10, 50],
                 missing=[0.0, 0.2], ragged=[False, True], dtype=["float32", "float64"]),
    "rslds": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000, 10000], K=[4], latent=[2], obs=[2, 10, 50],
                  missing=[0.0, 0.2], ragged=[False], dtype=["float32", "float64"]),
    "gdm": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000, 10000], K=[4], latent=[2], obs=[10, 50],
                missing=[0.0, 0.2], ragged=[False], dtype=["float32", "float64"]),
}

#: the representative slice this machine can run: noise x T in {100, 1000} x one K x 0/20% missing x
#: both precisions, one trial; 3 seeds
QUICK: dict[str, dict[str, list]] = {
    "hmm": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000], K=[4], latent=[0], obs=[2], missing=[0.0, 0.2],
                ragged=[False], dtype=["float32", "float64"]),
    "arhmm": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000], K=[2], latent=[0], obs=[2], missing=[0.0, 0.2],
                  ragged=[False], dtype=["float32", "float64"]),
    "lds": dict(noise=[0.01, 0.1, 1.0], T=[100, 1000], K=[1], latent=[2], obs=[10], missing=[0.0, 0.2],
                ragged=[False], dtype=["float32", "float64"]),
    "slds": dict(noise=[0.01, 0.1, 0.447, 1.0], T=[1000], K=[2], latent=[2], obs=[2], missing=[0.0, 0.2],
                 ragged=[False], dtype=["float32", "float64"]),
    "rslds": dict(noise=[0.01, 0.1, 1.0], T=[1000], K=[4], latent=[2], obs=[10], missing=[0.0, 0.2],
                  ragged=[False], dtype=["float32", "float64"]),
    "gdm": dict(noise=[0.01, 0.1, 1.0], T=[1000], K=[4], latent=[2], obs=[10], missing=[0.0, 0.2],
                ragged=[False], dtype=["float32", "float64"]),
}
QUICK_SEEDS = [0, 1, 2]
MODEL_ORDER = ("hmm", "arhmm", "lds", "slds", "rslds", "gdm")

#: state-accuracy bar per model, and which cells it is a target for (issue 24)
BARS = {"hmm": 0.95, "arhmm": 0.95, "slds": 0.85, "rslds": 0.95, "gdm": 0.85}
SLDS_TUTORIAL_NOISE = 0.447  # sqrt(0.2), the tutorial's emission sd


def is_target(cell: dict) -> bool:
    """Is the accuracy bar a target for this cell? HMM/ARHMM: everywhere; SLDS: at the tutorial's noise;
    rSLDS: its NASCAR track (every cell); GDM: the standard NASCAR noise (0.01)."""
    model = cell["model"]
    if model == "slds":
        return abs(cell["noise"] - SLDS_TUTORIAL_NOISE) < 1e-6
    if model == "gdm":
        return cell["noise"] == 0.01
    return model in BARS


# ---------------------------------------------------------------------------------------------------------
# cells


def cell_key(cell: dict) -> str:
    """A stable string naming a cell (model and every axis)."""
    return "|".join([cell["model"]] + [f"{a}={cell[a]}" for a in AXES])


def expand(grid: dict[str, dict[str, list]], models, overrides: Optional[dict] = None) -> list[dict]:
    """The cells of ``grid`` for ``models`` (in ``MODEL_ORDER``), with axis values replaced by
    ``overrides`` (only where the axis applies to the model: a one-value axis keeps its value)."""
    cells = []
    for model in [m for m in MODEL_ORDER if m in models]:
        axes = dict(grid[model])
        for axis, values in (overrides or {}).items():
            if values is not None and len(GRIDS[model][axis]) > 1:
                axes[axis] = list(values)
        for combo in itertools.product(*(axes[a] for a in AXES)):
            cells.append({"model": model, **dict(zip(AXES, combo))})
    return cells


# ---------------------------------------------------------------------------------------------------------
# data


def _trial_lengths(cell: dict) -> list[int]:
    T = int(cell["T"])
    return [T, max(2, int(0.7 * T)), max(2, int(0.4 * T))] if cell["ragged"] else [T]


def _from_model_simulate(model, seed: int, lengths: list[int], noise_params) -> dict:
    """Draw from ``model.simulate`` with ``default_params`` and the noise replaced (float32 draws, so a
    seed names one data set whatever the precision of the fit)."""
    import jax

    with jax.enable_x64(False):
        key_params, key_data = jax.random.split(jax.random.PRNGKey(seed))
        params = noise_params(dict(model.default_params(key_params)))
        data, truth = model.simulate(key_data, len(lengths), max(lengths), params=params)
    return {"y": np.asarray(data.y, float), "states": truth.get("states"), "latents": truth.get("latents")}


def simulate_cell(cell: dict, seed: int) -> dict:
    """Data of one (cell, seed): ``y`` (B, T, N) float64, ``lengths`` (B,), ``states`` (B, T) or None,
    ``latents`` (B, T, H) or None, and ``mask`` (B, T, N) bool or None (missing entries hold NaN in y)."""
    model_name, noise, K, H, N = cell["model"], float(cell["noise"]), int(cell["K"]), int(cell["latent"]), int(cell["obs"])
    lengths = _trial_lengths(cell)
    rng = np.random.default_rng([seed, 7919])  # the mask's and the extra noise's own stream
    if model_name == "hmm":
        from ppl_switch.models.hmm import HMM

        def set_noise(p):
            p["scales"] = p["scales"] * 0 + noise
            p["scale_tril"] = p["scales"][..., :, None] * p["corr_cholesky"]
            return p

        out = _from_model_simulate(HMM(K, N), seed, lengths, set_noise)
    elif model_name == "arhmm":
        from ppl_switch.models.arhmm import ARHMM

        out = _from_model_simulate(ARHMM(K, N), seed, lengths, lambda p: dict(p, scales=p["scales"] * 0 + noise))
    elif model_name == "lds":
        from ppl_switch.models.lds import LDS

        out = _from_model_simulate(LDS(H, N), seed, lengths,
                                   lambda p: dict(p, emission_scales=p["emission_scales"] * 0 + noise))
    elif model_name == "slds":
        from ppl_switch.datasets.slds_tutorial import simulate_slds_tutorial

        d = simulate_slds_tutorial(seed=seed, num_trials=len(lengths), num_timesteps=max(lengths))
        C = np.eye(2) if N == 2 else rng.standard_normal((N, 2)) / np.sqrt(2)
        y = d["latents"] @ C.T + noise * rng.standard_normal(d["latents"].shape[:2] + (N,))
        out = {"y": y, "states": d["states"], "latents": d["latents"]}
    elif model_name == "rslds":
        from ppl_switch.datasets.rslds_nascar import simulate_rslds_nascar

        d = simulate_rslds_nascar(seed=seed, num_timesteps=max(lengths), obs_dim=N, emission_noise=noise)
        out = {"y": d["y"], "states": d["states"], "latents": d["latents"]}
    elif model_name == "gdm":
        from ppl_switch.datasets.nascar import nascar

        r = nascar(seed, num_timesteps=max(lengths), obs_dim=N, noise_std=noise)
        out = {"y": r.y[None], "states": r.states[None], "latents": r.latents[None]}
    else:
        raise ValueError(f"model: expected one of {MODEL_ORDER}, got {model_name!r}")
    y = np.array(out["y"], float)
    lengths_arr = np.array(lengths, int)
    inside = np.arange(y.shape[1])[None, :] < lengths_arr[:, None]
    mask = None
    if cell["missing"] > 0:
        mask = rng.random(y.shape) >= cell["missing"]
        mask[:, 0, :] = True  # never hide a whole trial's first step (keeps every trial visible)
        mask &= inside[..., None]
        y = np.where(mask, y, np.nan)
    states = None if out.get("states") is None else np.asarray(out["states"])
    latents = None if out.get("latents") is None else np.asarray(out["latents"], float)
    return {"y": y, "lengths": lengths_arr, "mask": mask, "states": states, "latents": latents}


def make_model(cell: dict):
    """The model a cell fits (its default configuration at the cell's sizes)."""
    name, K, H, N = cell["model"], int(cell["K"]), int(cell["latent"]), int(cell["obs"])
    if name == "hmm":
        from ppl_switch.models.hmm import HMM

        return HMM(K, N)
    if name == "arhmm":
        from ppl_switch.models.arhmm import ARHMM

        return ARHMM(K, N)
    if name == "lds":
        from ppl_switch.models.lds import LDS

        return LDS(H, N)
    if name == "slds":
        from ppl_switch.models.slds import SLDS

        return SLDS(K, H, obs_dim=N)
    if name == "rslds":
        from ppl_switch.models.rslds import RSLDS

        return RSLDS(K, H, obs_dim=N, transitions="recurrent_only")
    if name == "gdm":
        from ppl_switch.models.gdm import GDM

        return GDM(K, H, obs_dim=N)
    raise ValueError(f"model: expected one of {MODEL_ORDER}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------
# one fit (runs inside the subprocess)


def _as_user_data(sim: dict, cell: dict):
    """(y, mask) as a user passes them: a list of arrays for ragged trials, else (1, T, N) arrays."""
    y, mask, lengths = sim["y"], sim["mask"], sim["lengths"]
    if cell["ragged"]:
        return [y[b, :n] for b, n in enumerate(lengths)], (None if mask is None else [mask[b, :n] for b, n in enumerate(lengths)])
    return y, mask


def _decoded_states(fit) -> Optional[np.ndarray]:
    """(B, T) most probable state per step: the posterior_states group's marginals, or (GDM) the argmax of
    the relaxed one-hot ``z``."""
    from ppl_switch.results import get_group

    try:
        probs = np.asarray(get_group(fit.idata, "posterior_states")["state_probs"].values)
        return probs.argmax(-1)
    except (KeyError, AttributeError, TypeError, ValueError):
        z = fit.point_estimate().get("z")
        return None if z is None else np.asarray(z).argmax(-1)


def _fitted_latents(fit, cell: dict) -> Optional[np.ndarray]:
    """(B, T, H) posterior mean latent path, where the model has one."""
    if cell["model"] == "lds":
        params = {k: np.asarray(v) for k, v in fit.point_estimate().items()}
        return np.asarray(fit.model.latent_posterior(params, fit.data)["means"])
    x = fit.point_estimate().get("x")
    return None if x is None or cell["model"] == "gdm" else np.asarray(x)


def _finite(tree) -> bool:
    for value in tree.values():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return False
    return True


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array{value.shape}"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)[:200]


def run_fit(cell: dict, seed: int, **overrides) -> dict:
    """Simulate (cell, seed), fit it by ``ppl_switch.fit`` (the model's recommended runner, or the
    ``overrides`` of it) in this process, and measure; returns the JSON-able record."""
    import jax

    import ppl_switch
    from ppl_switch.analysis.metrics import affine_aligned_r2, matched_state_accuracy
    from ppl_switch.errors import FitError

    x64 = cell["dtype"] == "float64"
    sim = simulate_cell(cell, seed)
    model = make_model(cell)
    y, mask = _as_user_data(sim, cell)
    record: dict[str, Any] = {"cell": cell_key(cell), **cell, "seed": seed, "jax": jax.__version__}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # they are in fit.warnings
            fit = ppl_switch.fit(model, y, mask=mask, seed=seed, x64=x64, progress_bar=False, **overrides)
    except FitError as err:
        record.update(status="refused", error=f"FitError: {err}"[:500], stage=getattr(err, "step", None))
        return _timed(record, t0, c0)
    except ValueError as err:
        record.update(status="rejected", error=f"{type(err).__name__}: {err}"[:500])
        return _timed(record, t0, c0)
    except Exception as err:  # noqa: BLE001  reported, not hidden
        record.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
        return _timed(record, t0, c0)
    _timed(record, t0, c0)
    estimate = fit.point_estimate()
    finite = _finite(estimate) and _finite(fit.samples)
    record["status"] = "ok" if finite else "nonfinite"
    record["nonfinite_sites"] = sorted(k for k, v in estimate.items() if np.asarray(v).dtype.kind in "fc"
                                       and not np.all(np.isfinite(np.asarray(v))))
    lengths = sim["lengths"]
    inside = np.arange(sim["y"].shape[1])[None, :] < lengths[:, None]
    if sim["states"] is not None and finite:
        z_hat = _decoded_states(fit)
        if z_hat is not None:
            z_hat = np.asarray(z_hat).reshape(len(lengths), -1)[:, : inside.shape[1]]
            record["state_accuracy"] = matched_state_accuracy(sim["states"][inside], z_hat[inside], int(cell["K"]))
    if sim["latents"] is not None and finite:
        x_hat = _fitted_latents(fit, cell)
        if x_hat is not None:
            x_hat = np.asarray(x_hat).reshape(len(lengths), inside.shape[1], -1)
            record["latent_r2"] = affine_aligned_r2(x_hat[inside], sim["latents"][inside])
    diag = fit.diagnostics
    record["warnings"] = [str(w)[:300] for w in fit.warnings]
    record["diagnostics"] = _jsonable({k: diag[k] for k in ("converged", "num_iterations", "num_steps", "restart_objectives",
                                                            "failed_starts", "start", "projection") if k in diag})
    record["runner"] = fit.config.get("runner")
    return record


def _timed(record: dict, t0: float, c0: float) -> dict:
    record.setdefault("wall_s", round(time.perf_counter() - t0, 2))
    record.setdefault("cpu_s", round(time.process_time() - c0, 2))
    return record


# ---------------------------------------------------------------------------------------------------------
# the runner (parent process)


def done_pairs(path: str) -> set[tuple[str, int]]:
    """(cell key, seed) pairs already recorded in ``path``."""
    if not os.path.exists(path):
        return set()
    out = set()
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out.add((rec["cell"], int(rec["seed"])))
    return out


def _env(cache_dir: Optional[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if cache_dir:  # compiled programs are shared between the fresh processes of cells with the same shapes
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def fit_in_subprocess(cell: dict, seed: int, *, timeout: float, cache_dir: Optional[str] = None) -> dict:
    """Run :func:`run_fit` in a fresh interpreter; a crash or a timeout becomes a record too."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({"cell": cell, "seed": seed})]
    t0 = time.perf_counter()
    base = {"cell": cell_key(cell), **cell, "seed": seed}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(cache_dir))
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "error": f"no result within {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {**base, "status": "crash", "error": f"exit {proc.returncode}: " + " | ".join(tail)[:500],
            "wall_s": round(time.perf_counter() - t0, 1)}


def run_grid(cells: list[dict], seeds: list[int], out: str, *, timeout: float, budget_min: Optional[float],
             cache_dir: Optional[str], log=print) -> int:
    """Fit every (cell, seed) not yet in ``out``, seed-major within a cell; stop starting new fits once
    ``budget_min`` minutes have passed. Returns the number of fits run."""
    done = done_pairs(out)
    start, count = time.perf_counter(), 0
    for cell in cells:
        for seed in seeds:
            if (cell_key(cell), seed) in done:
                continue
            if budget_min is not None and time.perf_counter() - start > 60 * budget_min:
                log(f"budget of {budget_min} min spent after {count} fits; rerun the same command to resume")
                return count
            rec = fit_in_subprocess(cell, seed, timeout=timeout, cache_dir=cache_dir)
            with open(out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            count += 1
            acc = rec.get("state_accuracy")
            r2 = rec.get("latent_r2")
            log(f"{rec['cell']} seed={seed}: {rec['status']}"
                + (f" acc={acc:.3f}" if acc is not None else "") + (f" r2={r2:.4f}" if r2 is not None else "")
                + f" wall={rec.get('wall_s')}s" + (f" [{rec['error'][:120]}]" if rec.get("error") else ""))
    return count


# ---------------------------------------------------------------------------------------------------------
# report


def load_records(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarise(records: list[dict]) -> list[dict]:
    """One row per cell: fits, finite/refused/failed counts, accuracy and R² (mean, min), the bar, wall."""
    by_cell: dict[str, list[dict]] = {}
    for rec in records:
        by_cell.setdefault(rec["cell"], []).append(rec)
    rows = []
    for key, recs in by_cell.items():
        cell = {a: recs[0][a] for a in ("model",) + AXES}
        statuses = [r["status"] for r in recs]
        acc = [r["state_accuracy"] for r in recs if r.get("state_accuracy") is not None]
        r2 = [r["latent_r2"] for r in recs if r.get("latent_r2") is not None]
        bar = BARS.get(cell["model"])
        mean_acc = float(np.mean(acc)) if acc else None
        rows.append({
            **cell, "cell": key, "fits": len(recs), "seeds": sorted(r["seed"] for r in recs),
            "ok": statuses.count("ok"), "refused": statuses.count("refused") + statuses.count("rejected"),
            "failed": sum(s in ("nonfinite", "error", "crash", "timeout") for s in statuses),
            "acc_mean": mean_acc, "acc_min": min(acc) if acc else None,
            "r2_mean": float(np.mean(r2)) if r2 else None, "r2_min": min(r2) if r2 else None,
            "bar": bar, "target": is_target(cell),
            "at_bar": None if bar is None or mean_acc is None else mean_acc >= bar,
            "warned": sum(bool(r.get("warnings")) for r in recs),
            "wall_median": float(np.median([r["wall_s"] for r in recs if r.get("wall_s") is not None] or [np.nan])),
            "errors": sorted({r["error"][:160] for r in recs if r.get("error")}),
        })
    return rows


def _fmt(v, spec=".3f"):
    return "" if v is None else format(v, spec)


def report(records: list[dict]) -> str:
    """The markdown table per cell, then per model: share of fits finite or refused, share of target
    cells at the bar."""
    rows = summarise(records)
    lines = ["| model | noise | T | K | latent | obs | missing | ragged | dtype | seeds | ok / refused / failed "
             "| state acc mean (min) | bar | latent R² mean (min) | fits with warnings | median wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    rows.sort(key=lambda r: (order[r["model"]], r["dtype"], r["T"], r["noise"], r["missing"], r["obs"], r["K"], r["latent"]))
    for r in rows:
        acc = "" if r["acc_mean"] is None else f"{r['acc_mean']:.3f} ({r['acc_min']:.3f})"
        bar = "" if r["bar"] is None else (f"{r['bar']:.2f}" + (" target" if r["target"] else "") + (
            "" if r["at_bar"] is None else (" met" if r["at_bar"] else " **not met**")))
        r2 = "" if r["r2_mean"] is None else f"{r['r2_mean']:.4f} ({r['r2_min']:.4f})"
        lines.append(f"| {r['model']} | {r['noise']} | {r['T']} | {r['K'] if r['model'] != 'lds' else ''} | "
                     f"{r['latent'] or ''} | {r['obs']} | {r['missing']:.0%} | {'yes' if r['ragged'] else 'no'} | "
                     f"{r['dtype']} | {','.join(map(str, r['seeds']))} | {r['ok']} / {r['refused']} / {r['failed']} | "
                     f"{acc} | {bar} | {r2} | {r['warned']} | {r['wall_median']:.1f} |")
    lines.append("")
    lines.append("| model | fits | finite or refused (named) | failed (NaN, error, crash, timeout) | target cells at bar (of those with an accuracy) |")
    lines.append("|---|---|---|---|---|")
    for model in MODEL_ORDER:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        fits = sum(r["fits"] for r in mrows)
        good = sum(r["ok"] + r["refused"] for r in mrows)
        failed = sum(r["failed"] for r in mrows)
        targets = [r for r in mrows if r["target"] and r["at_bar"] is not None]
        unmeasured = sum(r["target"] and r["at_bar"] is None for r in mrows)  # every fit refused or failed
        at = f"{sum(r['at_bar'] for r in targets)} / {len(targets)}" if targets else "n/a"
        at += f" (+{unmeasured} without an accuracy)" if unmeasured else ""
        lines.append(f"| {model} | {fits} | {good} ({good / fits:.0%}) | {failed} | {at} |")
    errors = sorted({(r["model"], e) for r in rows for e in r["errors"]})
    if errors:
        lines.append("")
        lines.append("Errors and refusals (distinct messages):")
        for model, e in errors:
            lines.append(f"- {model}: `{e}`")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["quick", "full"], default="quick", help="quick: QUICK slice; full: GRIDS")
    ap.add_argument("--models", nargs="+", default=list(MODEL_ORDER), choices=list(MODEL_ORDER))
    ap.add_argument("--noise", type=float, nargs="+")
    ap.add_argument("--T", type=int, nargs="+")
    ap.add_argument("--K", type=int, nargs="+")
    ap.add_argument("--latent", type=int, nargs="+")
    ap.add_argument("--obs", type=int, nargs="+")
    ap.add_argument("--missing", type=float, nargs="+")
    ap.add_argument("--ragged", choices=["no", "yes"], nargs="+")
    ap.add_argument("--dtype", choices=["float32", "float64"], nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (quick), 0..4 (full)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "robustness.jsonl"))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per fit (subprocess killed after)")
    ap.add_argument("--budget", type=float, default=None, help="minutes; no new fit starts after")
    ap.add_argument("--cache-dir", default=os.path.join("/tmp", "ppl_switch_robustness_jax_cache"),
                    help="JAX persistent compilation cache shared by the fits ('' for none)")
    ap.add_argument("--list", action="store_true", help="print the cells and exit")
    ap.add_argument("--report", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error("--timeout: expected seconds > 0")
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget: expected minutes > 0")
    if args.missing and any(not 0 <= m < 1 for m in args.missing):
        ap.error("--missing: expected shares in [0, 1)")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_fit(job["cell"], int(job["seed"]))), flush=True)
        return 0
    if args.report:
        print(report(load_records(args.out)))
        return 0
    grid = QUICK if args.preset == "quick" else GRIDS
    overrides = {a: getattr(args, a) for a in ("noise", "T", "K", "latent", "obs", "missing", "dtype")}
    if args.ragged:
        overrides["ragged"] = [v == "yes" for v in args.ragged]
    cells = expand(grid, args.models, overrides)
    seeds = args.seeds or (QUICK_SEEDS if args.preset == "quick" else [0, 1, 2, 3, 4])
    if args.list:
        for cell in cells:
            print(cell_key(cell))
        print(f"{len(cells)} cells x {len(seeds)} seeds")
        return 0
    run_grid(cells, seeds, args.out, timeout=args.timeout, budget_min=args.budget, cache_dir=args.cache_dir or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
