"""Kalman EM for the linear dynamical system, as functions of (model, data).

E-step: the RTS smoother (:func:`ppl_switch.ops.kalman.lgssm_smoother`) on the model's own state
space form (:meth:`LDS.lgssm_params`, :meth:`LDS.filter_mask`), so masks, ragged trials, inputs and the
diffuse start are exactly the model's. With z_t = [x_t, 1, u_t] the M-step is closed form:

* emission row i: least squares of y_ti on E z_t over the steps where y_ti is observed (the free
  part of [C d F]_i, fixed entries moved to the left-hand side), r_i^2 the expected residual;
* dynamics row h: least squares of x_{t+1,h} on [x_t, 1, u_{t+1}] over pairs inside each trial
  (free part of [A b B]_h); q_h^2 the expected residual when ``dynamics_cov="diagonal"``
  (with Q = I the rows decouple, so the same solve is exact);
* initial: m0 = mean_n E x_0; with ``initial_cov="learned"`` s0^2 = mean_n E (x_0 - m0)^2.

With a diffuse x_0 the objective EM increases is the flat-prior marginal, log p(y_{1:} | y_0) +
log int p(y_0 | x_0) dx_0; the second term is -log|det C|, a constant, when C is fixed and square --
the case EM accepts for a diffuse start (the local-level model and its relatives).

Restarts (starting points below) run side by side in one vmapped ``lax.while_loop``, compiled once
per (model configuration, data shape, options).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.compile_cache import CompiledCache
from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.infer.em_loop import best_restart, compiled_program, run_em, run_on_devices
from ppl_switch.infer.sharding import real_trials
from ppl_switch.ops.kalman import lgssm_smoother


def _solve_rows(G, c, free, w_fixed):
    """Row-wise constrained least squares.

    For each row i: minimise w' G_i w - 2 w' c_i over the entries ``free`` (F,) bool, the other entries
    held at ``w_fixed[i]``. G (R, F, F) (or (F, F) shared), c (R, F), w_fixed (R, F). Returns (R, F).
    """
    G = jnp.broadcast_to(G, c.shape + c.shape[-1:])
    both = free[:, None] & free[None, :]
    eye = jnp.eye(c.shape[-1], dtype=c.dtype)
    w_fix = jnp.where(free, 0.0, w_fixed)
    rhs = jnp.where(free, c - jnp.einsum("rfg,rg->rf", G, w_fix), 0.0)
    w_free = jnp.linalg.solve(jnp.where(both, G, eye), rhs[..., None])[..., 0]
    return jnp.where(free, w_free, w_fixed)


def _residual_var(G, c, yy, n, w):
    """E sum (y - w z)^2 / n per row: (yy - 2 w.c + w' G w) / n."""
    G = jnp.broadcast_to(G, c.shape + c.shape[-1:])
    return (yy - 2 * jnp.sum(w * c, -1) + jnp.einsum("rf,rfg,rg->r", w, G, w)) / jnp.maximum(n, 1e-30)


_PROGRAMS = CompiledCache("LDS EM programs")




def _build_program(model, num_iters: int, tol: float, min_var: float, given_start: bool):
    """The jitted EM of one LDS configuration (cached: one compilation per data shape)."""
    H, U = model.latent_dim, model.input_dim
    learn = set(model.site_dims())  # the free sites

    def program(keys, y, mask, lengths, inputs, start):
        dtype = y.dtype
        N, T, D = y.shape
        data = SequenceData(y, mask, lengths, inputs)
        fmask = model.filter_mask(data)
        y0 = jnp.where(mask, y, 0.0)
        u = inputs if U else jnp.zeros((N, T, 0), dtype)
        pair_ok = (jnp.arange(1, T) < lengths[:, None]).astype(dtype)  # (N, T-1)
        real = real_trials(lengths)  # (N,) False only for the trials that pad N for devices=
        num_real = real.sum()
        mk = mask.astype(dtype)
        nobs = jnp.maximum(mk.sum((0, 1)), 1)
        ymean = y0.sum((0, 1)) / nobs
        yvar = jnp.sum(mk * (y0 - ymean) ** 2, (0, 1)) / nobs
        floor = min_var * jnp.maximum(yvar, jnp.finfo(dtype).tiny)

        def e_step(p):
            lg = model.lgssm_params(p, data)
            sm = jax.vmap(lgssm_smoother)(lg, y, fmask)
            m, V, X = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
            Exx = V + m[..., :, None] * m[..., None, :]  # (N, T, H, H)
            ones = jnp.ones((N, T, 1), dtype)
            Ez = jnp.concatenate([m, ones, u], -1)  # (N, T, F)
            Ezz = Ez[..., :, None] * Ez[..., None, :]
            Ezz = Ezz.at[..., :H, :H].set(Exx)
            # emission statistics per observed coordinate
            Ge = jnp.einsum("ntd,ntfg->dfg", mk, Ezz)
            ce = jnp.einsum("ntd,ntf->df", mk * y0, Ez)
            ye = jnp.sum(mk * y0**2, (0, 1))
            # dynamics: z_t = [x_t, 1, u_{t+1}] -> x_{t+1}
            Zd = jnp.concatenate([m[:, :-1], ones[:, 1:], u[:, 1:]], -1)  # (N, T-1, F)
            Gzz = Zd[..., :, None] * Zd[..., None, :]
            Gzz = Gzz.at[..., :H, :H].set(Exx[:, :-1])
            Gd = jnp.einsum("nt,ntfg->fg", pair_ok, Gzz)
            Exz = m[:, 1:, :, None] * Zd[..., None, :]  # (N, T-1, H, F)
            Exz = Exz.at[..., :H].set(X + m[:, 1:, :, None] * m[:, :-1, None, :])
            cd = jnp.einsum("nt,nthf->hf", pair_ok, Exz)
            xd = jnp.einsum("nt,nth->h", pair_ok, jnp.diagonal(Exx[:, 1:], axis1=-2, axis2=-1))
            stats = dict(Ge=Ge, ce=ce, ye=ye, Gd=Gd, cd=cd, xd=xd, nd=pair_ok.sum(), m0=m[:, 0] * real[:, None], V0=V[:, 0])
            loglik = jnp.where(real, sm.log_likelihood, 0.0).sum()  # a padding trial's is 0 only up to rounding
            return stats, loglik, loglik

        def regression(full, out, prefix, G, c):
            """One block of the M-step: W = [M b B] (rows, F) for ``prefix`` ("emission" / "dynamics"), the
            free columns solved from the expected normal equations, written back into ``out``; returns W."""
            parts = [full[f"{prefix}_matrix"], full[f"{prefix}_bias"][:, None]]
            if U:
                parts.append(full[f"{prefix}_input_weights"])
            W = jnp.concatenate(parts, -1).astype(dtype)
            free = jnp.concatenate(
                [jnp.full(H, f"{prefix}_matrix" in learn), jnp.full(1, f"{prefix}_bias" in learn), jnp.full(U, True)]
            )
            W = _solve_rows(G, c, free, W)
            if f"{prefix}_matrix" in learn:
                out[f"{prefix}_matrix"] = W[:, :H]
            if f"{prefix}_bias" in learn:
                out[f"{prefix}_bias"] = W[:, H]
            if U:
                out[f"{prefix}_input_weights"] = W[:, H + 1 :]
            return W

        def m_step(p, s):
            full = model.full_params(p)
            out = dict(p)
            We = regression(full, out, "emission", s["Ge"], s["ce"])  # W_e = [C d F] (D, F)
            r2 = _residual_var(s["Ge"], s["ce"], s["ye"], mask.sum((0, 1)).astype(dtype), We)
            out["emission_scales"] = jnp.sqrt(jnp.maximum(r2, floor))
            Wd = regression(full, out, "dynamics", s["Gd"], s["cd"])  # W_d = [A b B] (H, F)
            if "dynamics_scales" in learn:
                q2 = _residual_var(s["Gd"], s["cd"], s["xd"], jnp.full(H, s["nd"]), Wd)
                out["dynamics_scales"] = jnp.sqrt(jnp.maximum(q2, jnp.finfo(dtype).tiny))
            # initial state
            # initial moments: means over the real trials (padding trials have m0 = V0 = 0 in the stats)
            m0 = s["m0"].sum(0) / num_real if "initial_mean" in learn else full.get("initial_mean")
            if "initial_mean" in learn:
                out["initial_mean"] = m0
            if "initial_scales" in learn:
                v0 = jnp.sum(jnp.where(real[:, None], jnp.diagonal(s["V0"], axis1=-2, axis2=-1) + (s["m0"] - m0) ** 2, 0.0), 0) / num_real
                out["initial_scales"] = jnp.sqrt(jnp.maximum(v0, jnp.finfo(dtype).tiny))
            return out

        def init(key):
            if given_start:
                return start
            k_c, k_a, k_r, k_q = jax.random.split(key, 4)
            # principal directions of the observations (zero-filled where missing)
            resid = jnp.where(mask, y - ymean, 0.0).reshape(-1, D)
            evals, evecs = jnp.linalg.eigh(resid.T @ resid / jnp.maximum(num_real * T, 1))  # N T steps, padding excluded
            top = evecs[:, ::-1][:, :H] * jnp.sqrt(jnp.maximum(evals[::-1][:H], 0.0))
            if top.shape[1] < H:  # H > D
                top = jnp.concatenate([top, jnp.zeros((D, H - top.shape[1]), dtype)], 1)
            scale = jnp.sqrt(jnp.mean(yvar))
            p = {}
            if "emission_matrix" in learn:
                p["emission_matrix"] = top + 0.1 * scale * jax.random.normal(k_c, (D, H), dtype)
            if "emission_bias" in learn:
                p["emission_bias"] = ymean
            if "dynamics_matrix" in learn:
                p["dynamics_matrix"] = 0.9 * jnp.eye(H, dtype=dtype) + 0.1 * jax.random.normal(k_a, (H, H), dtype) / np.sqrt(H)
            if "dynamics_bias" in learn:
                p["dynamics_bias"] = jnp.zeros(H, dtype)
            frac = jax.random.uniform(k_r, (), dtype, 0.2, 0.8)
            p["emission_scales"] = jnp.sqrt(frac * yvar + floor)
            if "dynamics_scales" in learn:  # latent noise on the data's scale (C fixed: latent = data units)
                p["dynamics_scales"] = jnp.full(H, scale * jnp.exp(jax.random.uniform(k_q, (), dtype, jnp.log(0.05), 0.0)))
            if "initial_mean" in learn:
                p["initial_mean"] = jnp.zeros(H, dtype)
            if "initial_scales" in learn:
                p["initial_scales"] = jnp.ones(H, dtype)
            if U:
                p["dynamics_input_weights"] = jnp.zeros((H, U), dtype)
                p["emission_input_weights"] = jnp.zeros((D, U), dtype)
            return p

        return run_em(init, e_step, m_step, keys, num_iters, tol)

    return jax.jit(program)


def lds_em(model, data: SequenceData, *, key=None, params=None, num_iters: int = 500, num_restarts: int = 4,
           tol: float = 1e-6, min_var: float = 1e-6, map: bool = False, devices=None):
    """Kalman EM for an :class:`~ppl_switch.models.lds.LDS`; ``model.em`` delegates here.

    Args:
        model: the LDS (its ``fixed`` values stay fixed; ``dynamics_cov``, ``initial_cov`` say what
            else is learned).
        data: validated SequenceData.
        key: PRNG key for the restarts' starts (principal directions of y plus noise for a free C,
            A = 0.9 I plus noise, a random split of the data variance between R and Q).
        params: optional site-form start; then one run from it.
        num_iters: maximum M-steps per restart.
        num_restarts: starts run side by side (one vmapped program); the highest log-likelihood is kept.
        tol: stop when the log-likelihood has moved by less than this (nats), or than its float
            resolution, in 3 consecutive iterations.
        min_var: floor of the emission variances, relative to the data variance.
        map: not supported for the LDS (its Normal priors on C and A are not conjugate jointly with
            the Q = I scale convention); use fit_svi with an AutoDelta guide.
        devices: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a Mesh
            with a ``"trial"`` axis: the N trials are padded with empty trials to a multiple of the
            device count and split over the devices (:mod:`ppl_switch.infer.sharding`); the sums over
            trials become cross-device reductions inside the one compiled program. Same result as on one
            device up to float rounding.

    Returns:
        ``(params, history)``: site-form estimate of the free sites and ``{"log_likelihoods",
        "objective", "restart_objectives", "num_iterations", "converged"}``.
    """
    if map:
        raise NotImplementedError("map=True: the LDS EM is maximum likelihood only; use fit_svi with an AutoDelta guide for MAP")
    num_iters = check_positive_int(num_iters, "num_iters")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol: expected a non-negative number of nats, got {tol!r}")
    if model.initial_cov == "diffuse":
        C = model.fixed.get("emission_matrix")
        if C is None or C.shape[0] != C.shape[1] or abs(np.linalg.det(C)) < 1e-12:
            raise ValueError(
                "initial_cov='diffuse': EM needs a fixed, square, invertible emission_matrix (then the flat-prior "
                "marginal it increases is the diffuse likelihood up to a constant); use fit_svi otherwise"
            )
    if data.num_timesteps < 2:
        raise DataError("y: Kalman EM needs at least 2 time steps")
    dtype = jnp.result_type(float)
    key = jax.random.PRNGKey(0) if key is None else key
    start = None
    if params is not None:
        free = set(model.site_dims())
        missing = sorted(free - set(params))
        if missing:
            raise ValueError(f"params: a start needs every free site; missing {missing}")
        start, num_restarts = {k: jnp.asarray(params[k], dtype) for k in free}, 1
    keys = jax.random.split(key, num_restarts)
    run = compiled_program(_PROGRAMS, _build_program, model, num_iters, float(tol), float(min_var), start is not None)
    out = run_on_devices(run, keys, data, dtype, start, devices)
    best, history = best_restart(out)
    return {k: np.asarray(v[best]) for k, v in out.params.items()}, history
