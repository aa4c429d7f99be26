"""Exact MAP-EM of the CLDS (Geadah et al.), as functions of (model, data).

:func:`clds_em` is the CLDS's closed-form EM (``fit_em`` finds it by the model's class, ``LIBRARY_EM``): an
ECM with a Kalman-smoother E-step, then closed-form conditional maximisers -- joint [A b] weights by the
Sylvester equation ``G W + W Q = H`` (with the corrected ``+Phi'Phi`` block of the paper's Eq. 20), Q, then
C/d weights (one ridge solve per neuron for diagonal R, a Sylvester equation for full R), R, then m weights
(Sylvester with Q_1) and Q_1. Its objective ``J = sum_k log p(y^k | W, Theta, u^k) - ||W||^2 / 2`` (weights
MAP, covariances ML; :func:`em_objective`) is non-decreasing. Gaussian emissions only (x marginalised by
the Kalman filter). Paper: "Modeling Neural Activity with Conditionally Linear Dynamical Systems".

:func:`clds_start` is the data-driven SVI start that ``ppl_switch.fit`` (the ``svi`` runner, through
:func:`ppl_switch.infer.starts.data_driven_guide`) gives a CLDS: EM for a Gaussian CLDS, EM on the counts
moved to the log-rate scale plus the Laplace paths for a Poisson one. The model's own
:meth:`CLDS.init_values <ppl_switch.models.clds.CLDS.init_values>` is the cheap start without EM.

Weight layout of a regression block ``names = (matrix, bias)`` (("A", "b") or ("C", "d")): the stacked
weights W (P, out) act on the regressor ``z_t = [phi_mat(u_t) (x) x_t ; phi_bias(u_t)]`` (P = L_mat D +
L_bias) as ``W' z_t = M(u_t) x_t + bias(u_t)`` (:func:`stack_weights`, :func:`split_weights`,
:func:`features`, :func:`affine_maps`).
"""

from __future__ import annotations

import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.compile_cache import CompiledCache
from ppl_switch.data import DataError, SequenceData, check_positive_int, partly_observed_steps
from ppl_switch.errors import FitWarning
from ppl_switch.infer.em_loop import compiled_program
from ppl_switch.models.clds import cov_from_sites, sites_from_cov
from ppl_switch.ops.switching import symmetrize

__all__ = [
    "affine_maps",
    "clds_em",
    "clds_guide_start",
    "clds_start",
    "em_objective",
    "em_step",
    "features",
    "initial_params",
    "kron_select",
    "require_gaussian",
    "run_clds_em",
    "solve_sylvester_psd",
    "split_weights",
    "stack_weights",
]


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def solve_sylvester_psd(G, S, H):
    """Solve ``G W + W S = H`` for symmetric positive semi-definite G (P, P) and positive definite
    S (D, D) by two eigendecompositions: W = U [(U'HV) / (g_i + s_j)] V'. H (P, D) -> W (P, D)."""
    g, U = jnp.linalg.eigh(symmetrize(G))
    s, V = jnp.linalg.eigh(symmetrize(S))
    return U @ ((_mT(U) @ H @ V) / (g[:, None] + s[None, :])) @ _mT(V)


def kron_select(num_mat: int, num_bias: int, dim: int) -> np.ndarray:
    """Indices into phi_all (x) [x; 1] (phi_all = [phi_mat, phi_bias], a-major) of the regressor
    z = [phi_mat (x) x ; phi_bias]: the x entries of the matrix block and the 1 entry of the bias block."""
    idx = [l * (dim + 1) + j for l in range(num_mat) for j in range(dim)]
    idx += [(num_mat + l) * (dim + 1) + dim for l in range(num_bias)]
    return np.asarray(idx)


def require_gaussian(model, what: str) -> None:
    """Raise a ValueError naming ``emission`` unless the CLDS has Gaussian emissions (what its EM needs)."""
    if model.emission != "gaussian":
        raise ValueError(f"emission: {what} needs emission='gaussian' (x marginalised by the Kalman "
                         f"filter); with emission={model.emission!r} use fit_svi (path guide) or fit_nuts")


# ----- weight layout ---------------------------------------------------------------------------------
def features(model, names, u):
    """phi_all = [phi_mat(u), phi_bias(u)] (..., L_mat + L_bias) and the regressor selection
    (see :func:`kron_select`): z_t = select(phi_all(u_t) (x) [x_t; 1])."""
    mat, bias = names
    phi = [model.bases[mat](u)]
    num_bias = 0
    if bias in model.bases:
        phi.append(model.bases[bias](u))
        num_bias = model.bases[bias].num_features
    sel = kron_select(model.bases[mat].num_features, num_bias, model.latent_dim)
    return jnp.concatenate(phi, -1), sel


def split_weights(model, W, names, out_dim):
    """Stacked weights W (P, out) -> the sites ``W_<mat>`` (L, out, D) and, with a bias basis, ``W_<bias>``."""
    mat, bias = names
    L = model.bases[mat].num_features
    D = model.latent_dim
    res = {f"W_{mat}": jnp.transpose(W[: L * D].reshape(L, D, out_dim), (0, 2, 1))}
    if bias in model.bases:
        res[f"W_{bias}"] = W[L * D:]
    return res


def stack_weights(model, p, names):
    """The sites ``W_<mat>`` (L, out, D) (and ``W_<bias>``) of ``p`` as stacked weights W (P, out)."""
    mat, bias = names
    Wm = p[f"W_{mat}"]  # (L, out, D)
    L, out, D = Wm.shape
    W = jnp.transpose(Wm, (0, 2, 1)).reshape(L * D, out)
    if bias in model.bases:
        W = jnp.concatenate([W, p[f"W_{bias}"]], 0)
    return W


def affine_maps(model, phi, W, names, out_dim):
    """M(u_t) (..., out, D) and bias(u_t) (..., out) (zeros without a bias basis) from the features
    phi (..., L_mat + L_bias) of :func:`features` and stacked weights W (P, out): W' z_t = M x_t + bias."""
    mat, bias = names
    w = split_weights(model, W, names, out_dim)
    L = model.bases[mat].num_features
    M = jnp.einsum("...l,lij->...ij", phi[..., :L], w[f"W_{mat}"])
    if bias in model.bases:
        return M, phi[..., L:] @ w[f"W_{bias}"]
    return M, jnp.zeros(M.shape[:-1], M.dtype)


# ----- objective and one ECM iteration ---------------------------------------------------------------
def _weight_prior(model, p):
    """||W||^2 / 2 over the weights that are not fixed (the MAP objective's prior, counted once)."""
    return sum(0.5 * jnp.sum(p[f"W_{n}"] ** 2) for n in model.bases if f"W_{n}" not in model.fixed)


def _objective(model, params, data: SequenceData) -> jax.Array:
    p = model.with_fixed(params)
    prior = _weight_prior(model, p)
    return model.trial_log_likelihoods(params, data).sum() - prior


def _em_step(model, params, data: SequenceData):
    p = model.with_fixed(params)
    D = model.latent_dim
    N = data.obs_dim
    means, covs, cross, ll = model.smooth(p, data)
    K, T, _ = means.shape
    dtype = means.dtype
    # ---- expected sufficient statistics of [x; 1]
    ones = jnp.ones((K, T, 1), dtype)
    xt = jnp.concatenate([means, ones], -1)  # (K, T, D+1)
    Exx = covs + means[..., :, None] * means[..., None, :]
    Sxx = jnp.zeros((K, T, D + 1, D + 1), dtype).at[..., :D, :D].set(Exx)
    Sxx = Sxx.at[..., :D, D].set(means).at[..., D, :D].set(means).at[..., D, D].set(1.0)
    # E[x~_t x_{t+1}'] (K, T-1, D+1, D)
    Exnext = _mT(cross) + means[:, :-1, :, None] * means[:, 1:, None, :]
    Scross = jnp.concatenate([Exnext, means[:, 1:, None, :]], -2)
    in_len = jnp.arange(T)[None, :] < data.lengths[:, None]  # (K, T)
    trans = (in_len[:, 1:]).astype(dtype)  # transition t -> t+1 valid

    new = dict(params)
    # ---- [A b] jointly given Q (Sylvester), then Q. Regressor z_t = [phi_A (x) x_t; phi_b]; the
    # Gram sum_t E[z z'] is a selection of sum_t (phi phi') (x) E[x~ x~'], one matrix product.
    D1 = D + 1
    phi_t, sel = jax.vmap(lambda u: features(model, ("A", "b"), u[:-1]))(data.inputs)  # (K, T-1, La)
    sel = sel[0]
    n = K * (T - 1)
    phi = (phi_t * trans[..., None]).reshape(n, -1)  # zero rows for transitions past the length
    La = phi.shape[-1]
    outer = (phi[:, :, None] * phi[:, None, :]).reshape(n, La * La)
    G = (outer.T @ Sxx[:, :-1].reshape(n, D1 * D1)).reshape(La, La, D1, D1)
    G = jnp.transpose(G, (0, 2, 1, 3)).reshape(La * D1, La * D1)[sel][:, sel]
    H = (phi.T @ Scross.reshape(n, D1 * D)).reshape(La * D1, D)[sel]
    Q_old = cov_from_sites(p["dynamics_scale"], p["dynamics_corr_chol"])
    W = solve_sylvester_psd(G, Q_old, H)
    new.update(split_weights(model, W, ("A", "b"), D))
    n_trans = trans.sum()
    # Q and R come from per-step residuals, not the moment form Syy - W'H - H'W + W'GW (same maximiser):
    # the summed moments are O(T |x|^2) while Q is O(T q^2), so on near-noiseless data the moment form
    # cancels every float32 digit and can go indefinite. Each term here is already of the result's size:
    # E[e e'] = r r' + S_{t+1} - A X_t' - X_t A' + A S_t A',  e = x_{t+1} - A x_t - b,  X_t = cross_t
    # = Cov[x_{t+1}, x_t],  r = mu_{t+1} - A mu_t - b  (A, b at u_t, as built from the new W).
    A_t, b_t = affine_maps(model, phi_t, W, ("A", "b"), D)  # (K, T-1, D, D), (K, T-1, D)
    r = means[:, 1:] - jnp.einsum("ktij,ktj->kti", A_t, means[:, :-1]) - b_t
    AX = A_t @ _mT(cross)  # A Cov[x_t, x_{t+1}]
    E = r[..., :, None] * r[..., None, :] + covs[:, 1:] - AX - _mT(AX) + A_t @ covs[:, :-1] @ _mT(A_t)
    Q = symmetrize(jnp.where(trans[..., None, None] > 0, E, 0.0).sum((0, 1))) / n_trans
    new["dynamics_scale"], new["dynamics_corr_chol"] = sites_from_cov(Q)

    # ---- C (and d) given R, then R
    phie_t, sele = jax.vmap(lambda u: features(model, ("C", "d"), u))(data.inputs)  # (K, T, Le)
    sele = sele[0]
    n = K * T
    Le = phie_t.shape[-1]
    phie = phie_t.reshape(n, Le)
    obs = data.mask.astype(dtype).reshape(n, N)
    y = data.y.reshape(n, N)
    fixed_C = "W_C" in model.fixed
    zx = (phie[:, :, None] * xt.reshape(n, 1, D1)).reshape(n, Le * D1)[:, sele]  # E[z_t]
    # sum_t w_t E[z z'] for a (n, M) set of weights w -> (M, P, P)
    phiphi = (phie[:, :, None] * phie[:, None, :]).reshape(n, Le * Le)

    def weighted_gram(w):
        full = jnp.einsum("nm,na,nb->mab", w, phiphi, Sxx.reshape(n, D1 * D1))
        full = full.reshape(-1, Le, Le, D1, D1).transpose(0, 1, 3, 2, 4).reshape(-1, Le * D1, Le * D1)
        return full[:, sele][:, :, sele]

    if model.emission_cov == "diag":
        Gn = weighted_gram(obs)  # (N, P, P)
        hn = (obs * y).T @ zx  # (N, P)
        R_old = p["emission_scale"] ** 2
        P = Gn.shape[-1]
        if fixed_C:
            Wn = _mT(stack_weights(model, p, ("C", "d")))  # (N, P)
        else:
            Wn = jnp.linalg.solve(Gn + R_old[:, None, None] * jnp.eye(P), hn[..., None])[..., 0]
            new.update(split_weights(model, _mT(Wn), ("C", "d"), N))
        n_obs = obs.sum(0)
        # per-step residual form (see Q): sq_n = sum_t m_tn [(y_tn - c_n mu_t - d_n)^2 + c_n S_t c_n']
        C_t, d_t = affine_maps(model, phie_t, _mT(Wn), ("C", "d"), N)  # (K, T, N, D), (K, T, N)
        resid = data.y - jnp.einsum("ktnd,ktd->ktn", C_t, means) - d_t
        sq_t = resid**2 + jnp.einsum("ktnd,ktde,ktne->ktn", C_t, covs, C_t)
        sq = jnp.where(data.mask, sq_t, 0.0).sum((0, 1))
        new["emission_scale"] = jnp.sqrt(jnp.maximum(sq / n_obs, 1e-12))
    else:
        step_obs = obs[:, :1]  # whole steps observed or missing (checked)
        Ge = weighted_gram(step_obs)[0]
        He = zx.T @ (step_obs * y)
        R_old = cov_from_sites(p["emission_scale"], p["emission_corr_chol"])
        if fixed_C:
            We = stack_weights(model, p, ("C", "d"))
        else:
            We = solve_sylvester_psd(Ge, R_old, He)
            new.update(split_weights(model, We, ("C", "d"), N))
        # per-step residual form (see Q): E[e e'] = r r' + C S_t C' over the observed steps
        C_t, d_t = affine_maps(model, phie_t, We, ("C", "d"), N)  # (K, T, N, D), (K, T, N)
        resid = data.y - jnp.einsum("ktnd,ktd->ktn", C_t, means) - d_t
        E = resid[..., :, None] * resid[..., None, :] + C_t @ covs @ _mT(C_t)
        R = symmetrize(jnp.where(data.mask[..., :1, None], E, 0.0).sum((0, 1))) / step_obs.sum()
        new["emission_scale"], new["emission_corr_chol"] = sites_from_cov(R)

    # ---- m given Q_1 (Sylvester), then Q_1
    phim = jax.vmap(lambda u: model.bases["m"](u[:1])[0])(data.inputs)  # (K, L_m)
    Q1_old = cov_from_sites(p["initial_scale"], p["initial_corr_chol"])
    Gm = phim.T @ phim
    Hm = phim.T @ means[:, 0]
    Wm = solve_sylvester_psd(Gm, Q1_old, Hm)
    new["W_m"] = Wm
    r = means[:, 0] - phim @ Wm
    Q1 = symmetrize(covs[:, 0].sum(0) + r.T @ r) / K
    new["initial_scale"], new["initial_corr_chol"] = sites_from_cov(Q1)

    new = {k: v for k, v in new.items() if k not in model.fixed}
    prior = _weight_prior(model, p)
    return new, {"objective": ll.sum() - prior, "log_likelihood": ll.sum()}


#: the jitted objective and ECM iteration per CLDS configuration (``model_key``)
_PROGRAMS = CompiledCache("CLDS EM programs")


def _build(model, which: str):
    fn = {"objective": _objective, "step": _em_step}[which]
    return jax.jit(lambda params, data: fn(model, params, data))


def em_objective(model, params, data: SequenceData) -> jax.Array:
    """EM objective J = sum_k log p(y^k | W, Theta, u^k) - ||W||^2 / 2 (prior counted once); compiled once
    per model configuration and data shape."""
    require_gaussian(model, "the EM objective")
    return compiled_program(_PROGRAMS, _build, model, "objective")(params, data)


def em_step(model, params, data: SequenceData):
    """One ECM iteration. Returns (new params, {"objective", "log_likelihood"} at the old params); compiled
    once per model configuration and data shape."""
    return compiled_program(_PROGRAMS, _build, model, "step")(params, data)


# ----- starts and the EM loop ------------------------------------------------------------------------
def initial_params(model, key, data: SequenceData) -> dict:
    """The EM's start without given parameters: prior draws of the weights, PCA axes for a constant C,
    identity covariances (as in the paper); :meth:`CLDS.start_params <ppl_switch.models.clds.CLDS.start_params>`."""
    return model.start_params(key, data)


def run_clds_em(model, data, *, num_iters: int = 200, seed: int = 0, init_params=None, tol: Optional[float] = None,
                verbose: bool = False, inputs=None, mask=None, lengths=None) -> dict:
    """Run exact MAP-EM.

    Args:
        model: a :class:`~ppl_switch.models.clds.CLDS` with Gaussian emissions.
        data: a SequenceData or y (with ``inputs``, ``mask``, ``lengths``).
        num_iters: EM iterations (default 200, as in the authors' notebooks).
        seed: initialisation seed (prior draws of the weights; PCA for a constant C; :func:`initial_params`).
        init_params: start from these instead.
        tol: stop when the objective improves by less than ``tol * |J|``.
    Returns:
        {"params", "objective" (iterations,) J before each M-step, "log_likelihood" (iterations,),
         "seconds" (wall time after compilation), "compile_seconds", "data", "stopped_nonfinite_at"
         (None, or the iteration whose objective was not finite)}.
    Stops if the objective becomes non-finite, returning the parameters of its last finite value. Each
    iteration is :func:`em_step` (looked up in this module at every call).
    """
    require_gaussian(model, "EM (fit_em)")
    if not isinstance(data, SequenceData):
        data = model.prepare(data, inputs=inputs, mask=mask, lengths=lengths)
    num_iters = check_positive_int(num_iters, "num_iters")
    if model.emission_cov == "full" and partly_observed_steps(data.mask):
        raise DataError("mask: EM with emission_cov='full' needs whole time steps observed or missing")
    params = initial_params(model, jax.random.PRNGKey(seed), data) if init_params is None else dict(init_params)
    params = {k: jnp.asarray(v) for k, v in params.items() if k not in model.fixed}
    data = jax.tree.map(jnp.asarray, data)  # on device once, not at every iteration
    t0 = time.perf_counter()
    new_params, stats = em_step(model, params, data)
    jax.block_until_ready(new_params)
    compile_s = time.perf_counter() - t0
    objective, loglik = [float(stats["objective"])], [float(stats["log_likelihood"])]
    # J is evaluated at the parameters going into a step; a non-finite J means the previous M-step's
    # output is unusable, so the parameters it was computed from (``previous``) are the last finite ones
    previous, params = params, new_params
    stopped_at = None
    t0 = time.perf_counter()
    for i in range(1, num_iters):
        new_params, stats = em_step(model, params, data)
        J = float(stats["objective"])
        if not np.isfinite(J):
            if verbose:
                print(f"EM: objective not finite at iteration {i}; keeping the last finite parameters")
            params, stopped_at = previous, i
            break
        objective.append(J)
        loglik.append(float(stats["log_likelihood"]))
        previous, params = params, new_params
        if verbose and (i % 20 == 0 or i == num_iters - 1):
            print(f"EM iter {i}: J = {J:.3f}")
        if tol is not None and abs(objective[-1] - objective[-2]) < tol * abs(objective[-1]):
            break
    jax.block_until_ready(params)
    return {
        "params": params,
        "objective": np.asarray(objective),
        "log_likelihood": np.asarray(loglik),
        "seconds": time.perf_counter() - t0,
        "compile_seconds": compile_s,
        "data": data,
        "stopped_nonfinite_at": stopped_at,
    }


def clds_em(model, data: SequenceData, *, num_iters: int = 200, key=None, init_params=None,
            tol: Optional[float] = None, verbose: bool = False):
    """Exact MAP-EM for :func:`ppl_switch.infer.fit_em`: returns ``(params, history)`` with history
    {"log_likelihoods", "objective" (per iteration), "seconds", "compile_seconds", "stopped_nonfinite_at"}.
    Arguments as :func:`run_clds_em` (``key`` replaces ``seed``). Warns (FitWarning) when the objective
    became non-finite and the parameters of its last finite value are returned."""
    require_gaussian(model, "EM (fit_em)")
    seed = 0 if key is None else int(jax.random.randint(key, (), 0, 2**31 - 1))
    out = run_clds_em(model, data, num_iters=num_iters, seed=seed, init_params=init_params, tol=tol, verbose=verbose)
    if out["stopped_nonfinite_at"] is not None:
        warnings.warn(
            f"CLDS EM: the objective was not finite at iteration {out['stopped_nonfinite_at']}; returned the "
            "parameters of its last finite value (try x64=True, more trials, or fixing initial_scale)",
            FitWarning,
        )
    history = {
        "log_likelihoods": out["log_likelihood"],
        "objective": out["objective"],
        "seconds": out["seconds"],
        "compile_seconds": out["compile_seconds"],
        "stopped_nonfinite_at": out["stopped_nonfinite_at"],
    }
    return out["params"], history


def clds_start(model, data, seed: int = 0, num_iters: int = 50) -> dict:
    """The EM-based data-driven SVI start of a CLDS (site values).

    Gaussian emissions: the MAP-EM estimate after ``num_iters`` iterations. Poisson: a Gaussian CLDS with the
    same bases (and fixed values) (:meth:`CLDS.gaussian_counterpart`) fitted by EM to the counts moved to the
    log-rate scale, link^{-1}((y + 0.5) / bin_size) (:meth:`CLDS.log_rate_data`); its weights and
    dynamics/initial covariances, and x = the Laplace mode of the paths under the Poisson model with those
    parameters. The model's own :meth:`CLDS.init_values` is the same start without EM."""
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    if model.emission == "gaussian":
        return {k: np.asarray(v) for k, v in run_clds_em(model, data, num_iters=num_iters, seed=seed)["params"].items()}
    gaussian = model.gaussian_counterpart()
    params = run_clds_em(gaussian, model.log_rate_data(data), num_iters=num_iters, seed=seed)["params"]
    params = {k: v for k, v in params.items() if not k.startswith("emission_")}
    out = {k: np.asarray(v) for k, v in params.items()}
    out["x"] = np.asarray(model.smooth(params, jax.tree.map(jnp.asarray, data))[0])
    return out


def clds_guide_start(model, data) -> dict:
    """The start ``model.default_guide(data, init_values=...)`` gets from ``ppl_switch.fit`` (``LIBRARY_STARTS``):
    Gaussian emissions, every site at :func:`clds_start`; Poisson, only the path x of :func:`clds_start` (the
    path guide then starts the parameters at prior medians, as measured in the model card)."""
    start = clds_start(model, data)
    return start if model.emission == "gaussian" else {"x": start["x"]}
