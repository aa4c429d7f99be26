"""Numerics for switching linear dynamical systems (SLDS). Pure JAX, no NumPyro.

Model (K regimes, latent dim D, observation dim N; arrays 0-indexed, row ``t`` of a time-varying
dynamics field maps x_t to x_{t+1} as in :mod:`ppl_switch.ops.kalman`)::

    z_1 ~ Cat(pi0),         z_{t+1} | z_t ~ Cat(P[z_t])
    x_1 ~ N(m0, S0),        x_{t+1} | x_t, z_{t+1}=k ~ N(A_k x_t + b_k, Q_k)
    y_t | x_t ~ N(C x_t + d, R)

What is here:

* :func:`transition_log_likelihoods` -- log N(x_{t+1}; A_k x_t + b_k, Q_k) for a given path, the
  per-regime "observation" log-likelihoods that the HMM forward algorithm sums z out of.
* :func:`gaussian_sum_filter` -- the collapsed (one Gaussian per regime, moment-matched) forward filter
  of Barber (2012, ch. 25) / IMM: approximate filtering and approximate log p(y_{1:T}).
* :func:`exact_log_likelihood_by_enumeration` and :func:`regime_paths` -- brute force over all K^T
  regime paths (tiny T only), the oracle for the collapsed filter.
* :func:`gaussian_chain_posterior` / :func:`gaussian_chain_sample` -- a Gaussian Markov chain given in
  information form (block-tridiagonal precision J and linear term h): means, marginal and lag-one
  covariances, log normaliser and log|J| in O(T D^3). This is the q(x) step of structured mean-field
  variational EM, whose q(z)-averaged dynamics are naturally a block-tridiagonal precision.
* the structured mean-field EM itself (:func:`structured_mean_field_em`, :func:`em_m_step`) and
  :func:`residual_covariances`, the float32-stable form of its Q_k / R update (shared with the rSLDS).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_solve, solve_triangular

from ppl_switch.ops.hmm import hmm_posterior_stats
from ppl_switch.ops.small_linalg import small_cho_solve, small_cholesky, small_solve_lower_transpose

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)


class SwitchingParams(NamedTuple):
    """Parameters of a Gaussian-emission SLDS (a pytree).

    Attributes:
        initial_probs: (K,) pi0.
        transition_matrix: (K, K) P, rows sum to one.
        initial_mean: (D,) m0.
        initial_cov: (D, D) S0.
        dynamics_matrices: (K, D, D) A_k.
        dynamics_biases: (K, D) b_k, or (T-1, K, D) time-varying (inputs B_k u_{t+1} folded in).
        dynamics_covs: (K, D, D) Q_k.
        emission_matrix: (N, D) C.
        emission_bias: (N,) d.
        emission_cov: (N, N) R.
    """

    initial_probs: Array
    transition_matrix: Array
    initial_mean: Array
    initial_cov: Array
    dynamics_matrices: Array
    dynamics_biases: Array
    dynamics_covs: Array
    emission_matrix: Array
    emission_bias: Array
    emission_cov: Array


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def symmetrize(x):
    """(x + x') / 2 over the last two axes."""
    return 0.5 * (x + _mT(x))


def biases_per_step(biases: Array, num_steps: int) -> Array:
    """(T-1, K, D) dynamics biases from (K, D) or (T-1, K, D)."""
    if biases.ndim == 2:
        return jnp.broadcast_to(biases, (num_steps - 1,) + biases.shape)
    return biases


# --------------------------------------------------------------------------------------------------
# Per-regime transition log-likelihoods of a given path


def transition_residuals(x: Array, dynamics_matrices: Array, dynamics_biases: Array) -> Array:
    """(T-1, K, D) residuals x_{t+1} - A_k x_t - b_k of a path x (T, D) under every regime; biases (K, D)
    or (T-1, K, D)."""
    pred = jnp.einsum("kij,tj->tki", dynamics_matrices, x[:-1]) + biases_per_step(dynamics_biases, x.shape[0])
    return x[1:, None, :] - pred


def transition_log_likelihoods(x: Array, dynamics_matrices: Array, dynamics_biases: Array, dynamics_scale_trils: Array) -> Array:
    """log N(x_{t+1}; A_k x_t + b_k, L_k L_k') for every step and regime.

    Args:
        x: (T, D) continuous path.
        dynamics_matrices: (K, D, D).
        dynamics_biases: (K, D) or (T-1, K, D).
        dynamics_scale_trils: (K, D, D) lower Cholesky factors of Q_k.
    Returns:
        (T-1, K) log-likelihoods; row t scores the move x_t -> x_{t+1}.
    """
    D = x.shape[-1]
    resid = transition_residuals(x, dynamics_matrices, dynamics_biases)  # (T-1, K, D)
    L = jnp.broadcast_to(dynamics_scale_trils, resid.shape + (D,))
    white = solve_triangular(L, resid[..., None], lower=True)[..., 0]
    log_det = jnp.sum(jnp.log(jnp.diagonal(dynamics_scale_trils, axis1=-2, axis2=-1)), -1)
    return -0.5 * jnp.sum(white**2, -1) - log_det - 0.5 * D * _LOG_2PI


# --------------------------------------------------------------------------------------------------
# A masked Kalman update (shared by the collapsed filter)


def masked_emission(C, d, R, y, mask):
    """Zero the rows of unobserved coordinates and give them unit noise, so shapes stay static.

    Each unobserved coordinate then contributes exactly log N(0 | 0, 1); ``correction`` removes it.
    """
    both = mask[:, None] & mask[None, :]
    R_m = jnp.where(both, R, jnp.eye(R.shape[0], dtype=R.dtype))
    C_m = jnp.where(mask[:, None], C, 0.0)
    r0 = jnp.where(mask, y - d, 0.0)
    correction = 0.5 * _LOG_2PI * jnp.sum(~mask)
    return C_m, R_m, r0, correction


def kalman_update(mean, cov, C_m, R_m, r0, correction):
    """Condition N(mean, cov) on the masked observation. Returns (mean, cov, log p(y_obs))."""
    resid = r0 - C_m @ mean
    S = symmetrize(C_m @ cov @ C_m.T + R_m)
    L = jnp.linalg.cholesky(S)
    white = solve_triangular(L, resid, lower=True)
    ll = -0.5 * white @ white - jnp.sum(jnp.log(jnp.diag(L))) - 0.5 * resid.shape[0] * _LOG_2PI + correction
    gain = cho_solve((L, True), C_m @ cov).T  # cov C' S^-1
    new_mean = mean + gain @ resid
    I_KC = jnp.eye(mean.shape[0], dtype=cov.dtype) - gain @ C_m
    new_cov = symmetrize(I_KC @ cov @ I_KC.T + gain @ R_m @ gain.T)  # Joseph form
    return new_mean, new_cov, ll


# --------------------------------------------------------------------------------------------------
# Collapsed Gaussian-sum filter (one Gaussian per regime)


class GaussianSumFilterResult(NamedTuple):
    """Output of :func:`gaussian_sum_filter`.

    Attributes:
        log_likelihood: scalar, approximate log p(y_{1:T}) (exact for T <= 2 and when all regimes
            share their dynamics).
        step_log_likelihoods: (T,) approximate log p(y_t | y_{1:t-1}); 0 where nothing is observed.
        regime_probs: (T, K) approximate p(z_t = k | y_{1:t}).
        means: (T, K, D), covs: (T, K, D, D): the Gaussian kept for each regime, q(x_t | z_t=k, y_{1:t}).
        mixture_means: (T, D), mixture_covs: (T, D, D): moments of the filtered mixture q(x_t | y_{1:t}).
    """

    log_likelihood: Array
    step_log_likelihoods: Array
    regime_probs: Array
    means: Array
    covs: Array
    mixture_means: Array
    mixture_covs: Array


def moment_match(log_w, means, covs):
    """Collapse a mixture (weights over the leading axis) to one Gaussian by moment matching."""
    p = jax.nn.softmax(log_w)
    mean = jnp.einsum("j,jd->d", p, means)
    dev = means - mean
    cov = jnp.einsum("j,jde->de", p, covs + dev[:, :, None] * dev[:, None, :])
    return mean, symmetrize(cov)


def gaussian_sum_filter(params: SwitchingParams, y: Array, mask: Optional[Array] = None) -> GaussianSumFilterResult:
    """Collapsed Gaussian-sum filter (IMM / GPB2 with one component per regime) for one trial.

    At each step every (previous regime k, new regime k') pair runs one Kalman predict-update with
    (A_k', b_k', Q_k'); the K candidates for each new regime are weighted by
    q(z_t=k) P_kk' p(y_{t+1} | k, k', y_{1:t}) and merged into one Gaussian by moment matching.
    O(T K^2 D^3).

    Args:
        params: :class:`SwitchingParams`.
        y: (T, N) observations.
        mask: optional (T, N) bool, True = observed (a fully masked step is a pure prediction).
    """
    y = jnp.asarray(y)
    T, N = y.shape
    if mask is None:
        mask = jnp.ones((T, N), bool)
    K = params.initial_probs.shape[0]
    C, d, R = params.emission_matrix, params.emission_bias, params.emission_cov
    em = jax.vmap(masked_emission, in_axes=(None, None, None, 0, 0))(C, d, R, jnp.where(mask, y, 0.0), mask)
    b_steps = biases_per_step(params.dynamics_biases, T) if T > 1 else jnp.zeros((0, K, C.shape[1]), y.dtype)
    A, Q = params.dynamics_matrices, params.dynamics_covs
    log_P = jnp.log(params.transition_matrix)

    m0, S0, ll0 = kalman_update(params.initial_mean, params.initial_cov, *jax.tree.map(lambda a: a[0], em))
    log_q0 = jnp.log(params.initial_probs)
    means0 = jnp.broadcast_to(m0, (K,) + m0.shape)
    covs0 = jnp.broadcast_to(S0, (K,) + S0.shape)

    def pair_update(mean, cov, A_k, b_k, Q_k, emission):
        pm = A_k @ mean + b_k
        pc = symmetrize(A_k @ cov @ A_k.T) + Q_k
        return kalman_update(pm, pc, *emission)

    def step(carry, inputs):
        log_q, means, covs = carry
        b_t, emission = inputs
        # (k, k') grid: previous component k, new regime k'
        upd = jax.vmap(jax.vmap(pair_update, (None, None, 0, 0, 0, None)), (0, 0, None, None, None, None))
        new_means, new_covs, ll = upd(means, covs, A, b_t, Q, emission)  # (K, K, D), (K, K, D, D), (K, K)
        log_w = log_q[:, None] + log_P + ll
        step_ll = jax.nn.logsumexp(log_w)
        log_q_new = jax.nn.logsumexp(log_w, axis=0) - step_ll
        merged = jax.vmap(moment_match, in_axes=(1, 1, 1))(log_w, new_means, new_covs)
        return (log_q_new, *merged), (step_ll, log_q_new, *merged)

    if T > 1:
        rest = jax.tree.map(lambda a: a[1:], em)
        _, (lls, log_qs, means, covs) = lax.scan(step, (log_q0, means0, covs0), (b_steps, rest))
        step_lls = jnp.concatenate([ll0[None], lls])
        log_qs = jnp.concatenate([log_q0[None], log_qs])
        means = jnp.concatenate([means0[None], means])
        covs = jnp.concatenate([covs0[None], covs])
    else:
        step_lls, log_qs, means, covs = ll0[None], log_q0[None], means0[None], covs0[None]
    step_lls = jnp.where(jnp.any(mask, -1), step_lls, 0.0)  # nothing observed: exactly 0
    mix_means, mix_covs = jax.vmap(moment_match)(log_qs, means, covs)
    return GaussianSumFilterResult(jnp.sum(step_lls), step_lls, jnp.exp(log_qs), means, covs, mix_means, mix_covs)


# --------------------------------------------------------------------------------------------------
# Brute force over all regime paths (oracle, tiny T)


def regime_paths(num_states: int, num_timesteps: int) -> np.ndarray:
    """All K^T regime paths as an int array (K^T, T). Refuses more than 2**20 paths."""
    if num_states**num_timesteps > 2**20:
        raise ValueError(f"num_timesteps: K^T = {num_states}^{num_timesteps} paths is too many to enumerate")
    return np.array(list(itertools.product(range(num_states), repeat=num_timesteps)), dtype=np.int32)


def path_log_prior(paths: Array, initial_probs: Array, transition_matrix: Array) -> Array:
    """log p(z_{1:T}) of each path in ``paths`` (M, T). Returns (M,)."""
    lp = jnp.log(initial_probs)[paths[:, 0]]
    return lp + jnp.sum(jnp.log(transition_matrix)[paths[:, :-1], paths[:, 1:]], axis=1)


def exact_log_likelihood_by_enumeration(params: SwitchingParams, y: Array, mask: Optional[Array] = None) -> Array:
    """Exact log p(y_{1:T}) = logsumexp over all K^T paths of log p(z) + log p(y | z) (Kalman per path)."""
    from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter

    T = y.shape[0]
    K = params.initial_probs.shape[0]
    paths = jnp.asarray(regime_paths(K, T))
    b_steps = biases_per_step(params.dynamics_biases, T) if T > 1 else None

    def path_ll(path):
        nxt = path[1:]
        A = params.dynamics_matrices[nxt]
        Q = params.dynamics_covs[nxt]
        b = b_steps[jnp.arange(T - 1), nxt] if T > 1 else jnp.zeros((0, A.shape[-1]))
        if T == 1:  # a single step has no transition: any constant dynamics will do
            A, Q = params.dynamics_matrices[0], params.dynamics_covs[0]
            b = jnp.zeros(A.shape[-1], A.dtype)
        lg = LGSSMParams(params.initial_mean, params.initial_cov, A, b, Q, params.emission_matrix, params.emission_bias, params.emission_cov)
        return lgssm_filter(lg, y, mask).log_likelihood

    return jax.nn.logsumexp(path_log_prior(paths, params.initial_probs, params.transition_matrix) + jax.vmap(path_ll)(paths))


# --------------------------------------------------------------------------------------------------
# Gaussian Markov chain in information form


class ChainPosterior(NamedTuple):
    """Moments of p(x) ∝ exp(-x'Jx/2 + h'x) with block-tridiagonal J.

    Attributes:
        means: (T, D).
        covs: (T, D, D) marginal covariances.
        cross_covs: (T-1, D, D); row t is Cov[x_{t+1}, x_t] (next state first, as in ops.kalman).
        log_normalizer: log ∫ exp(-x'Jx/2 + h'x) dx.
        logdet_precision: log|J|.
    """

    means: Array
    covs: Array
    cross_covs: Array
    log_normalizer: Array
    logdet_precision: Array


def _cho(L, b):
    """(L L')^-1 b for lower-triangular L (..., D, D) and b (..., D) or (..., D, m) (written out for small D)."""
    if b.ndim == L.ndim - 1:
        return small_cho_solve(L, b[..., None])[..., 0]
    return small_cho_solve(L, b)


def chain_forward(J_diag, J_lower, h):
    """Block LDL' elimination from t = 0: Schur complements P_t and eliminated linear terms.

    P_0 = J_00, P_t = J_tt - J_{t,t-1} P_{t-1}^{-1} J_{t-1,t}; hh_t = h_t - J_{t,t-1} P_{t-1}^{-1} hh_{t-1}.
    Returns Cholesky factors of P (T, D, D) and hh (T, D).
    """
    L0 = small_cholesky(J_diag[0])

    def step(carry, inp):
        L_prev, hh_prev = carry
        Jtt, Jlow, ht = inp  # Jlow = J_{t,t-1}
        Pinv_Jup = _cho(L_prev, Jlow.T)  # P^-1 J_{t-1,t}
        P = symmetrize(Jtt - Jlow @ Pinv_Jup)
        hh = ht - Jlow @ _cho(L_prev, hh_prev)
        L = small_cholesky(P)
        return (L, hh), (L, hh)

    _, (Ls, hhs) = lax.scan(step, (L0, h[0]), (J_diag[1:], J_lower, h[1:]))
    return jnp.concatenate([L0[None], Ls]), jnp.concatenate([h[:1], hhs])


def chain_solve(J_diag, J_lower, b):
    """J^-1 b by block elimination (forward Schur complements, backward substitution), O(T D^3).
    J_diag (T, D, D), J_lower (T-1, D, D) (row t is J_{t+1,t}); b (T, D) or (T, D, m)."""
    Ls, hhs = chain_forward(J_diag, J_lower, b)
    x_last = _cho(Ls[-1], hhs[-1])

    def back(x_next, inp):
        L, hh, Jlow = inp
        x = _cho(L, hh - Jlow.T @ x_next)
        return x, x

    _, xs = lax.scan(back, x_last, (Ls[:-1], hhs[:-1], J_lower), reverse=True)
    return jnp.concatenate([xs, x_last[None]])


def gaussian_chain_posterior(J_diag: Array, J_lower: Array, h: Array) -> ChainPosterior:
    """Moments of the Gaussian chain with precision blocks J_diag (T, D, D), J_lower (T-1, D, D)
    (row t is J_{t+1,t}) and linear term h (T, D). O(T D^3), sequential."""
    T, D = h.shape
    Ls, hhs = chain_forward(J_diag, J_lower, h)
    logdets = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Ls, axis1=-2, axis2=-1)), -1)
    quad = jnp.sum(hhs * _cho(Ls, hhs), -1)
    log_norm = 0.5 * jnp.sum(quad) - 0.5 * jnp.sum(logdets) + 0.5 * T * D * _LOG_2PI
    eye = jnp.eye(D, dtype=h.dtype)
    mean_last = _cho(Ls[-1], hhs[-1])
    cov_last = _cho(Ls[-1], eye)

    def back(carry, inp):
        m_next, S_next = carry
        L, hh, Jlow = inp  # Jlow = J_{t+1,t}
        G = -_cho(L, Jlow.T)  # x_t = G x_{t+1} + P^-1 hh + noise
        m = _cho(L, hh) + G @ m_next
        cross = G @ S_next  # Cov[x_t, x_{t+1}]
        S = symmetrize(_cho(L, eye) + cross @ G.T)
        return (m, S), (m, S, cross.T)

    _, (ms, Ss, crosses) = lax.scan(back, (mean_last, cov_last), (Ls[:-1], hhs[:-1], J_lower), reverse=True)
    means = jnp.concatenate([ms, mean_last[None]])
    covs = jnp.concatenate([Ss, cov_last[None]])
    return ChainPosterior(means, covs, crosses, log_norm, jnp.sum(logdets))


def gaussian_chain_sample(key: Array, J_diag: Array, J_lower: Array, h: Array) -> Array:
    """One draw x (T, D) from the Gaussian chain (backward sampling after block elimination)."""
    T, D = h.shape
    Ls, hhs = chain_forward(J_diag, J_lower, h)
    eps = jax.random.normal(key, (T, D), h.dtype)

    def draw(L, hh, e, coupling):  # x = P^-1 (hh - coupling) + L'^-1 e, with P = L L'
        return _cho(L, hh - coupling) + small_solve_lower_transpose(L, e[:, None])[:, 0]

    x_last = draw(Ls[-1], hhs[-1], eps[-1], 0.0)

    def back(x_next, inp):
        L, hh, Jlow, e = inp
        x = draw(L, hh, e, Jlow.T @ x_next)
        return x, x

    _, xs = lax.scan(back, x_last, (Ls[:-1], hhs[:-1], J_lower, eps[:-1]), reverse=True)
    return jnp.concatenate([xs, x_last[None]])


# --------------------------------------------------------------------------------------------------
# Structured mean-field variational EM: q(z, x) = q(z) q(x)
#
# Expected log joint under q(z) (marginals gamma_t) for one transition x_t -> x_{t+1}:
#     sum_k gamma_{t+1}(k) log N(x_{t+1}; A_k x_t + b_k, Q_k)
# is a quadratic form in (x_t, x_{t+1}) whose blocks are q(z)-averaged *precisions*:
#     J_{t+1,t+1} += sum_k g_k Q_k^-1,             J_{t+1,t} += -sum_k g_k Q_k^-1 A_k,
#     J_{t,t}     += sum_k g_k A_k' Q_k^-1 A_k,    h_{t+1} += sum_k g_k Q_k^-1 b_k,
#     h_t         += -sum_k g_k A_k' Q_k^-1 b_k.
# This is not the LDS with averaged A: sum_k g_k A_k'Q_k^-1 A_k exceeds (sum g A)'(sum g Q^-1)^-1(sum g A)
# by the q(z)-variance of the dynamics, an extra precision on x_t. q(x) is therefore a Gaussian chain
# in information form (gaussian_chain_posterior), exact whatever Q_k are.


def _inv_spd(M):
    L = small_cholesky(M)
    return small_cho_solve(L, jnp.broadcast_to(jnp.eye(M.shape[-1], dtype=M.dtype), M.shape))


def _logdet_spd(M):
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(small_cholesky(M), axis1=-2, axis2=-1)), -1)


def _expected_gaussian_log_prob(mu, Sigma, mean, cov_inv, logdet_cov):
    """E_{x ~ N(mu, Sigma)} log N(x; mean, cov) for precomputed cov^-1 and log|cov|."""
    r = mu - mean
    D = mu.shape[-1]
    return -0.5 * (D * _LOG_2PI + logdet_cov + jnp.trace(cov_inv @ (Sigma + jnp.outer(r, r))))


def smf_x_potentials(params: SwitchingParams, state_probs: Array, y: Array, mask: Array, time_mask: Array):
    """Block-tridiagonal precision and linear term of the optimal q(x) given q(z) marginals (one trial).

    Args:
        params: :class:`SwitchingParams` with ``dynamics_biases`` (T-1, K, D).
        state_probs: (T, K) q(z_t = k).
        y, mask: (T, N) observations and entry mask.
        time_mask: (T,) bool, steps inside the trial. Steps past the end get x_t ~ N(0, I), decoupled.
    Returns:
        J_diag (T, D, D), J_lower (T-1, D, D) (row t is J_{t+1,t}), h (T, D).
    """
    T = y.shape[0]
    D = params.initial_mean.shape[0]
    A, Q = params.dynamics_matrices, params.dynamics_covs
    Qinv = _inv_spd(Q)  # (K, D, D)
    QinvA = Qinv @ A
    AtQinvA = _mT(A) @ QinvA
    Qinv_b = jnp.einsum("kij,tkj->tki", Qinv, params.dynamics_biases)  # (T-1, K, D)
    At_Qinv_b = jnp.einsum("kji,tkj->tki", A, Qinv_b)
    w = state_probs[1:] * time_mask[1:, None]  # only transitions into steps inside the trial

    eye = jnp.eye(D, dtype=y.dtype)
    J_diag = jnp.zeros((T, D, D), y.dtype)
    h = jnp.zeros((T, D), y.dtype)
    S0inv = _inv_spd(params.initial_cov)
    J_diag = J_diag.at[0].add(S0inv)
    h = h.at[0].add(S0inv @ params.initial_mean)
    # emissions, with unobserved coordinates removed (masked rows of C are zero)
    C_m, R_m, r0, _ = jax.vmap(masked_emission, in_axes=(None, None, None, 0, 0))(
        params.emission_matrix, params.emission_bias, params.emission_cov, jnp.where(mask, y, 0.0), mask
    )
    CtRinv = _mT(C_m) @ _inv_spd(R_m)  # (T, D, N)
    J_diag = J_diag + CtRinv @ C_m
    h = h + jnp.einsum("tdn,tn->td", CtRinv, r0)
    # dynamics, q(z)-averaged in precision form
    J_diag = J_diag.at[1:].add(jnp.einsum("tk,kij->tij", w, Qinv))
    J_diag = J_diag.at[:-1].add(jnp.einsum("tk,kij->tij", w, AtQinvA))
    J_lower = -jnp.einsum("tk,kij->tij", w, QinvA)
    h = h.at[1:].add(jnp.einsum("tk,tki->ti", w, Qinv_b))
    h = h.at[:-1].add(-jnp.einsum("tk,tki->ti", w, At_Qinv_b))
    J_diag = J_diag + (~time_mask)[:, None, None] * eye  # padding: x_t ~ N(0, I)
    return J_diag, J_lower, h


def smf_transition_log_likelihoods(params: SwitchingParams, post: ChainPosterior, time_mask: Array) -> Array:
    """(T, K) expected log N(x_{t}; A_k x_{t-1} + b_k, Q_k) under q(x); row 0 and padded rows are 0."""
    A, Q = params.dynamics_matrices, params.dynamics_covs
    Qinv, logdetQ = _inv_spd(Q), _logdet_spd(Q)
    mu, S, X = post.means, post.covs, post.cross_covs
    D = mu.shape[-1]

    def one(A_k, b_k, Qinv_k, logdet_k):  # b_k (T-1, D)
        r = mu[1:] - mu[:-1] @ A_k.T - b_k
        AX = A_k @ _mT(X)  # A Cov[x_t, x_{t+1}]
        E = S[1:] - _mT(AX) - AX + A_k @ S[:-1] @ A_k.T + r[:, :, None] * r[:, None, :]
        return -0.5 * (D * _LOG_2PI + logdet_k + jnp.einsum("ij,tji->t", Qinv_k, E))

    ell = jax.vmap(one, in_axes=(0, 1, 0, 0), out_axes=1)(A, params.dynamics_biases, Qinv, logdetQ)
    ell = ell * time_mask[1:, None]
    return jnp.concatenate([jnp.zeros_like(ell[:1]), ell])


def smf_expected_x_terms(params: SwitchingParams, post: ChainPosterior, y: Array, mask: Array, time_mask: Array) -> Array:
    """E_q(x)[log p(x_1) + sum_t log p(y_t | x_t) + padding terms] + H[q(x)] (one trial, scalar)."""
    mu, S = post.means, post.covs
    T, D = mu.shape
    S0 = params.initial_cov
    init = _expected_gaussian_log_prob(mu[0], S[0], params.initial_mean, _inv_spd(S0), _logdet_spd(S0))
    C_m, R_m, r0, _ = jax.vmap(masked_emission, in_axes=(None, None, None, 0, 0))(
        params.emission_matrix, params.emission_bias, params.emission_cov, jnp.where(mask, y, 0.0), mask
    )
    r = r0 - jnp.einsum("tnd,td->tn", C_m, mu)
    E = C_m @ S @ _mT(C_m) + r[:, :, None] * r[:, None, :]
    emis = -0.5 * (jnp.sum(mask, -1) * _LOG_2PI + _logdet_spd(R_m) + jnp.einsum("tij,tji->t", _inv_spd(R_m), E))
    pad = -0.5 * (D * _LOG_2PI + jnp.trace(S, axis1=-2, axis2=-1) + jnp.sum(mu**2, -1))
    entropy = 0.5 * T * D * (1.0 + _LOG_2PI) - 0.5 * post.logdet_precision
    return init + jnp.sum(emis) + jnp.sum(jnp.where(time_mask, 0.0, pad)) + entropy


# --------------------------------------------------------------------------------------------------
# Variational EM driver (closed-form M-step with conjugate regularisers)
#
# Parameters are a dict of arrays: initial_probs (K,), transition_matrix (K, K), initial_mean (D,),
# initial_cov (D, D), dynamics_matrices (K, D, D), dynamics_biases (K, D), input_matrices (K, D, U),
# dynamics_covs (K, D, D), emission_matrix (N, D), emission_bias (N,), emission_cov (N, N).
# The M-step maximises E_q[log p(y, x, z | theta)] + log p(theta) with conjugate priors:
#   P rows ~ Dirichlet(pseudocounts + 1);  [A_k b_k B_k] | Q_k ~ MN(W0, Q_k, V0);  Q_k ~ IW(Psi, nu);
#   S0 ~ IW(Psi0, nu0);  R ~ IW (full) or per-coordinate inverse-gamma (diagonal); flat elsewhere.
# The tracked objective is the ELBO plus that log prior, which every E- and M-step cannot decrease.

EM_GROUPS = ("initial", "transitions", "dynamics", "emission_matrix", "emission_bias", "emission_cov")


class EMPrior(NamedTuple):
    """Conjugate regularisers of the M-step (see module comment). F = D + 1 + U regression features."""

    transition_pseudocounts: Array  # (K, K) Dirichlet concentration minus one
    dynamics_prior_mean: Array  # (D, F) W0
    dynamics_prior_precision: Array  # (F, F) V0^-1
    dynamics_cov_scale: Array  # (D, D) Psi
    dynamics_cov_dof: Array  # () nu
    initial_cov_scale: Array  # (D, D) Psi0
    initial_cov_dof: Array  # () nu0
    emission_cov_scale: Array  # (N,) diagonal psi_R, or (N, N) full Psi_R
    emission_cov_dof: Array  # () nu_R


def switching_params(p, inputs_t):
    """SwitchingParams for one trial: biases b_k + B_k u_{t+1}, (T-1, K, D)."""
    b = p["dynamics_biases"][None] + jnp.einsum("kdu,tu->tkd", p["input_matrices"], inputs_t[1:])
    return SwitchingParams(
        p["initial_probs"], p["transition_matrix"], p["initial_mean"], p["initial_cov"], p["dynamics_matrices"], b,
        p["dynamics_covs"], p["emission_matrix"], p["emission_bias"], p["emission_cov"],
    )


def sufficient_stats(post: ChainPosterior, gamma, transition_counts, y, mask, time_mask, inputs_t):
    """Expected sufficient statistics of one trial under q(x) q(z).

    gamma (T, K) q(z_t) marginals; transition_counts (K, K) sum over the pairs inside the trial of
    q(z_t = i, z_{t+1} = j) (:func:`~ppl_switch.ops.hmm.hmm_posterior_stats` with pair weights
    ``time_mask[1:]``, or :func:`pair_counts`)."""
    mu, S, X = post.means, post.covs, post.cross_covs
    T, D = mu.shape
    ones = jnp.ones((T, 1), mu.dtype)
    Exx = S + mu[:, :, None] * mu[:, None, :]
    Exnx = X + mu[1:, :, None] * mu[:-1, None, :]  # E[x_{t+1} x_t']
    # dynamics regression of x_{t+1} on f_t = [x_t, 1, u_{t+1}]
    u = inputs_t[1:]
    fm = jnp.concatenate([mu[:-1], ones[1:], u], -1)  # (T-1, F)
    Eff = fm[:, :, None] * fm[:, None, :]
    Eff = Eff.at[:, :D, :D].set(Exx[:-1])
    Eyf = jnp.concatenate([Exnx, (mu[1:, :, None] * fm[:, None, D:])], -1)  # (T-1, D, F)
    w = gamma[1:] * time_mask[1:, None]  # (T-1, K)
    dyn = dict(
        n=w.sum(0),
        Sff=jnp.einsum("tk,tij->kij", w, Eff),
        Syf=jnp.einsum("tk,tij->kij", w, Eyf),
        Syy=jnp.einsum("tk,tij->kij", w, Exx[1:]),
    )
    # emission regression of y_t on [x_t, 1]
    gm = jnp.concatenate([mu, ones], -1)
    Egg = gm[:, :, None] * gm[:, None, :]
    Egg = Egg.at[:, :D, :D].set(Exx)
    m = mask.astype(mu.dtype)
    yz = jnp.where(mask, y, 0.0)
    step = jnp.any(mask, -1).astype(mu.dtype)
    emis = dict(
        M_diag=jnp.einsum("tn,tij->nij", m, Egg), v_diag=jnp.einsum("tn,ti->ni", m * yz, gm),
        yy_diag=jnp.sum(m * yz**2, 0), n_diag=m.sum(0),
        M=jnp.einsum("t,tij->ij", step, Egg), V=jnp.einsum("tn,ti->ni", yz * step[:, None], gm),
        YY=jnp.einsum("tn,tm->nm", yz, yz), n=step.sum(),
    )
    return dict(init_probs=gamma[0], init_mean=mu[0], init_second=Exx[0], trans=transition_counts, dyn=dyn, emis=emis)


def pair_counts(pairwise, time_mask):
    """(K, K) transition counts from pairwise marginals (T-1, K, K), pairs inside the trial only."""
    return jnp.sum(pairwise * time_mask[1:, None, None], 0)


def _iw_log_prior(cov, scale, dof):
    D = cov.shape[-1]
    return -0.5 * (dof + D + 1) * _logdet_spd(cov) - 0.5 * jnp.trace(_inv_spd(cov) @ scale, axis1=-2, axis2=-1)


def em_log_prior(p, prior: EMPrior, diagonal_emission: bool, tied_dynamics_cov: bool = False):
    """log p(theta) of the M-step's conjugate priors, up to a constant."""
    lp = jnp.sum(jax.scipy.special.xlogy(prior.transition_pseudocounts, p["transition_matrix"]))
    W = jnp.concatenate([p["dynamics_matrices"], p["dynamics_biases"][..., None], p["input_matrices"]], -1)
    dW = W - prior.dynamics_prior_mean
    Qinv = _inv_spd(p["dynamics_covs"])
    F = W.shape[-1]
    lp += jnp.sum(-0.5 * jnp.einsum("kij,kjf,fg,kig->k", Qinv, dW, prior.dynamics_prior_precision, dW))
    lp += jnp.sum(-0.5 * F * _logdet_spd(p["dynamics_covs"]))
    if tied_dynamics_cov:
        lp += _iw_log_prior(p["dynamics_covs"][0], prior.dynamics_cov_scale, prior.dynamics_cov_dof)
    else:
        lp += jnp.sum(_iw_log_prior(p["dynamics_covs"], prior.dynamics_cov_scale, prior.dynamics_cov_dof))
    lp += _iw_log_prior(p["initial_cov"], prior.initial_cov_scale, prior.initial_cov_dof)
    if diagonal_emission:
        r = jnp.diagonal(p["emission_cov"])
        lp += jnp.sum(-(0.5 * prior.emission_cov_dof + 1) * jnp.log(r) - 0.5 * prior.emission_cov_scale / r)
    else:
        lp += _iw_log_prior(p["emission_cov"], prior.emission_cov_scale, prior.emission_cov_dof)
    return lp


def em_m_step(p, stats, prior: EMPrior, learn: frozenset, diagonal_emission: bool, tied_dynamics_cov: bool = False):
    """Closed-form maximiser of E_q[log p(y, x, z | theta)] + log p(theta); ``stats`` summed over trials."""
    p = dict(p)
    D = p["initial_mean"].shape[0]
    if "initial" in learn:
        g0 = stats["init_probs"]
        p["initial_probs"] = g0 / g0.sum()
        B = stats["num_trials"]
        m0 = stats["init_mean"] / B
        scatter = stats["init_second"] - B * jnp.outer(m0, m0)
        p["initial_mean"] = m0
        p["initial_cov"] = symmetrize(scatter + prior.initial_cov_scale) / (B + prior.initial_cov_dof + D + 1)
    if "transitions" in learn:
        counts = stats["trans"] + prior.transition_pseudocounts
        p["transition_matrix"] = counts / counts.sum(-1, keepdims=True)
    if "dynamics" in learn:
        dyn = stats["dyn"]
        V0inv, W0 = prior.dynamics_prior_precision, prior.dynamics_prior_mean
        lhs = dyn["Sff"] + V0inv
        rhs = dyn["Syf"] + W0 @ V0inv
        W = _mT(jnp.linalg.solve(lhs, _mT(rhs)))  # (K, D, F); lhs symmetric
        resid = dyn["Syy"] - W @ _mT(dyn["Syf"]) - dyn["Syf"] @ _mT(W) + W @ dyn["Sff"] @ _mT(W)
        resid = resid + (W - W0) @ V0inv @ _mT(W - W0)
        F = W.shape[-1]
        p["dynamics_matrices"] = W[..., :D]
        p["dynamics_biases"] = W[..., D]
        p["input_matrices"] = W[..., D + 1 :]
        if tied_dynamics_cov:  # one Q shared by all regimes (one IW prior, K matrix-normal priors)
            K = W.shape[0]
            dof = jnp.sum(dyn["n"]) + K * F + prior.dynamics_cov_dof + D + 1
            Q = symmetrize(jnp.sum(resid, 0) + prior.dynamics_cov_scale) / dof
            p["dynamics_covs"] = jnp.broadcast_to(Q, resid.shape)
        else:
            dof = dyn["n"] + F + prior.dynamics_cov_dof + D + 1
            p["dynamics_covs"] = symmetrize(resid + prior.dynamics_cov_scale) / dof[:, None, None]
    if {"emission_matrix", "emission_bias", "emission_cov"} & learn:
        e = stats["emis"]
        C, d = p["emission_matrix"], p["emission_bias"]
        if diagonal_emission:
            M, v, n = e["M_diag"], e["v_diag"], e["n_diag"]
            if "emission_matrix" in learn:  # joint [c_i, d_i] per coordinate
                ridge = 1e-9 * jnp.eye(D + 1, dtype=M.dtype)
                w = jnp.linalg.solve(M + ridge, v[..., None])[..., 0]
            elif "emission_bias" in learn:
                d = (v[:, D] - jnp.einsum("nd,nd->n", C, M[:, :D, D])) / jnp.maximum(n, 1.0)
                w = jnp.concatenate([C, d[:, None]], -1)
            else:
                w = jnp.concatenate([C, d[:, None]], -1)
            p["emission_matrix"], p["emission_bias"] = w[:, :D], w[:, D]
            if "emission_cov" in learn:
                sq = e["yy_diag"] - 2 * jnp.sum(w * v, -1) + jnp.einsum("ni,nij,nj->n", w, M, w)
                r = (sq + prior.emission_cov_scale) / (n + prior.emission_cov_dof + 2)
                p["emission_cov"] = jnp.diag(r)
        else:
            M, V, n = e["M"], e["V"], e["n"]
            if "emission_matrix" in learn:
                W = _mT(jnp.linalg.solve(M + 1e-9 * jnp.eye(D + 1, dtype=M.dtype), _mT(V)))
            elif "emission_bias" in learn:
                d = (V[:, D] - C @ M[:D, D]) / jnp.maximum(n, 1.0)
                W = jnp.concatenate([C, d[:, None]], -1)
            else:
                W = jnp.concatenate([C, d[:, None]], -1)
            p["emission_matrix"], p["emission_bias"] = W[:, :D], W[:, D]
            if "emission_cov" in learn:
                resid = e["YY"] - W @ V.T - V @ W.T + W @ M @ W.T
                N = V.shape[0]
                p["emission_cov"] = symmetrize(resid + prior.emission_cov_scale) / (n + prior.emission_cov_dof + N + 1)
    return p


def residual_covariances(p, posts, gamma, y, mask, time_mask, inputs, prior: EMPrior, learn: frozenset, diagonal: bool,
                         tied: bool):
    """Q_k and R of the conjugate M-step recomputed from per-step residuals (same maximiser, stable).

    :func:`em_m_step` forms the residual scatter as Syy - W Syf' - Syf W' + W Sff W' from
    summed second moments. On near-noiseless data (observation sd 0.01, nearly deterministic dynamics)
    the sums are O(T |x|^2) while the scatter is O(T Q): in float32 the difference loses every digit and
    goes indefinite (Q_k with a negative diagonal after ~13 iterations of the rSLDS EM on NASCAR, T = 3000, then
    NaN everywhere). Here the same quantity is summed term by term from residuals of the means plus the
    small covariance corrections, each of which is already of the size of the result:

        Q_k = [sum_t w_tk E_q[e_tk e_tk'] + (W_k - W0) V0^-1 (W_k - W0)' + Psi] / (n_k + F + nu + D + 1),
        e_tk = x_{t+1} - A_k x_t - b_k - B_k u_{t+1},
        E_q[e e'] = r r' + S_{t+1} - A_k X_t' - X_t A_k' + A_k S_t A_k'   (r: residual of the means);
        R_nn = [sum_t m_tn ((y_tn - c_n mu_t - d_n)^2 + c_n S_t c_n') + psi_n] / (n_n + nu + 2)   (diagonal),

    the full-R case likewise. Exact arithmetic gives :func:`em_m_step`'s values (tested), so the objective
    stays monotone. posts: ChainPosterior with leading trial axis (means (B, T, D), covs, cross_covs
    (B, T-1, D, D) = Cov[x_{t+1}, x_t]); gamma (B, T, K); p: params after ``em_m_step``.
    """
    p = dict(p)
    D = p["initial_mean"].shape[0]
    mu, S, X = posts.means, posts.covs, posts.cross_covs
    if "dynamics" in learn:
        A = p["dynamics_matrices"]
        b = p["dynamics_biases"][None, None] + jnp.einsum("kdu,btu->btkd", p["input_matrices"], inputs[:, 1:])
        r = mu[:, 1:, None, :] - jnp.einsum("kij,btj->btki", A, mu[:, :-1]) - b  # (B, T-1, K, D)
        AX = jnp.einsum("kij,btlj->btkil", A, X)  # A_k Cov[x_t, x_{t+1}] (B, T-1, K, D, D)
        ASA = jnp.einsum("kij,btjl,kml->btkim", A, S[:, :-1], A)
        E = S[:, 1:, None] - AX - jnp.swapaxes(AX, -1, -2) + ASA + r[..., :, None] * r[..., None, :]
        w = gamma[:, 1:] * time_mask[:, 1:, None]  # (B, T-1, K)
        scatter = jnp.einsum("btk,btkij->kij", w, E)
        W = jnp.concatenate([A, p["dynamics_biases"][..., None], p["input_matrices"]], -1)
        dW = W - prior.dynamics_prior_mean
        scatter = scatter + dW @ prior.dynamics_prior_precision @ jnp.swapaxes(dW, -1, -2)
        F = W.shape[-1]
        n = w.sum((0, 1))
        if tied:
            Q = symmetrize(jnp.sum(scatter, 0) + prior.dynamics_cov_scale) / (jnp.sum(n) + W.shape[0] * F + prior.dynamics_cov_dof + D + 1)
            p["dynamics_covs"] = jnp.broadcast_to(Q, scatter.shape)
        else:
            p["dynamics_covs"] = symmetrize(scatter + prior.dynamics_cov_scale) / (n + F + prior.dynamics_cov_dof + D + 1)[:, None, None]
    if "emission_cov" in learn:
        C, d = p["emission_matrix"], p["emission_bias"]
        resid = jnp.where(mask, y - jnp.einsum("nd,btd->btn", C, mu) - d, 0.0)  # (B, T, N)
        if diagonal:
            m = mask.astype(mu.dtype)
            cov_part = jnp.einsum("nd,btde,ne->btn", C, S, C)
            sq = jnp.sum(m * (resid**2 + cov_part), (0, 1))
            p["emission_cov"] = jnp.diag((sq + prior.emission_cov_scale) / (m.sum((0, 1)) + prior.emission_cov_dof + 2))
        else:
            step = jnp.any(mask, -1).astype(mu.dtype)  # (B, T): full R needs all-or-nothing steps
            E = resid[..., :, None] * resid[..., None, :] + jnp.einsum("nd,btde,me->btnm", C, S, C)
            N = C.shape[0]
            p["emission_cov"] = symmetrize(jnp.einsum("bt,btnm->nm", step, E) + prior.emission_cov_scale) / (step.sum() + prior.emission_cov_dof + N + 1)
    return p


class EMTrialPosterior(NamedTuple):
    """q(x) and q(z) of every trial after the last E-step. Shapes lead with trials."""

    state_probs: Array  # (B, T, K)
    means: Array  # (B, T, D)
    covs: Array  # (B, T, D, D)
    cross_covs: Array  # (B, T-1, D, D)
    J_diag: Array  # (B, T, D, D) information form of q(x), for sampling
    J_lower: Array  # (B, T-1, D, D)
    h: Array  # (B, T, D)


def _e_step_trial(p, gamma, y, mask, time_mask, inputs_t):
    """One CAVI sweep for one trial: q(x) given q(z), then q(z) given q(x). Returns (elbo, stats, q)."""
    sp = switching_params(p, inputs_t)
    J_diag, J_lower, h = smf_x_potentials(sp, gamma, y, mask, time_mask)
    post = gaussian_chain_posterior(J_diag, J_lower, h)
    ell = smf_transition_log_likelihoods(sp, post, time_mask)
    hmm = hmm_posterior_stats(p["initial_probs"], p["transition_matrix"], ell, time_mask, time_mask[1:])
    elbo = hmm.log_normalizer + smf_expected_x_terms(sp, post, y, mask, time_mask)
    stats = sufficient_stats(post, hmm.smoothed_probs, hmm.transition_counts, y, mask, time_mask, inputs_t)
    q = EMTrialPosterior(hmm.smoothed_probs, post.means, post.covs, post.cross_covs, J_diag, J_lower, h)
    return elbo, stats, q


def sum_trials(stats, time_mask):
    """Per-trial statistics (leading axis B) summed over the real trials.

    A real trial has ``time_mask[b, 0]`` True (every validated trial has length >= 1); a trial of length
    0 pads the trial count for ``devices=`` (:mod:`ppl_switch.infer.sharding`): its dynamics, emission and
    transition statistics are already 0 (masked by time), and its initial-state terms are dropped here."""
    real = time_mask[:, 0]
    keep = lambda a: a * real.reshape(real.shape + (1,) * (a.ndim - 1)).astype(a.dtype)
    out = jax.tree.map(lambda a: jnp.sum(a, 0), stats)
    for name in ("init_probs", "init_mean", "init_second"):
        out[name] = jnp.sum(keep(stats[name]), 0)
    out["num_trials"] = real.sum().astype(stats["init_mean"].dtype)
    return out


def real_trial_sum(per_trial, time_mask):
    """Sum of a per-trial (B,) quantity (ELBO terms) over the real trials (``time_mask[:, 0]``, see
    :func:`sum_trials`)."""
    return jnp.sum(jnp.where(time_mask[:, 0], per_trial, 0.0))


def em_init_step(p, gamma, y, mask, time_mask, inputs, prior, learn, diagonal_emission, tied_dynamics_cov=False):
    """Break the symmetry of equal regimes: q(x) under the given (hard) q(z) paths, then an M-step that
    uses those paths (pairwise q(z_t, z_{t+1}) = outer product of the one-hot marginals)."""

    def trial(gamma_b, y_b, m_b, tm_b, u_b):
        sp = switching_params(p, u_b)
        post = gaussian_chain_posterior(*smf_x_potentials(sp, gamma_b, y_b, m_b, tm_b))
        counts = jnp.einsum("t,ti,tj->ij", tm_b[1:].astype(gamma_b.dtype), gamma_b[:-1], gamma_b[1:])
        return sufficient_stats(post, gamma_b, counts, y_b, m_b, tm_b, u_b), post

    stats, posts = jax.vmap(trial)(gamma, y, mask, time_mask, inputs)
    p_new = em_m_step(p, sum_trials(stats, time_mask), prior, learn, diagonal_emission, tied_dynamics_cov)
    return residual_covariances(p_new, posts, gamma, y, mask, time_mask, inputs, prior, learn, diagonal_emission, tied_dynamics_cov)


def structured_mean_field_em(p, gamma, y, mask, time_mask, inputs, prior: EMPrior, learn: frozenset, num_iters: int,
                             diagonal_emission: bool, tied_dynamics_cov: bool = False, return_checks: bool = False):
    """Structured mean-field variational EM for a batch of trials (jit-able; ``learn``, ``num_iters`` static).

    Each iteration: q(x) given q(z) (Gaussian chain), q(z) given q(x) (HMM forward-backward), the
    objective, then the M-step of the groups in ``learn`` (subset of :data:`EM_GROUPS`); its Q_k and R
    come from :func:`residual_covariances` (float32-stable on near-noiseless data).

    Args:
        p: parameter dict (module comment). gamma: (B, T, K) initial q(z) marginals.
        y, mask: (B, T, N). time_mask: (B, T). inputs: (B, T, U) (U may be 0).
    Returns:
        (params, objective trace (num_iters,), :class:`EMTrialPosterior` under the final params).
        objective[i] = ELBO(q_i, theta_i) + log p(theta_i), non-decreasing in i.
        ``tied_dynamics_cov`` (static): the M-step fits one Q shared by all regimes.
        With ``return_checks`` (static) a fourth element ``{"e_step": (num_iters + 1,) bool,
        "m_step": (num_iters,) bool}``: whether each E-step (objective, q) and each M-step (every
        parameter) gave finite values, so a caller can name the first stage that did not.
    """
    e_step = jax.vmap(_e_step_trial, in_axes=(None, 0, 0, 0, 0, 0))

    def body(carry, _):
        p, gamma = carry
        elbo, stats, q = e_step(p, gamma, y, mask, time_mask, inputs)
        objective = real_trial_sum(elbo, time_mask) + em_log_prior(p, prior, diagonal_emission, tied_dynamics_cov)
        p_new = em_m_step(p, sum_trials(stats, time_mask), prior, learn, diagonal_emission, tied_dynamics_cov)
        p_new = residual_covariances(p_new, q, q.state_probs, y, mask, time_mask, inputs, prior, learn, diagonal_emission,
                                     tied_dynamics_cov)
        return (p_new, q.state_probs), (objective, all_finite((objective, q)), all_finite(p_new))

    (p_final, gamma), (trace, e_ok, m_ok) = lax.scan(body, (p, gamma), None, length=num_iters)
    elbo, _, q = e_step(p_final, gamma, y, mask, time_mask, inputs)
    final = real_trial_sum(elbo, time_mask) + em_log_prior(p_final, prior, diagonal_emission, tied_dynamics_cov)
    out = (p_final, jnp.concatenate([trace, final[None]]), q)
    if return_checks:
        out = out + ({"e_step": jnp.concatenate([e_ok, all_finite((final, q))[None]]), "m_step": m_ok},)
    return out


def all_finite(tree) -> Array:
    """() bool: every floating leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
