"""Structured mean-field variational EM for the SLDS, as a function of (model, data).

:func:`slds_em` is the SLDS's fast path (``fit_em`` finds it by the model's class): q(z, x) = q(z) q(x),
with q(z) an HMM posterior on expected regime log-likelihoods and q(x) a Gaussian chain with
q(z)-averaged precisions (:mod:`ppl_switch.ops.switching`), and a closed-form MAP M-step under the
model's weak conjugate priors (:meth:`SLDS.em_prior <ppl_switch.models.slds.SLDS.em_prior>`). Without
starting parameters, the model's data-driven start (:func:`~ppl_switch.models.slds.em_initial_params`) is
refined by EM of one LDS shared by the regimes, and restarts from regime paths of
:func:`~ppl_switch.models.slds.local_dynamics_paths` and :func:`~ppl_switch.models.slds.random_sticky_paths`
run one after another through one compiled program per (groups learnt, iterations, options).
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.compile_cache import CompiledCache
from ppl_switch.data import DataError, SequenceData, check_positive_int, partly_observed_steps
from ppl_switch.errors import FitError
from ppl_switch.infer.sharding import em_trial_arrays, resolve_mesh, shard_per_trial, unpad_trials
from ppl_switch.models.slds import em_initial_params, local_dynamics_paths, random_sticky_paths
from ppl_switch.ops import switching as sw


def em_groups(model, learn, params) -> frozenset:
    """The parameter groups an SLDS-family EM updates: ``learn`` (default: every group of ``sw.EM_GROUPS``,
    or none when it starts from given ``params``), checked, minus the emission matrix when the model fixes it."""
    if learn is None:
        learn = () if params is not None else sw.EM_GROUPS
    learn = frozenset(learn)
    bad = sorted(learn - set(sw.EM_GROUPS))
    if bad:
        raise ValueError(f"learn: unknown groups {bad}; valid groups are {list(sw.EM_GROUPS)}")
    if model.fixed_emission_matrix is not None:
        learn = learn - {"emission_matrix"}
    return learn


def slds_em(model, data: SequenceData, *, key=None, params=None, learn=None, num_iters: int = 100,
            num_restarts: int = 4, tied_dynamics_cov: bool = False, return_posterior: bool = False, devices=None):
    """Structured mean-field variational EM (closed-form updates; the fast path).

    q(z, x) = q(z) q(x): q(z) is an HMM posterior whose log-likelihoods are E_q(x) log N(x_t; A_k
    x_{t-1} + b_k, Q_k); q(x) is a Gaussian chain with q(z)-averaged precisions (see
    :mod:`ppl_switch.ops.switching`); the M-step is closed-form MAP under weak conjugate priors
    (:meth:`SLDS.em_prior <ppl_switch.models.slds.SLDS.em_prior>`). The objective (ELBO + log prior) never decreases.

    Args:
        model: the :class:`~ppl_switch.models.slds.SLDS` (Gaussian emissions).
        data: validated SequenceData (``fit_em`` passes it).
        key: PRNG key for the restarts' random initial regime paths.
        params: optional site-form starting (or known) parameters. Without them, a PCA/AR(1)
            start is refined by EM of one LDS shared by the regimes (for K > 1), and ``num_restarts``
            runs from it are made, with regime paths from k-means on the local dynamics of its
            smoothed path (all but one) and a random sticky path; the highest objective is kept.
        learn: which groups the M-step updates, a subset of ``("initial", "transitions",
            "dynamics", "emission_matrix", "emission_bias", "emission_cov")``; default all (the
            emission matrix only if it is not fixed), or none when ``params`` are given.
        num_iters: EM iterations.
        tied_dynamics_cov: fit one Q shared by the regimes (the returned Q_k are then equal).
        return_posterior: also return the :class:`~ppl_switch.ops.switching.EMTrialPosterior`.
        devices: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a Mesh
            with a ``"trial"`` axis: the trials are padded with empty trials to a multiple of the device
            count and split over the devices (:mod:`ppl_switch.infer.sharding`); q(x) and q(z) of each
            trial are computed where it lives and the sufficient statistics and objective are summed
            across devices inside the compiled program. The starts are computed on the host from the
            unpadded data as on one device, so the result equals one device's up to float rounding.

    Returns:
        ``(params, history)``: site-form point estimate plus ``x`` (q(x) means, (B, T, D)) and
        ``q_state_probs`` (q(z) marginals, (B, T, K)); history ``{"log_likelihoods": objective per
        iteration, "objective": ..., "restart_objectives": ...}``. With ``return_posterior`` a
        third element, the q of every trial.
    """
    if model.emission != "gaussian":
        raise NotImplementedError("em: structured mean-field EM needs Gaussian emissions; use fit_svi or fit_nuts")
    num_iters = check_positive_int(num_iters, "num_iters")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    mask = np.asarray(data.mask)
    if model.emission_cov == "full" and partly_observed_steps(mask):
        raise DataError("mask: EM with emission_cov='full' needs every step fully observed or fully missing")
    learn = em_groups(model, learn, params)
    mesh = resolve_mesh(devices)  # checked before anything compiles
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = jnp.result_type(float)
    B, T, N = data.y.shape
    K = model.num_states
    arrays = em_trial_arrays(data, mesh, dtype, model.input_dim)  # B_pad trials, sharded; padding all masked
    y, m, tm, u = arrays["y"], arrays["mask"], arrays["time_mask"], arrays["inputs"]
    per_trial = (lambda a: a) if mesh is None else (lambda a: shard_per_trial(a, mesh))
    prior = model.em_prior(N, dtype)
    diagonal = model.emission_cov == "diagonal"
    if params is not None:
        p0 = [model.params_to_em(params, dtype)]
        gammas = [per_trial(jnp.full((B, T, K), 1.0 / K, dtype))]
        needs_init_step = False
    else:
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        base = {k: jnp.asarray(v, dtype) for k, v in em_initial_params(model, data, rng).items()}
        needs_init_step = True
        run = _compiled_em(learn, num_iters, diagonal, needs_init_step, bool(tied_dynamics_cov))
        if K > 1:  # fit one shared LDS first: the least-squares start puts the observation noise into Q
            shared = _single_lds_fit(run, base, y, m, tm, u, prior)
            if all(bool(jnp.all(jnp.isfinite(v))) for v in shared.values()):
                base = shared
            else:  # never silent; the restarts can still succeed from the least-squares start
                warnings.warn("slds_em: the shared-LDS start became non-finite; the restarts start from the "
                              "least-squares start instead", RuntimeWarning, stacklevel=2)
        # starts: k-means on local dynamics of the LDS-smoothed path (all but one restart) and random
        # sticky segments
        starts = local_dynamics_paths(base, data, rng, max(num_restarts - 1, 1)) if K > 1 else []
        starts = starts[: num_restarts - 1] + [random_sticky_paths(rng, B, T, K)]
        p0 = [base] * len(starts)
        gammas = [per_trial(jnp.asarray(g, dtype)) for g in starts]
    run = _compiled_em(learn, num_iters, diagonal, needs_init_step, bool(tied_dynamics_cov))
    # restarts one after another through the same compiled run (a leading axis of one): the
    # same total work on CPU as a vmap over restarts, with a restart's memory only
    results = [run(jax.tree.map(lambda a: a[None], p_r), g_r[None], y, m, tm, u, prior) for p_r, g_r in zip(p0, gammas)]
    p_fit, traces, q, checks = jax.tree.map(lambda *a: jnp.concatenate(a), *results)
    # never silent: a restart with a non-finite value is dropped (warning); none left is a FitError
    failures = [_first_nonfinite_stage(jax.tree.map(lambda a: np.asarray(a[r]), checks)) for r in range(len(results))]
    failed = [f"restart {r}: stage {f[0]!r} at iteration {f[1]}" for r, f in enumerate(failures) if f]
    if len(failed) == len(results):

        raise FitError(f"slds_em: every restart became non-finite ({'; '.join(failed)}); nothing is returned. "
                       "Try x64=True, standardised y, or more informative priors",
                       sites={"params": sorted(k for k, v in p_fit.items() if not np.all(np.isfinite(np.asarray(v))))})
    if failed:
        warnings.warn(f"slds_em: {len(failed)} of {len(results)} restarts became non-finite and were dropped: "
                      + "; ".join(failed), RuntimeWarning, stacklevel=2)
    finals = np.where([f is None for f in failures], np.asarray(traces[:, -1]), -np.inf)
    best = int(np.argmax(finals))
    p_best = jax.tree.map(lambda a: a[best], p_fit)
    q_best = jax.tree.map(lambda a: a[best], q)
    if mesh is not None:  # back to the host, padding trials dropped
        q_best = unpad_trials(q_best, B)
    out = model.params_from_em(p_best)
    out["x"] = np.asarray(q_best.means)
    out["q_state_probs"] = np.asarray(q_best.state_probs)
    history = {
        "log_likelihoods": np.asarray(traces[best]),
        "objective": "ELBO + log prior of the M-step's conjugate regularisers (non-decreasing)",
        "restart_objectives": np.where([f is None for f in failures], np.asarray(traces[:, -1]), np.nan),
        "failed_starts": failed,
    }
    if return_posterior:
        return out, history, q_best
    return out, history


def _compiled_em(learn: frozenset, num_iters: int, diagonal: bool, init_step: bool, tied: bool):
    key = (learn, num_iters, diagonal, init_step, tied)
    if key not in _EM_CACHE:

        def one(p, gamma, y, m, tm, u, prior):
            if init_step:
                p = sw.em_init_step(p, gamma, y, m, tm, u, prior, learn, diagonal, tied)
            start_ok = sw.all_finite(p)  # the start after the symmetry-breaking M-step
            p, trace, q, checks = sw.structured_mean_field_em(p, gamma, y, m, tm, u, prior, learn, num_iters, diagonal,
                                                              tied, return_checks=True)
            return p, trace, q, {**checks, "start": start_ok}

        _EM_CACHE[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None, None, None)))
    return _EM_CACHE[key]


_EM_CACHE = CompiledCache("SLDS EM programs")


def _first_nonfinite_stage(checks) -> Optional[tuple]:
    """(stage, iteration) of the first non-finite value of one EM run, or None when all are finite.

    ``checks``: {"start": bool, "e_step": (I + 1,) bool, "m_step": (I,) bool} from the compiled run; the
    E-step of iteration i runs before its M-step, and the last E-step is the final one."""
    if not checks["start"]:
        return ("start", 0)
    num_iters = len(checks["m_step"])
    for i in range(num_iters + 1):
        if not checks["e_step"][i]:
            return ("E-step" if i < num_iters else "final E-step", i)
        if i < num_iters and not checks["m_step"][i]:
            return ("M-step", i)
    return None

_REGIME_KEYS = ("dynamics_matrices", "dynamics_biases", "input_matrices", "dynamics_covs")


def _single_lds_fit(run, base, y, m, tm, u, prior):
    """EM of one linear dynamical system shared by all regimes, through the compiled EM ``run``.

    With equal regimes, a uniform q(z), uniform pi0 and a doubly stochastic P (as in ``base``) every
    regime receives the same statistics, so the structured mean-field EM is exact EM for one LDS. The
    fitted regimes are averaged (rounding may break the symmetry slightly) and the chain is reset to the
    sticky start, so that the restarts only inherit the LDS's noise split, dynamics and readout."""
    B, T = y.shape[:2]
    K = base["transition_matrix"].shape[0]
    uniform = jnp.full((1, B, T, K), 1.0 / K, y.dtype)
    p_fit = run(jax.tree.map(lambda a: a[None], base), uniform, y, m, tm, u, prior)[0]
    p_fit = jax.tree.map(lambda a: a[0], p_fit)
    out = dict(base)
    for name in ("initial_mean", "initial_cov", "emission_matrix", "emission_bias", "emission_cov"):
        out[name] = p_fit[name]
    for name in _REGIME_KEYS:
        out[name] = jnp.broadcast_to(jnp.mean(p_fit[name], 0), base[name].shape)
    return out


__all__ = ["slds_em", "em_groups"]
