"""Running a fit with the chosen method, and reporting it: its warnings and a one-line diagnostic summary."""

from __future__ import annotations

import contextlib
import sys
import warnings

import numpy as np

from ppl_switch.cli.checks import METHODS, UsageError


def run_fit(model, data: dict, method: str, *, seed: int, quiet: bool, x64: bool = False, overrides=None):
    """Fit with ``method`` ("auto" = ``ppl_switch.infer.fit``, the model's recommended method). ``overrides``
    (the runner flags given) go to the runner; anything not given keeps the runner's default."""
    from ppl_switch import infer

    common = dict(mask=data.get("mask"), lengths=data.get("lengths"), inputs=data.get("inputs"), seed=seed, x64=x64)
    overrides = dict(overrides or {})
    if method == "auto":
        return infer.fit(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "svi":
        return infer.fit_svi(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "nuts":
        return infer.fit_nuts(model, data["y"], progress_bar=not quiet, **common, **overrides)
    if method == "em":
        return infer.fit_em(model, data["y"], **common, **overrides)
    raise UsageError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")


@contextlib.contextmanager
def collect_warnings():
    """Record the Python warnings raised inside (each message once) instead of printing them with a source
    line; :func:`report_fit` prints them as ``warning: ...`` beside the fit's own warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        yield caught


def fit_warnings(fit, caught=()) -> list[str]:
    """The fit's warnings (``Fit.warnings``) and the Python warnings raised during it, each once, in order."""
    messages = [str(m) for m in getattr(fit, "warnings", None) or []]
    for record in caught:
        text = str(record.message).strip()
        if text and text not in messages:
            messages.append(text)
    return messages


def diagnostic_summary(fit) -> str:
    """One line: R-hat, ESS and divergences for NUTS; the final objective and whether it converged for SVI
    and EM. "Converged" is the runners' own test (:func:`ppl_switch.infer.checks.moving_objective_warnings`:
    the mean of the last 10% of the trace against the 10% before it), or EM's tolerance where it stopped it."""
    from ppl_switch.infer.checks import objective_movement

    d = fit.diagnostics or {}
    chains, draws = np.shape(next(iter(fit.samples.values())))[:2] if fit.samples else (0, 0)
    if fit.method == "nuts":
        parts = [f"{chains} chain(s) x {draws} draws"]
        has_r_hat = d.get("max_r_hat") is not None  # None (or absent) with one chain
        parts.append(f"max R-hat {d['max_r_hat']:.3f}" if has_r_hat else "no R-hat (needs >= 2 chains: --num-chains)")
        if d.get("min_ess") is not None:
            parts.append(f"min bulk ESS {d['min_ess']:.0f}")
        parts.append(f"{d.get('num_divergences', 0)} divergences")
        return "diagnostics: nuts, " + ", ".join(parts)
    if fit.method == "em" and d.get("log_likelihoods") is not None:
        trace, name, unit = np.atleast_1d(np.asarray(d["log_likelihoods"], dtype=float)), "log-likelihood", "iterations"
    elif fit.losses is not None and len(fit.losses):
        trace, name, unit = np.asarray(fit.losses, dtype=float), "negative ELBO" if fit.method == "svi" else "loss", "steps"
    else:
        return f"diagnostics: {fit.method}, no objective recorded"
    finite = trace[np.isfinite(trace)]
    line = f"diagnostics: {fit.method}, final {name} {float(trace[-1]):.6g} after {len(trace)} {unit}, "
    if d.get("converged") is True:
        return line + "converged (tolerance reached)"
    movement = objective_movement(finite) if len(finite) else None
    if movement is None:
        return line + "convergence not assessed (too few values)"
    if movement["change"] > movement["threshold"]:
        return line + "not converged (the objective is still moving)"
    return line + "converged (no change beyond tolerance over the last 10%)"


def report_fit(fit, caught=()) -> None:
    """Print every warning of the fit to stderr as ``warning: ...``, then the one-line diagnostic summary."""
    messages = fit_warnings(fit, caught)
    for message in messages:
        print(f"warning: {' '.join(message.split())}", file=sys.stderr)
    print(diagnostic_summary(fit), file=sys.stderr)
