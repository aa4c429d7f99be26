"""The rSLDS fast path: Laplace-type variational EM (pure JAX, one compiled loop).

Variational family q(z) q(x): q(z) a (time-varying) HMM posterior, q(x) = N(mu, J^-1) a Gaussian chain
with block-tridiagonal precision J. The tracked objective is the ELBO

    L = E_q[log p(y, x, z | theta)] + H[q(z)] + H[q(x)] + log p(theta)

with two documented approximations that make every update a coordinate ascent step:

* the recurrent transition term E_q(x)[log p(z_t | z_{t-1}, x_{t-1})] is evaluated at the mean mu
  (first order; this is where the "Laplace" Newton search comes in);
* Bernoulli emissions enter through the Jaakkola–Jordan bound
  log sigmoid(s) >= log sigmoid(xi) + (s - xi)/2 - lambda(xi)(s^2 - xi^2),  lambda = tanh(xi/2)/(4 xi),
  which is quadratic in x (variational parameters xi per step and neuron, updated in closed form).

One iteration (all of them increase L, so the trace is non-decreasing):

1. x-step. The Gaussian part of log p (initial state, q(z)-averaged dynamics, Gaussian emissions or the
   Jaakkola–Jordan quadratic) is a block-tridiagonal quadratic -x'Jx/2 + h'x; the transition term adds
   a concave, non-quadratic f(mu). mu <- argmax -mu'J mu/2 + h'mu + f(mu) by damped Newton steps whose
   Hessian J - blockdiag(d^2 f) is block-tridiagonal (solved in O(T D^3)), with a line search; the
   covariance maximising L is exactly J^-1 (the transition term does not involve it).
2. z-step. q(z) = HMM posterior with log-likelihoods E_q(x) log N(x_t; A_k x_{t-1} + b_k, Q_k) and
   transition matrices softmax(logits(mu_{t-1})) (forward–backward, :func:`ppl_switch.ops.hmm.hmm_smoother`).
3. xi-step (Bernoulli): xi^2 = E_q[eta^2].
4. M-step: initial state, dynamics, Gaussian emissions in closed form (the SLDS's conjugate M-step,
   :func:`ppl_switch.ops.switching.em_m_step`); Bernoulli readout in closed form under the bound; the
   transition parameters by damped Newton on sum_t E_q(z)[log softmax] + log prior (concave).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from ppl_switch.models.rslds_transitions import TransitionPrior  # re-exported: the model's transition prior type
from ppl_switch.models.rslds_transitions import path_transition_logits, path_transition_matrices, transition_logits
from ppl_switch.ops import switching as sw
from ppl_switch.ops.hmm import hmm_smoother
from ppl_switch.ops.switching import chain_solve  # re-exported: the Newton step's solver
from ppl_switch.ops.switching import residual_covariances  # re-exported: the stable Q_k / R update

#: candidate step sizes of every damped Newton step (0 keeps the current point: never a decrease)
_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.0)


def transition_log_prior(tp, prior: TransitionPrior):
    """log p(transition params) up to a constant (normal; half-normal for kappa >= 0)."""
    lp = 0.0
    for name, value in tp.items():
        z = (value - prior.loc[name]) / prior.scale[name]
        lp = lp - 0.5 * jnp.sum(z**2)
    return lp


# --------------------------------------------------------------------------------------------------
# Block-tridiagonal helpers


def chain_matvec(J_diag, J_lower, x):
    """J x for the symmetric block-tridiagonal J (J_lower row t is J_{t+1,t}). x (T, D)."""
    out = jnp.einsum("tij,tj->ti", J_diag, x)
    out = out.at[1:].add(jnp.einsum("tij,tj->ti", J_lower, x[:-1]))
    out = out.at[:-1].add(jnp.einsum("tji,tj->ti", J_lower, x[1:]))
    return out


# --------------------------------------------------------------------------------------------------
# Per-trial pieces


def _jj_lambda(xi):
    xi = jnp.where(jnp.abs(xi) < 1e-6, 1e-6, xi)
    return jnp.tanh(0.5 * xi) / (4.0 * xi)


def transition_term(kind, tp, mu, pairwise, time_mask, inputs):
    """sum_t E_q(z)[log p(z_{t+1} | z_t, mu_t)] for one trial (mu (T, D), pairwise (T-1, K, K))."""
    logp = jax.nn.log_softmax(path_transition_logits(kind, tp, mu, inputs), -1)
    return jnp.sum(pairwise * logp * time_mask[1:, None, None])


def _step_transition_term(kind, tp, x_t, pair_t, w_t, u_next):
    """One step's transition term as a function of x_t (D,)."""
    logp = jax.nn.log_softmax(transition_logits(kind, tp, x_t, u_next), -1)
    return w_t * jnp.sum(pair_t * logp)


def gaussian_potentials(p, gamma, y, mask, time_mask, inputs, emission, jj_xi):
    """(J_diag, J_lower, h) of the quadratic part of the objective in x, and the SwitchingParams."""
    sp = sw.switching_params(p, inputs)
    gmask = mask if emission == "gaussian" else jnp.zeros_like(mask)
    J_diag, J_lower, h = sw.smf_x_potentials(sp, gamma, y, gmask, time_mask)
    if emission == "bernoulli":
        C, d = p["emission_matrix"], p["emission_bias"]
        m = mask.astype(y.dtype)
        lam = _jj_lambda(jj_xi) * m  # (T, N)
        J_diag = J_diag + 2.0 * jnp.einsum("tn,ni,nj->tij", lam, C, C)
        h = h + jnp.einsum("tn,ni->ti", (y - 0.5) * m - 2.0 * lam * d, C)
    return sp, J_diag, J_lower, h


def x_step(kind, tp, J_diag, J_lower, h, mu, pairwise, time_mask, inputs, num_newton: int):
    """Damped Newton on phi(mu) = -mu'J mu/2 + h'mu + f(mu); returns the new mu (T, D)."""
    u = None if inputs.shape[-1] == 0 else inputs[1:]
    w = time_mask[1:].astype(mu.dtype)

    def f_local(x_t, pair_t, w_t, u_t):
        return _step_transition_term(kind, tp, x_t, pair_t, w_t, u_t)

    grad_hess = jax.vmap(
        lambda x_t, pair_t, w_t, u_t: (jax.grad(f_local)(x_t, pair_t, w_t, u_t), jax.hessian(f_local)(x_t, pair_t, w_t, u_t)),
        in_axes=(0, 0, 0, None if u is None else 0),
    )

    def phi(x):
        return -0.5 * jnp.sum(x * chain_matvec(J_diag, J_lower, x)) + jnp.sum(h * x) + transition_term(kind, tp, x, pairwise, time_mask, inputs)

    def newton(x, _):
        g_f, H_f = grad_hess(x[:-1], pairwise, w, u)
        grad = h - chain_matvec(J_diag, J_lower, x) + jnp.concatenate([g_f, jnp.zeros_like(x[:1])])
        Jn = J_diag - jnp.concatenate([H_f, jnp.zeros_like(J_diag[:1])])
        delta = chain_solve(Jn, J_lower, grad)
        steps = jnp.asarray(_STEP_SIZES, x.dtype)
        values = jax.vmap(lambda a: phi(x + a * delta))(steps)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        best = jnp.argmax(values)
        return x + steps[best] * delta, None

    mu, _ = lax.scan(newton, mu, None, length=num_newton)
    return mu


def e_step_trial(kind, emission, num_newton, p, tp, gamma, pairwise, mu, jj_xi, y, mask, time_mask, inputs):
    """x-step then z-step for one trial. Returns (objective part, q pieces)."""
    sp, J_diag, J_lower, h = gaussian_potentials(p, gamma, y, mask, time_mask, inputs, emission, jj_xi)
    mu = x_step(kind, tp, J_diag, J_lower, h, mu, pairwise, time_mask, inputs, num_newton)
    post = sw.gaussian_chain_posterior(J_diag, J_lower, h)._replace(means=mu)
    ell = sw.smf_transition_log_likelihoods(sp, post, time_mask)
    P_t = path_transition_matrices(kind, tp, mu, inputs if inputs.shape[-1] else None)
    hmm = hmm_smoother(p["initial_probs"], P_t, ell, time_mask)
    gmask = mask if emission == "gaussian" else jnp.zeros_like(mask)
    elbo = hmm.log_normalizer + sw.smf_expected_x_terms(sp, post, y, gmask, time_mask)
    if emission == "bernoulli":
        elbo = elbo + jj_bound(p, post, y, mask, jj_xi)
    return elbo, post, hmm, (J_diag, J_lower, h)


def _eta_moments(p, post):
    C, d = p["emission_matrix"], p["emission_bias"]
    mean = post.means @ C.T + d  # (T, N)
    var = jnp.einsum("ni,tij,nj->tn", C, post.covs, C)
    return mean, mean**2 + var


def jj_bound(p, post, y, mask, jj_xi):
    """E_q(x) of the Jaakkola–Jordan lower bound on sum log Bernoulli(y | sigmoid(eta)), observed entries."""
    mean, second = _eta_moments(p, post)
    lam = _jj_lambda(jj_xi)
    b = jax.nn.log_sigmoid(jj_xi) + 0.5 * ((2.0 * y - 1.0) * mean - jj_xi) - lam * (second - jj_xi**2)
    return jnp.sum(jnp.where(mask, b, 0.0))


def jj_update(p, post):
    """xi = sqrt(E[eta^2]) (the bound is tight there)."""
    return jnp.sqrt(_eta_moments(p, post)[1])


# --------------------------------------------------------------------------------------------------
# M-step pieces


def bernoulli_emission_m_step(p, posts, jj_xi, y, mask, learn, emission_prior_scales):
    """Closed-form readout under the bound: per neuron w = [c, d] = (2 sum lam E[g g'] + P0)^-1 sum (y - 1/2) E[g]."""
    C = p["emission_matrix"]
    D = C.shape[1]
    mu, S = posts.means, posts.covs  # (B, T, D), (B, T, D, D)
    ones = jnp.ones(mu.shape[:-1] + (1,), mu.dtype)
    g = jnp.concatenate([mu, ones], -1)
    Egg = g[..., :, None] * g[..., None, :]
    Egg = Egg.at[..., :D, :D].add(S)
    m = mask.astype(mu.dtype)
    lam = _jj_lambda(jj_xi) * m
    A = 2.0 * jnp.einsum("btn,btij->nij", lam, Egg)
    v = jnp.einsum("btn,bti->ni", (y - 0.5) * m, g)
    c_scale, d_scale = emission_prior_scales
    prior_prec = jnp.diag(jnp.concatenate([jnp.full((D,), 1.0 / c_scale**2), jnp.array([1.0 / d_scale**2])]).astype(mu.dtype))
    p = dict(p)
    if "emission_matrix" in learn:
        w = jnp.linalg.solve(A + prior_prec, v[..., None])[..., 0]
        p["emission_matrix"], p["emission_bias"] = w[:, :D], w[:, D]
    elif "emission_bias" in learn:
        num = v[:, D] - jnp.einsum("nd,nd->n", C, A[:, D, :D])
        p["emission_bias"] = num / (A[:, D, D] + prior_prec[D, D])
    return p


def bernoulli_emission_log_prior(p, emission_prior_scales, learn_matrix: bool):
    c_scale, d_scale = emission_prior_scales
    lp = -0.5 * jnp.sum(p["emission_bias"] ** 2) / d_scale**2
    if learn_matrix:
        lp = lp - 0.5 * jnp.sum(p["emission_matrix"] ** 2) / c_scale**2
    return lp


def transition_m_step(kind, tp, prior: TransitionPrior, mus, pairwise, time_mask, inputs, num_newton: int):
    """Damped Newton ascent of sum_trials transition_term + log prior (concave; kappa kept >= 0)."""
    flat0, unravel = ravel_pytree(tp)
    use_u = inputs.shape[-1] > 0

    def objective(flat):
        t = unravel(flat)
        terms = jax.vmap(lambda m, pw, tm, u: transition_term(kind, t, m, pw, tm, u if use_u else None))(mus, pairwise, time_mask, inputs)
        return jnp.sum(terms) + transition_log_prior(t, prior)

    def project(flat):
        if kind != "sticky":
            return flat
        t = unravel(flat)
        t = dict(t, transition_stickiness=jnp.maximum(t["transition_stickiness"], 0.0))
        return ravel_pytree(t)[0]

    def newton(flat, _):
        g = jax.grad(objective)(flat)
        H = jax.hessian(objective)(flat)
        delta = -jnp.linalg.solve(H - 1e-8 * jnp.eye(H.shape[0], dtype=H.dtype), g)
        steps = jnp.asarray(_STEP_SIZES, flat.dtype)
        cands = jax.vmap(lambda a: project(flat + a * delta))(steps)
        values = jax.vmap(objective)(cands)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        return cands[jnp.argmax(values)], None

    flat, _ = lax.scan(newton, flat0, None, length=num_newton)
    return unravel(flat)


# --------------------------------------------------------------------------------------------------
# The loop


class LaplaceEMState(NamedTuple):
    """Everything the loop carries. Leading axis B (trials) on the per-trial arrays."""

    params: dict  # SLDS-form EM dict (ops.switching), emission_cov a dummy for Bernoulli
    transitions: dict  # transition sites
    state_probs: jax.Array  # (B, T, K)
    pairwise: jax.Array  # (B, T-1, K, K)
    means: jax.Array  # (B, T, D)
    jj_xi: jax.Array  # (B, T, N)


class LaplaceEMPosterior(NamedTuple):
    """q after the final E-step; information form kept for sampling q(x)."""

    state_probs: jax.Array  # (B, T, K)
    pairwise: jax.Array  # (B, T-1, K, K)
    means: jax.Array  # (B, T, D)
    covs: jax.Array  # (B, T, D, D)
    J_diag: jax.Array
    J_lower: jax.Array
    h: jax.Array


def laplace_em(state: LaplaceEMState, y, mask, time_mask, inputs, em_prior: sw.EMPrior, transition_prior: TransitionPrior,
               emission_prior_scales, *, kind: str, emission: str, learn: frozenset, num_iters: int, num_newton: int,
               diagonal: bool, tied: bool, final_e_step: bool = True):
    """Run ``num_iters`` iterations (jit-able; keyword arguments static).

    Returns (final state, objective trace (num_iters + 1,), :class:`LaplaceEMPosterior`); trace[i] is the
    objective after the E-step of iteration i (non-decreasing), the last entry after the final E-step.
    With ``final_e_step=False`` the final E-step is skipped: (state, trace (num_iters,), None).
    """
    smf_learn = frozenset(learn & {"initial", "dynamics"} | (learn & {"emission_matrix", "emission_bias", "emission_cov"} if emission == "gaussian" else frozenset()))

    def e_step(s: LaplaceEMState):
        run = jax.vmap(lambda g, pw, mu, xi, yb, mb, tb, ub: e_step_trial(kind, emission, num_newton, s.params, s.transitions, g, pw, mu, xi, yb, mb, tb, ub))
        return run(s.state_probs, s.pairwise, s.means, s.jj_xi, y, mask, time_mask, inputs)

    def objective(s, elbo):
        value = sw.real_trial_sum(elbo, time_mask) + sw.em_log_prior(s.params, em_prior, diagonal, tied) + transition_log_prior(s.transitions, transition_prior)
        if emission == "bernoulli":
            value = value + bernoulli_emission_log_prior(s.params, emission_prior_scales, "emission_matrix" in learn)
        return value

    def body(s: LaplaceEMState, _):
        elbo, post, hmm, _ = e_step(s)
        value = objective(s, elbo)
        jj = jax.vmap(jj_update, in_axes=(None, 0))(s.params, post) if emission == "bernoulli" else s.jj_xi
        counts = jax.vmap(sw.pair_counts)(hmm.pairwise_probs, time_mask)  # the transition M-step needs pairwise per t
        stats = jax.vmap(sw.sufficient_stats)(post, hmm.smoothed_probs, counts, y, mask, time_mask, inputs)
        p = sw.em_m_step(s.params, sw.sum_trials(stats, time_mask), em_prior, smf_learn, diagonal, tied)
        p = residual_covariances(p, post, hmm.smoothed_probs, y, mask, time_mask, inputs, em_prior, smf_learn, diagonal, tied)
        if emission == "bernoulli" and learn & {"emission_matrix", "emission_bias"}:
            p = bernoulli_emission_m_step(p, post, jj, y, mask, learn, emission_prior_scales)
        tp = s.transitions
        if "transitions" in learn:
            tp = transition_m_step(kind, tp, transition_prior, post.means, hmm.pairwise_probs, time_mask, inputs, num_newton)
        new = LaplaceEMState(p, tp, hmm.smoothed_probs, hmm.pairwise_probs, post.means, jj)
        return new, value

    state, trace = lax.scan(body, state, None, length=num_iters)
    if not final_e_step:
        return state, trace, None
    elbo, post, hmm, (J_diag, J_lower, h) = e_step(state)
    final = objective(state, elbo)
    state = state._replace(state_probs=hmm.smoothed_probs, pairwise=hmm.pairwise_probs, means=post.means)
    q = LaplaceEMPosterior(hmm.smoothed_probs, hmm.pairwise_probs, post.means, post.covs, J_diag, J_lower, h)
    return state, jnp.concatenate([trace, final[None]]), q


__all__ = [
    "TransitionPrior",
    "transition_log_prior",
    "chain_matvec",
    "chain_solve",
    "transition_term",
    "x_step",
    "e_step_trial",
    "transition_m_step",
    "residual_covariances",
    "bernoulli_emission_m_step",
    "LaplaceEMState",
    "LaplaceEMPosterior",
    "laplace_em",
]
