"""The rSLDS fast path as a function of (model, data): Laplace-type variational EM with best-of-N starts.

The iteration itself is :func:`ppl_switch.infer.rslds_laplace_em.laplace_em` (pure JAX); this module
builds its starts (the SLDS's PCA / AR(1) start and several regime segmentations: k-means on local
dynamics, one random), compiles one iteration, drives it from Python, screens the starts, drops
non-finite ones with a warning and raises FitError if all fail. It uses only public names of the model
(:class:`~ppl_switch.models.rslds.RSLDS`): its configuration, ``params_to_em`` / ``params_from_em``,
``em_prior``, ``transition_prior``, ``transition_params`` and the SLDS's start functions.
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import ppl_switch.infer.rslds_laplace_em as lem
from ppl_switch.compile_cache import CompiledCache
from ppl_switch.data import DataError, SequenceData, check_positive_int, partly_observed_steps
from ppl_switch.errors import FitError
from ppl_switch.infer.prepare import check_float
from ppl_switch.infer.sharding import em_trial_arrays, resolve_mesh, shard_per_trial, unpad_trials
from ppl_switch.infer.slds_em import em_groups
from ppl_switch.models.rslds import EMISSION_BIAS_PRIOR_SCALE, EMISSION_MATRIX_PRIOR_SCALE, bernoulli_bias, gaussian_view
from ppl_switch.models.slds import SLDS, em_initial_params, least_squares_latents, local_dynamics_paths, random_sticky_paths
from ppl_switch.ops import switching as sw


def rslds_em(model, data: SequenceData, *, key=None, params=None, learn=None, num_iters: int = 100,
             num_restarts: int = 3, num_newton: int = 3, screen_iters: Optional[int] = None, tol: float = 0.0,
             tied_dynamics_cov: bool = False, smoothing_width: float = 5.0, return_posterior: bool = False,
             devices=None):
    """Laplace-type variational EM, the fast path (see :mod:`ppl_switch.infer.rslds_laplace_em`).

    Start (deterministic given ``key``): PCA of y (of a Gaussian-smoothed y for Bernoulli emissions,
    ``smoothing_width`` steps) and one AR(1) fit; ``num_restarts`` regime segmentations (k-means on
    local linear dynamics, and one random sticky segmentation) each turned into parameters by the
    SLDS's closed-form M-step given that segmentation (dynamics, emissions) and a logistic
    regression of the segmentation on the least-squares latents (transition weights).
    Every start runs ``screen_iters`` iterations (default: all ``num_iters``); the one with the highest
    objective then runs on to ``num_iters`` iterations in all, or until the objective gains less than
    ``tol * |objective|`` over 5 iterations (default 0: never). The defaults (3 starts, 100 iterations
    each, best final objective) measured best of the settings tried on NASCAR tracks (model card):
    screening after 20-40 iterations dropped the start that would have won. A start whose values turn non-finite is dropped
    with a RuntimeWarning naming the stage and site (the next best start continues); if every start
    fails, :class:`~ppl_switch.errors.FitError` says where. Nothing non-finite is returned.

    Args:
        model: the :class:`~ppl_switch.models.rslds.RSLDS` (Gaussian or Bernoulli emissions).
        data: validated SequenceData (``fit_em`` passes it).
        key: PRNG key of the restarts.
        params: optional site-form starting (or known) parameters (then no restarts; ``x`` and
            ``q_state_probs`` in them, if present, start q).
        learn: groups the M-step updates, a subset of ``("initial", "transitions", "dynamics",
            "emission_matrix", "emission_bias", "emission_cov")``; default all, or none with ``params``.
        num_iters: most rSLDS iterations. num_newton: Newton steps per x-step and per transition M-step.
        num_restarts: starts. screen_iters: iterations every start runs before the best continues
            (None: ``num_iters``, no start is dropped early).
        tol: relative objective gain over 5 iterations below which the run stops (0: never).
        tied_dynamics_cov: one Q shared by the regimes.
        return_posterior: also return the :class:`~ppl_switch.infer.rslds_laplace_em.LaplaceEMPosterior`.
        devices: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a Mesh
            with a ``"trial"`` axis: the starts are built on the host from the unpadded data as on one
            device; then the trials (data and per-trial q) are padded with empty trials to a multiple of
            the device count and split over the devices (:mod:`ppl_switch.infer.sharding`), and every
            iteration's sums over trials are cross-device reductions inside its compiled program.

    Returns:
        ``(params, history)`` like :func:`~ppl_switch.infer.slds_em.slds_em`: site-form point estimate
        plus ``x`` (q(x) means) and ``q_state_probs``; history ``{"log_likelihoods": objective per
        iteration (non-decreasing), "restart_objectives": every start's objective after the screening
        iterations (NaN: failed), "failed_starts": messages, "num_iterations", "converged"}``.

    Raises:
        FitError: every start produced a non-finite value (stage "start", "E-step", "M-step" or
            "final E-step", the iteration and the names of the non-finite quantities).
    """
    if model.emission == "poisson":
        raise NotImplementedError("em: the Laplace EM supports Gaussian and Bernoulli emissions; use fit_svi or fit_nuts")
    num_iters = check_positive_int(num_iters, "num_iters")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    screen_iters = num_iters if screen_iters is None else check_positive_int(screen_iters, "screen_iters")
    tol = check_float(tol, "tol", 0.0, open_low=False)
    num_newton = check_positive_int(num_newton, "num_newton")
    mask = np.asarray(data.mask)
    if model.emission == "gaussian" and model.emission_cov == "full" and partly_observed_steps(mask):
        raise DataError("mask: EM with emission_cov='full' needs every step fully observed or fully missing")
    learn = em_groups(model, learn, params)
    if model.emission == "bernoulli":
        learn = learn - {"emission_cov"}
    mesh = resolve_mesh(devices)  # checked before anything compiles
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = jnp.result_type(float)
    B, T, N = data.y.shape
    arrays = em_trial_arrays(data, mesh, dtype, model.input_dim)  # B_pad trials, sharded; padding all masked
    if params is not None:
        starts = [_state_from_params(model, params, data, dtype)]
    else:
        starts = _initial_states(model, data, key, num_restarts, dtype, float(smoothing_width))
    if mesh is not None:  # q of every trial placed where its trial lives (padding: copies of trial 0, masked)
        starts = [s._replace(**shard_per_trial({f: getattr(s, f) for f in _PER_TRIAL}, mesh)) for s in starts]
    # one compiled iteration driven from Python: XLA:CPU was seen to stall (idle threads, no
    # progress) on some whole-loop programs at N = 10, T >= 300; single iterations do not
    settings = (model.transitions, model.emission, learn, num_newton, model.emission_cov == "diagonal", bool(tied_dynamics_cov))
    step = _compiled_laplace_em(*settings, num_iters=1, final_e_step=False)
    finish = _compiled_laplace_em(*settings, num_iters=0, final_e_step=True)
    em_prior = model.em_prior(N, dtype)
    t_prior = model.transition_prior(dtype)
    scales = (EMISSION_MATRIX_PRIOR_SCALE, EMISSION_BIAS_PRIOR_SCALE)

    args = (arrays["y"], arrays["mask"], arrays["time_mask"], arrays["inputs"], em_prior, t_prior, scales)
    check = _compiled_finite_check()

    def advance(state, trace, upto):
        """Iterate until ``upto`` iterations in all (or convergence). Returns (state, trace, failure):
        failure = (stage, non-finite names, iteration) at the first non-finite value, else None."""
        if not trace:
            bad = _nonfinite(check(state, jnp.zeros((1,), dtype)))
            if bad:
                return state, trace, ("start", bad, 0)
        while len(trace) < upto and not _converged(trace, tol):
            new, tr, _ = step(state, *args)
            bad = _nonfinite(check(new, tr))
            if bad:
                return state, trace + [float(tr[0])], (*_failed_stage(bad), len(trace))
            state, trace = new, trace + [float(tr[0])]
        return state, trace, None

    # every start runs `screen` iterations; the best then continues (the next best if it fails)
    screen = min(num_iters, int(screen_iters)) if len(starts) > 1 else num_iters
    runs = [advance(s, [], screen) for s in starts]
    failed = [(i, f) for i, (_, _, f) in enumerate(runs) if f]
    screened = np.array([r[1][-1] if r[2] is None and r[1] else np.nan for r in runs])
    result = None
    for i in np.argsort(-np.where(np.isfinite(screened), screened, -np.inf)):
        if runs[i][2] is not None:
            continue
        state, trace, fail = advance(runs[i][0], runs[i][1], num_iters)
        if fail is None:
            state, tr, q = finish(state, *args)
            bad = _nonfinite(check(state, tr))
            if not bad:
                result = (int(i), state, np.asarray(trace + [float(tr[0])]), q)
                break
            fail = ("final E-step", bad, len(trace))
        failed.append((int(i), fail))
    failures = [f"start {i}: stage {f[0]!r} at iteration {f[2]}, non-finite {f[1]}" for i, f in failed]
    if result is None:

        names = sorted({name for _, f in failed for name in f[1]})
        raise FitError(f"rslds_em: every start became non-finite ({'; '.join(failures)}); nothing is returned. "
                       "Try x64=True, standardised y, or more informative priors", sites={"params": names})
    if failures:
        warnings.warn(f"rslds_em: {len(failures)} of {len(starts)} starts became non-finite and were dropped: "
                      + "; ".join(failures), RuntimeWarning, stacklevel=2)
    best, state, trace, q = result
    if mesh is not None:  # back to the host, padding trials dropped
        q = q._replace(**unpad_trials({f: getattr(q, f) for f in q._fields}, B))
    out = model.params_from_em({**state.params, **state.transitions})
    out["x"] = np.asarray(q.means)
    out["q_state_probs"] = np.asarray(q.state_probs)
    history = {
        "log_likelihoods": np.asarray(trace),
        "objective": "ELBO (transitions at the mean of q(x); Jaakkola-Jordan bound for Bernoulli) + log prior; non-decreasing",
        "restart_objectives": screened,
        "restart_objectives_note": f"objective of every start after {screen} iterations (NaN: failed); start {best} continued",
        "failed_starts": failures,
        "num_iterations": len(trace) - 1,
        "converged": bool(_converged(list(trace[:-1]), tol)),
    }
    if return_posterior:
        return out, history, q
    return out, history


# --------------------------------------------------------------------------------------------------
# Starts

#: the per-trial fields of a LaplaceEMState (leading axis: trials)
_PER_TRIAL = ("state_probs", "pairwise", "means", "jj_xi")


def _state_from_params(model, params, data, dtype) -> lem.LaplaceEMState:
    B, T, N = data.y.shape
    K = model.num_states
    p = model.params_to_em(params, dtype)
    tp = {k: jnp.asarray(v, dtype) for k, v in model.transition_params(params).items()}
    if "x" in params:
        mu = jnp.asarray(params["x"], dtype)
    else:
        mu = jnp.asarray(_least_squares_latents_any(model, p, data), dtype)
    gamma = jnp.asarray(params["q_state_probs"], dtype) if "q_state_probs" in params else jnp.full((B, T, K), 1.0 / K, dtype)
    return lem.LaplaceEMState(p, tp, gamma, _outer_pairwise(gamma), mu, jnp.ones((B, T, N), dtype))


def _initial_states(model, data, key, num_restarts, dtype, smoothing_width=5.0) -> list:
    """Best-of-N starts: one per segmentation (k-means on local dynamics; one random sticky)."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    K = model.num_states
    B, T, N = data.y.shape
    gdata = gaussian_view(model, data, smoothing_width)
    base = {k: jnp.asarray(v, dtype) for k, v in em_initial_params(model, gdata, rng).items()}
    # k-means on local dynamics for all but one start, one random sticky segmentation. Measured on
    # the reference NASCAR recipe: which start wins varies with the seed (the final objective ranks
    # them), and the random starts need 40-70 iterations before they lead, so no start is dropped early
    paths = local_dynamics_paths(base, gdata, rng, max(num_restarts - 1, 1)) if K > 1 else []
    paths = (paths[: num_restarts - 1] + [random_sticky_paths(rng, B, T, K)])[:num_restarts]
    y = jnp.asarray(gdata.y, dtype)
    m = jnp.asarray(gdata.mask)
    tm = jnp.asarray(gdata.time_mask)
    u = jnp.asarray(gdata.inputs, dtype) if model.input_dim else jnp.zeros((B, T, 0), dtype)
    slds_prior = SLDS.em_prior(model, N, dtype)._replace(transition_pseudocounts=jnp.asarray(10.0 * np.eye(K), dtype))
    slds_learn = frozenset(sw.EM_GROUPS) - ({"emission_matrix"} if model.fixed_emission_matrix is not None else set())
    t_prior = model.transition_prior(dtype)
    starts = []
    for g in paths:
        g = jnp.asarray(g, dtype)
        p = _compiled_init_step(slds_learn)(base, g, y, m, tm, u, slds_prior)
        gamma = g
        mu = jnp.asarray(_least_squares_latents_any(model, p, gdata), dtype)
        pairwise = _outer_pairwise(gamma)
        tp = _compiled_transition_fit(model.transitions)(dict(t_prior.loc), t_prior, mu, pairwise, tm, u)
        jj = jnp.ones((B, T, N), dtype)
        if model.emission == "bernoulli":
            p = _bernoulli_readout_start(p, mu, data, dtype)
        starts.append(lem.LaplaceEMState(p, tp, gamma, pairwise, mu, jj))
    return starts


# --------------------------------------------------------------------------------------------------
# Helpers


def _outer_pairwise(gamma):
    """(B, T-1, K, K) pairwise marginals of independent steps (a start for the x-step's transition term)."""
    return gamma[:, :-1, :, None] * gamma[:, 1:, None, :]


def _least_squares_latents_any(model, p, data):
    """x_t = argmin ||y_t - C x - d||^2 over observed entries (the SLDS's helper), (B, T, D)."""
    em = {"emission_matrix": np.asarray(p["emission_matrix"]), "emission_bias": np.asarray(p["emission_bias"])}
    return least_squares_latents(em, data)


def _bernoulli_readout_start(p, mu, data, dtype):
    """C, d of a logistic regression of the spikes on the start's x (a few bound-tight closed-form steps)."""
    y, m = jnp.asarray(data.y, dtype), jnp.asarray(data.mask)
    post = lem.LaplaceEMPosterior(None, None, mu, jnp.zeros(mu.shape + (mu.shape[-1],), dtype), None, None, None)
    p = dict(p)
    p["emission_bias"] = jnp.asarray(bernoulli_bias(data), dtype)
    p["emission_matrix"] = 0.1 * p["emission_matrix"] / jnp.maximum(jnp.linalg.norm(p["emission_matrix"], axis=0, keepdims=True), 1e-9)
    p["emission_cov"] = jnp.eye(y.shape[-1], dtype=dtype)
    return _compiled_readout_fit()(p, post, y, m)


def _compiled_readout_fit(num_steps: int = 20):
    key = ("readout", num_steps)
    if key not in _CACHE:

        def fit(p, post, y, m):
            def step(p, _):
                xi = jnp.abs(post.means @ p["emission_matrix"].T + p["emission_bias"])
                learn = frozenset({"emission_matrix", "emission_bias"})
                return lem.bernoulli_emission_m_step(p, post, xi, y, m, learn, (EMISSION_MATRIX_PRIOR_SCALE, EMISSION_BIAS_PRIOR_SCALE)), None

            return jax.lax.scan(step, p, None, length=num_steps)[0]

        _CACHE[key] = jax.jit(fit)
    return _CACHE[key]


_CACHE = CompiledCache("rSLDS Laplace EM programs")


#: where each EM quantity sits in the iteration (E-step: x-step mean, q(z); M-step: the parameters)
_E_STEP_SITES = ("objective", "x", "q_state_probs")


def _compiled_finite_check():
    """jit: {name: all finite} over the objective value(s), q and every parameter of a LaplaceEMState."""
    if "finite" not in _CACHE:

        def check(state, trace):
            flags = {"objective": jnp.all(jnp.isfinite(trace)), "x": jnp.all(jnp.isfinite(state.means)),
                     "q_state_probs": jnp.all(jnp.isfinite(state.state_probs))}
            for name, v in {**state.params, **state.transitions}.items():
                flags[name] = jnp.all(jnp.isfinite(v))
            return flags

        _CACHE["finite"] = jax.jit(check)
    return _CACHE["finite"]


def _converged(trace, tol: float, window: int = 5) -> bool:
    """The objective gained less than ``tol * |objective|`` over the last ``window`` iterations."""
    if tol <= 0 or len(trace) <= window:
        return False
    return bool(trace[-1] - trace[-1 - window] < tol * abs(trace[-1]))


def _nonfinite(flags) -> list:
    return [name for name, ok in flags.items() if not bool(ok)]


def _failed_stage(bad) -> tuple:
    """(stage, sites): the first stage of an iteration that produced a non-finite value (the E-step runs
    before the M-step, whose parameters then inherit the NaN) and the non-finite names of that stage."""
    e_sites = [name for name in bad if name in _E_STEP_SITES]
    return ("E-step", e_sites) if e_sites else ("M-step", bad)


def _compiled_laplace_em(kind, emission, learn, num_newton, diagonal, tied, *, num_iters, final_e_step):
    key = ("lem", kind, emission, learn, num_newton, diagonal, tied, num_iters, final_e_step)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda s, y, m, tm, u, ep, tpr, sc: lem.laplace_em(
            s, y, m, tm, u, ep, tpr, sc, kind=kind, emission=emission, learn=learn, num_iters=num_iters,
            num_newton=num_newton, diagonal=diagonal, tied=tied, final_e_step=final_e_step))
    return _CACHE[key]


def _compiled_transition_fit(kind, num_newton: int = 10):
    key = ("transitions", kind, num_newton)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda tp, prior, mu, pw, tm, u: lem.transition_m_step(kind, tp, prior, mu, pw, tm, u, num_newton))
    return _CACHE[key]


def _compiled_init_step(learn):
    key = ("init", learn)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda p, g, y, m, tm, u, prior: sw.em_init_step(p, g, y, m, tm, u, prior, learn, True))
    return _CACHE[key]


__all__ = ["rslds_em"]
