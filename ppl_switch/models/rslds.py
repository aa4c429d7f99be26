"""Recurrent switching linear dynamical system (rSLDS; Linderman et al. 2017): where the continuous state
is decides which regime comes next.

Generative program (trial n, step t = 1..T, K regimes, latent dim D, obs dim N, input dim U). Everything
but the transitions and the Bernoulli emission is the SLDS of :mod:`ppl_switch.models.slds` (same sites
and priors). :meth:`RSLDS.program` samples pi0, then the SLDS's other priors
(:meth:`~ppl_switch.models.slds.SLDS.sample_dynamics_and_emission_params`), then these, then the path and y::

    W                  ~ N(0, 5^2)                                       transition_weights         (K, D)
    r                  ~ N(0, 5^2)                                       transition_bias            (K,)
    R                  ~ N(stickiness * I, 2^2)      "recurrent"         transition_state_logits    (K, K)
    kappa              ~ HalfNormal(stickiness)      "sticky"            transition_stickiness      ()
    V                  ~ N(0, 1)                     U > 0               transition_input_weights   (K, U)

    z_1 ~ Cat(pi0),  z_t | z_{t-1} = i, x_{t-1} ~ Cat(softmax_j(logits_ij)),
        "recurrent":      logits_ij = R_ij + W_j . x_{t-1} + r_j + V_j . u_t
        "recurrent_only": logits_ij =        W_j . x_{t-1} + r_j + V_j . u_t
        "sticky":         logits_ij = kappa [i = j] + W_j . x_{t-1} + r_j + V_j . u_t
    x_t | x_{t-1}, z_t = k ~ N(A_k x_{t-1} + b_k + B_k u_t, Q_k)
    y_t | x_t ~ N(C x_t + d, R) | Poisson(bin_size * link(C x_t + d)) | Bernoulli(sigmoid(C x_t + d))

As in the SLDS the path ``x`` is one block site whose density p(x | theta) sums the regimes out exactly
with the HMM forward algorithm -- here with time-varying transition matrices computed from x
(:func:`ppl_switch.ops.hmm.hmm_log_normalizer_from_logits`), so NUTS and SVI see a continuous model.

Inference paths: NUTS (short series); SVI with the SLDS's structured guide (:class:`~ppl_switch.guides.path_guide.SLDSGuide`: mean-field
parameters, Gauss–Markov chain over x, z exact given x); the fast path
:func:`~ppl_switch.infer.rslds_em.rslds_em` (``fit_em``), Laplace-type variational EM
(:mod:`ppl_switch.infer.rslds_laplace_em`) started from the SLDS's PCA / AR(1) start and several regime
segmentations (k-means on local dynamics, one random), best of N (non-finite starts are dropped with a
warning, FitError if all fail). This module holds what that EM reads from the model: the transition
prior (:meth:`RSLDS.transition_prior`), :meth:`RSLDS.em_prior`, the parameter conversions and the
start helpers :func:`gaussian_view` and :func:`bernoulli_bias`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import SequenceData, as_sequence_data
from ppl_switch.distributions.switching_chain import SwitchingLinearChain
from ppl_switch.models._common import check_nonneg_float
from ppl_switch.models.rslds_transitions import (
    TRANSITION_KINDS,
    TransitionPrior,
    path_transition_logits,
    path_transition_matrices,
    transition_logits,
    transition_site_names,
)
from ppl_switch.models.slds import SLDS
from ppl_switch.ops import switching as sw
from ppl_switch.ops.hmm import hmm_log_normalizer_from_logits, hmm_sample, hmm_smoother, hmm_viterbi

TRANSITION_WEIGHT_PRIOR_SCALE = 5.0
TRANSITION_BIAS_PRIOR_SCALE = 5.0
TRANSITION_STATE_PRIOR_SCALE = 2.0
TRANSITION_INPUT_PRIOR_SCALE = 1.0
EMISSION_MATRIX_PRIOR_SCALE = 1.0  # as in the SLDS program
EMISSION_BIAS_PRIOR_SCALE = 5.0


# --------------------------------------------------------------------------------------------------
# The continuous path with the regimes summed out, recurrent transitions


class RecurrentSwitchingChain(SwitchingLinearChain):
    """p(x_{1:T}) of an rSLDS path with z summed out (forward algorithm, transitions depend on x).

    Batch shape (trials,), event shape (T, D). Arguments as :class:`SwitchingLinearChain` without the
    transition matrix, plus ``kind`` (a transition form), ``transitions`` (dict of transition sites) and
    ``inputs`` (B, T, U) or None.
    """

    def __init__(self, kind, transitions, inputs, initial_probs, initial_mean, initial_scale_tril, dynamics_matrices,
                 dynamics_scale_trils, dynamics_biases, time_mask, *, validate_args=None):
        self.kind = kind
        self.transitions = transitions
        self.inputs = inputs
        K = jnp.shape(initial_probs)[-1]
        uniform = jnp.full((K, K), 1.0 / K, jnp.result_type(initial_probs, float))
        super().__init__(initial_probs, uniform, initial_mean, initial_scale_tril, dynamics_matrices, dynamics_scale_trils,
                         dynamics_biases, time_mask, validate_args=validate_args)

    def _inputs(self, b):
        return None if self.inputs is None else self.inputs[b]

    def transition_logits(self, x):
        """(B, T-1, K, K) logits of z_t -> z_{t+1} along each trial's path."""
        if self.inputs is None:
            return jax.vmap(lambda x_b: path_transition_logits(self.kind, self.transitions, x_b))(x)
        return jax.vmap(lambda x_b, u_b: path_transition_logits(self.kind, self.transitions, x_b, u_b))(x, self.inputs)

    def chain_log_normalizers(self, x, regime_log_likelihoods):
        """As :meth:`SwitchingLinearChain.chain_log_normalizers`, with the transitions of each step along x."""
        log_pi0 = jnp.log(self.initial_probs)
        return jax.vmap(lambda lg, l, m: hmm_log_normalizer_from_logits(log_pi0, lg, l, m))(
            self.transition_logits(x), regime_log_likelihoods, self.time_mask)

    def ancestral_step_inputs(self, z_keys, eps):
        """The base chain's step inputs plus the input u at each destination step (T-1, B, U)."""
        B, T = self.batch_shape[0], self.event_shape[0]
        u_all = jnp.zeros((B, T, 0), eps.dtype) if self.inputs is None else jnp.asarray(self.inputs, eps.dtype)
        return super().ancestral_step_inputs(z_keys, eps) + (jnp.swapaxes(u_all[:, 1:], 0, 1),)

    def ancestral_step(self, carry, inp):
        """The base chain's step with the transition row of the current regime at the current x (and u)."""
        z, x = carry
        key_t, e, b_t, u_t = inp  # b_t (B, K, D), u_t (B, U) input at the destination step
        logits = transition_logits(self.kind, self.transitions, x, u_t if u_t.shape[-1] else None)  # (B, K, K)
        z_next = jax.random.categorical(key_t, jnp.take_along_axis(logits, z[:, None, None], 1)[:, 0])
        return z_next, self.regime_move(z_next, x, b_t, e)


# --------------------------------------------------------------------------------------------------
# Collapsed Gaussian-sum filter with recurrent transitions


def recurrent_gaussian_sum_filter(kind, transitions, params: sw.SwitchingParams, y, mask, inputs=None):
    """Collapsed Gaussian-sum filter (one Gaussian per regime) of one trial with x-dependent transitions.

    As :func:`ppl_switch.ops.switching.gaussian_sum_filter`, except that the move out of regime k uses
    the transition row softmax(logits_k(m_k)) evaluated at that regime's filtered mean m_k (the usual
    plug-in of the mean for the recurrent term). Returns (T,) approximate log p(y_t | y_{1:t-1}), 0 where
    nothing is observed.
    """
    T, N = y.shape
    K = params.initial_probs.shape[0]
    C, d, R = params.emission_matrix, params.emission_bias, params.emission_cov
    em = jax.vmap(sw.masked_emission, in_axes=(None, None, None, 0, 0))(C, d, R, jnp.where(mask, y, 0.0), mask)
    m0, S0, ll0 = sw.kalman_update(params.initial_mean, params.initial_cov, *jax.tree.map(lambda a: a[0], em))
    if T == 1:
        return jnp.where(jnp.any(mask, -1), ll0[None], 0.0)
    A, Q = params.dynamics_matrices, params.dynamics_covs
    b_steps = sw.biases_per_step(params.dynamics_biases, T)
    u_next = jnp.zeros((T - 1, 0), y.dtype) if inputs is None else inputs[1:]

    def pair_update(mean, cov, A_k, b_k, Q_k, emission):
        return sw.kalman_update(A_k @ mean + b_k, sw.symmetrize(A_k @ cov @ A_k.T) + Q_k, *emission)

    def step(carry, inp):
        log_q, means, covs = carry
        b_t, u_t, emission = inp
        logits = transition_logits(kind, transitions, means, u_t if u_t.shape[-1] else None)  # (K comp, K, K)
        log_P = jax.nn.log_softmax(logits[jnp.arange(K), jnp.arange(K)], -1)  # row k of component k
        upd = jax.vmap(jax.vmap(pair_update, (None, None, 0, 0, 0, None)), (0, 0, None, None, None, None))
        new_means, new_covs, ll = upd(means, covs, A, b_t, Q, emission)
        log_w = log_q[:, None] + log_P + ll
        step_ll = jax.nn.logsumexp(log_w)
        log_q_new = jax.nn.logsumexp(log_w, axis=0) - step_ll
        merged = jax.vmap(sw.moment_match, in_axes=(1, 1, 1))(log_w, new_means, new_covs)
        return (log_q_new, *merged), step_ll

    init = (jnp.log(params.initial_probs), jnp.broadcast_to(m0, (K,) + m0.shape), jnp.broadcast_to(S0, (K,) + S0.shape))
    _, lls = jax.lax.scan(step, init, (b_steps, u_next, jax.tree.map(lambda a: a[1:], em)))
    return jnp.where(jnp.any(mask, -1), jnp.concatenate([ll0[None], lls]), 0.0)


# --------------------------------------------------------------------------------------------------
# The model


class RSLDS(SLDS):
    """Recurrent SLDS: the SLDS with transitions that depend on the previous continuous state.

    Args:
        num_states, latent_dim, obs_dim, input_dim, emission_cov, link, bin_size, emission_matrix: as
            :class:`~ppl_switch.models.slds.SLDS`.
        emission: "gaussian", "poisson" or "bernoulli" (logistic link).
        transitions: "recurrent" (R[z_{t-1}] + W x_{t-1} + r), "recurrent_only" (W x_{t-1} + r) or
            "sticky" (kappa on the diagonal + W x_{t-1} + r).
        stickiness: prior location of the self-transition boost: mean of diag(R) ("recurrent"), scale of
            the half-normal prior on kappa ("sticky", must then be > 0); unused by "recurrent_only".
    """

    name = "rslds"
    example_config = dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1)
    recommended_runner = ("em", {"num_restarts": 3, "num_iters": 100, "requires": {"emission": ("gaussian", "bernoulli")}, "otherwise": ("svi", {})})  # Laplace EM, best of 3 (model card)
    # no transition_concentration (no Dirichlet on P) and no path_parameterisation: the rSLDS path is
    # always centred (its Laplace EM works on x)
    _config_keys = (
        "num_states", "latent_dim", "obs_dim", "input_dim", "emission", "emission_cov", "link", "bin_size", "stickiness",
        "emission_matrix", "transitions",
    )

    def __init__(
        self,
        num_states: int,
        latent_dim: int,
        obs_dim: Optional[int] = None,
        input_dim: int = 0,
        emission: str = "gaussian",
        emission_cov: str = "diagonal",
        link: str = "exp",
        bin_size: float = 1.0,
        transitions: str = "recurrent",
        stickiness: float = 2.0,
        emission_matrix=None,
    ):
        if emission not in ("gaussian", "poisson", "bernoulli"):
            raise ValueError(f"emission: expected 'gaussian', 'poisson' or 'bernoulli', got {emission!r}")
        if transitions not in TRANSITION_KINDS:
            raise ValueError(f"transitions: expected one of {list(TRANSITION_KINDS)}, got {transitions!r}")
        super().__init__(num_states, latent_dim, obs_dim, input_dim, "gaussian" if emission == "bernoulli" else emission,
                         emission_cov, link, bin_size, check_nonneg_float(stickiness, "stickiness"), 1.0, emission_matrix)
        if transitions == "sticky" and self.stickiness <= 0:
            raise ValueError(f"stickiness: 'sticky' transitions need a positive prior scale, got {stickiness!r}")
        self.emission = emission
        self.transitions = transitions

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = super().site_dims()
        dims.pop("transition_matrix")
        dims.update({"transition_weights": ("state", "latent"), "transition_bias": ("state",)})
        if self.transitions == "recurrent":
            dims["transition_state_logits"] = ("state", "state_to")
        elif self.transitions == "sticky":
            dims["transition_stickiness"] = ()
        if self.input_dim:
            dims["transition_input_weights"] = ("state", "input")
        return dims

    # ----- priors of the transition sites (shared by the program and the fast path's M-step) -----
    def transition_prior(self, dtype=jnp.float64) -> TransitionPrior:
        K, D, U = self.num_states, self.latent_dim, self.input_dim
        loc = {"transition_weights": np.zeros((K, D)), "transition_bias": np.zeros(K)}
        scale = {"transition_weights": np.full((K, D), TRANSITION_WEIGHT_PRIOR_SCALE), "transition_bias": np.full(K, TRANSITION_BIAS_PRIOR_SCALE)}
        if self.transitions == "recurrent":
            loc["transition_state_logits"] = self.stickiness * np.eye(K)
            scale["transition_state_logits"] = np.full((K, K), TRANSITION_STATE_PRIOR_SCALE)
        elif self.transitions == "sticky":
            loc["transition_stickiness"] = np.zeros(())
            scale["transition_stickiness"] = np.full((), self.stickiness)
        if U:
            loc["transition_input_weights"] = np.zeros((K, U))
            scale["transition_input_weights"] = np.full((K, U), TRANSITION_INPUT_PRIOR_SCALE)
        cast = lambda d: {k: jnp.asarray(v, dtype) for k, v in d.items()}  # noqa: E731
        return TransitionPrior(cast(loc), cast(scale))

    def transition_params(self, params) -> dict:
        """The draw's transition sites (:func:`~ppl_switch.models.rslds_transitions.transition_site_names`) as JAX arrays."""
        return {k: jnp.asarray(params[k]) for k in transition_site_names(self.transitions, self.input_dim)}

    def path_distribution(self, params, data: SequenceData) -> RecurrentSwitchingChain:
        """p(x | theta) with the regimes summed out, for every trial."""
        return RecurrentSwitchingChain(
            self.transitions,
            self.transition_params(params),
            jnp.asarray(data.inputs) if self.input_dim else None,
            jnp.asarray(params["initial_probs"]),
            jnp.asarray(params["initial_mean"]),
            jnp.diag(jnp.asarray(params["initial_scales"])),
            jnp.asarray(params["dynamics_matrix"]),
            self.dynamics_scale_trils(params),
            self._dynamics_biases(params, data),
            jnp.asarray(data.time_mask),
        )

    # ----- program ------------------------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """The rSLDS; its sites in the order they are sampled (K regimes, trial n, step t)::

            pi0 ~ Dirichlet(1_K)                                     initial_probs
            A_k, s0, s_k, L_k, B_k, C, d, b_k, m0, r, L_R ~ the SLDS's priors   (sample_dynamics_and_emission_params)
            W ~ N(0, 5^2), r ~ N(0, 5^2)                             transition_weights, transition_bias
            R ~ N(stickiness I, 2^2) ("recurrent") or kappa ~ HalfNormal(stickiness) ("sticky")
            V ~ N(0, 1)  (U > 0)                                     transition_input_weights
            x_n ~ sum_z p(z | x, pi0, W, r, ...) p(x | z, theta)     x: one block site per trial, z summed out
                  z_t | z_{t-1} = i, x_{t-1} ~ Cat(softmax_j(R_ij + W_j . x_{t-1} + r_j + V_j . u_t))
                  x_t | x_{t-1}, z_t = k ~ N(A_k x_{t-1} + b_k + B_k u_t, Q_k)
            y_t ~ N(C x_t + d, R), Poisson(bin_size * link(C x_t + d)) or Bernoulli(sigmoid(C x_t + d))

        (R_ij is kappa [i = j] for "sticky" transitions and absent for "recurrent_only".) ``record_log_lik``
        adds the deterministic site ``log_lik``, (trials, T) log p(y_t | x_t).
        """
        # the regime chain's initial probabilities; its transitions depend on x (below)
        params = {"initial_probs": numpyro.sample("initial_probs", dist.Dirichlet(jnp.ones(self.num_states)))}
        # each regime's linear dynamics, the initial state and the readout: the SLDS's priors
        params.update(self.sample_dynamics_and_emission_params(data.obs_dim))
        # the weights of the transition logits (their locs and scales, transition_prior, are also the M-step's)
        loc, scale = self.transition_prior(jnp.result_type(float))

        def normal(name):
            return numpyro.sample(name, dist.Normal(loc[name], scale[name]).to_event(loc[name].ndim))

        params["transition_weights"] = normal("transition_weights")  # W (K, D)
        params["transition_bias"] = normal("transition_bias")  # r (K,)
        if self.transitions == "recurrent":
            params["transition_state_logits"] = normal("transition_state_logits")  # R (K, K)
        elif self.transitions == "sticky":
            params["transition_stickiness"] = numpyro.sample(
                "transition_stickiness", dist.HalfNormal(scale["transition_stickiness"]))  # kappa ()
        if self.input_dim:
            params["transition_input_weights"] = normal("transition_input_weights")  # V (K, U)
        # the continuous path x, its density p(x | theta) summing the regimes out (forward algorithm)
        with numpyro.plate("trial", data.num_trials):
            x = numpyro.sample("x", self.path_distribution(params, data))  # RecurrentSwitchingChain
        # the emission, over the observed entries of y
        self.observe(params, x, data, record_log_lik=record_log_lik)

    def observe(self, params, x, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """The emission site ``y`` given the path x: Bernoulli(sigmoid(C x_t + d)) over the observed entries,
        or the SLDS's Gaussian / Poisson emission (:meth:`SLDS.observe <ppl_switch.models.slds.SLDS.observe>`)."""
        if self.emission != "bernoulli":
            return super().observe(params, x, data, record_log_lik=record_log_lik)
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)
        C = self._emission_matrix(params)  # the fixed C where one is given
        numpyro.sample("y", dist.Bernoulli(logits=x @ C.T + params["emission_bias"]).mask(mask).to_event(3), obs=y)
        if record_log_lik:
            numpyro.deterministic("log_lik", self.emission_log_prob(params, x, data))

    def emission_log_prob(self, params, x, data: SequenceData):
        """(B, T) log p(y_t | x_t) over the observed entries."""
        if self.emission != "bernoulli":
            return super().emission_log_prob(params, x, data)
        eta = x @ self._emission_matrix(params).T + jnp.asarray(params["emission_bias"])
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)
        lp = y * jax.nn.log_sigmoid(eta) + (1.0 - y) * jax.nn.log_sigmoid(-eta)
        return jnp.sum(jnp.where(mask, lp, 0.0), -1)

    def _emit(self, key, params, x):
        if self.emission != "bernoulli":
            return super()._emit(key, params, x)
        eta = x @ self._emission_matrix(params).T + jnp.asarray(params["emission_bias"])
        return jax.random.bernoulli(key, jax.nn.sigmoid(eta)).astype(eta.dtype)

    def firing_probabilities(self, params, x=None):
        """Bernoulli emissions: sigmoid(C x + d), shaped like y, for ``x`` (default the draw's path)."""
        x = jnp.asarray(params["x"] if x is None else x)
        return jax.nn.sigmoid(x @ self._emission_matrix(params).T + jnp.asarray(params["emission_bias"]))

    # ----- quantities from one draw -------------------------------------------------------------
    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, T) pointwise log-likelihood of a draw.

        Gaussian emissions: the recurrent collapsed Gaussian-sum filter's approximate
        log p(y_t | y_{<t}, theta), x and z integrated out (independent of the sampled path). Poisson and
        Bernoulli emissions: log p(y_t | x_t) given the draw's path ``x``."""
        if self.emission != "gaussian":
            return self.emission_log_prob(params, jnp.asarray(params["x"]), data)
        sp = self.switching_params(params, data)
        tp = self.transition_params(params)
        u = jnp.asarray(data.inputs) if self.input_dim else None
        run = lambda s, y, m, u_b: recurrent_gaussian_sum_filter(self.transitions, tp, s, y, m, u_b)  # noqa: E731
        return jax.vmap(run, in_axes=(0, 0, 0, None if u is None else 0))(sp, jnp.asarray(data.y), jnp.asarray(data.mask), u)

    def switching_params(self, params, data: SequenceData) -> sw.SwitchingParams:
        """As the SLDS's, with a placeholder (uniform) transition matrix: the transitions come from x."""
        K = self.num_states
        return super().switching_params({**params, "transition_matrix": jnp.full((K, K), 1.0 / K)}, data)

    def transition_matrices(self, params, data: SequenceData, x=None) -> jax.Array:
        """(B, T-1, K, K) time-varying transition matrices along the draw's path (or ``x``)."""
        x = jnp.asarray(params["x"] if x is None else x)
        tp = self.transition_params(params)
        if self.input_dim:
            return jax.vmap(lambda x_b, u_b: path_transition_matrices(self.transitions, tp, x_b, u_b))(x, jnp.asarray(data.inputs))
        return jax.vmap(lambda x_b: path_transition_matrices(self.transitions, tp, x_b))(x)

    def state_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        """p(z | x, theta), exact given the draw's path (forward–backward with the x-dependent
        transitions): marginals (B, T, K) and the Viterbi path (B, T). For a fast-path point estimate
        (``q_state_probs`` present) the marginals are its q(z) and the path their argmax."""
        if "q_state_probs" in params:
            q = jnp.asarray(params["q_state_probs"])
            return {"state_probs": q, "viterbi": jnp.argmax(q, -1).astype(jnp.int32)}
        ll = self._regime_log_likelihoods(params, data)
        P = self.transition_matrices(params, data)
        P0 = jnp.asarray(params["initial_probs"])
        tm = jnp.asarray(data.time_mask)
        probs = jax.vmap(lambda l, Pt, m: hmm_smoother(P0, Pt, l, m).smoothed_probs)(ll, P, tm)
        path = jax.vmap(lambda l, Pt, m: hmm_viterbi(P0, Pt, l, m))(ll, P, tm)
        return {"state_probs": probs, "viterbi": jnp.asarray(path, jnp.int32)}

    def sample_states(self, key, params, data: SequenceData) -> jax.Array:
        """One path z ~ p(z | x, theta) per trial (FFBS given the draw's x), (B, T) int."""
        if "q_state_probs" in params:
            return jax.random.categorical(key, jnp.log(jnp.asarray(params["q_state_probs"]))).astype(jnp.int32)
        ll = self._regime_log_likelihoods(params, data)
        P = self.transition_matrices(params, data)
        P0 = jnp.asarray(params["initial_probs"])
        keys = jax.random.split(key, ll.shape[0])
        return jax.vmap(lambda k, l, Pt, m: hmm_sample(k, P0, Pt, l, m))(keys, ll, P, jnp.asarray(data.time_mask)).astype(jnp.int32)

    # ----- simulation ---------------------------------------------------------------------------
    def default_params(self, key) -> dict[str, Any]:
        """The SLDS's defaults (regimes rotating at distinct speeds) with a location-dependent switch:
        regime k is favoured in the direction 2 pi k / K of the first two latent coordinates
        (W_k = 2 (cos, sin)), a self-transition boost of 2 ("recurrent": R = 2 I, "sticky": kappa = 2)."""
        p = super().default_params(key)
        p.pop("transition_matrix")
        K, D = self.num_states, self.latent_dim
        angles = 2 * np.pi * np.arange(K) / K
        W = np.zeros((K, D))
        W[:, 0] = 2.0 * np.cos(angles)
        if D > 1:
            W[:, 1] = 2.0 * np.sin(angles)
        p["transition_weights"] = W
        p["transition_bias"] = np.zeros(K)
        if self.transitions == "recurrent":
            p["transition_state_logits"] = 2.0 * np.eye(K)
        elif self.transitions == "sticky":
            p["transition_stickiness"] = np.asarray(2.0)
        if self.input_dim:
            p["transition_input_weights"] = np.zeros((K, self.input_dim))
        if self.emission == "bernoulli":
            p.pop("emission_scales", None)
            p.pop("emission_corr_chol", None)
            p["emission_bias"] = np.zeros(len(p["emission_bias"]))
        return p

    # ----- label switching ----------------------------------------------------------------------
    def state_features(self, params) -> np.ndarray:
        A = np.asarray(params["dynamics_matrix"])
        b = np.asarray(params["dynamics_bias"])
        W = np.asarray(params["transition_weights"])
        return np.concatenate([A.reshape(A.shape[0], -1), b, W], -1)

    # ----- the fast path's conversions and priors (its EM: ppl_switch.infer.rslds_em) -------------
    def params_to_em(self, params, dtype=None) -> dict[str, jax.Array]:
        """Site-form params -> the EM's dict (SLDS part; transition sites are kept apart)."""
        K, N = self.num_states, len(np.asarray(params["emission_bias"]))
        extra = {"transition_matrix": jnp.full((K, K), 1.0 / K)}
        if self.emission == "bernoulli":
            extra["emission_scales"] = jnp.ones(N)
        return super().params_to_em({**params, **extra}, dtype)

    def params_from_em(self, em) -> dict[str, np.ndarray]:
        """The EM's dict (and transition sites, if present) -> site-form params (numpy)."""
        em = dict(em)
        K = np.shape(em["dynamics_matrices"])[0]
        em.setdefault("transition_matrix", np.full((K, K), 1.0 / K))
        p = super().params_from_em(em)
        p.pop("transition_matrix")
        if self.emission == "bernoulli":
            p.pop("emission_scales", None)
            p.pop("emission_corr_chol", None)
        for name in transition_site_names(self.transitions, self.input_dim):
            if name in em:
                p[name] = np.asarray(em[name])
        return p

    def init_values(self, data, seed: int = 0) -> dict[str, np.ndarray]:
        """SLDS-style start (PCA for C and x, one AR(1) fit, A_k made distinct) with transition sites at
        their prior location (W = 0: the regimes start location-independent)."""
        data = data if isinstance(data, SequenceData) else self.prepare(data)
        out = super().init_values(gaussian_view(self, data), seed)
        prior = self.transition_prior(jnp.result_type(float))  # float64 only where enabled: no dtype warning
        out.update({k: np.asarray(v) for k, v in prior.loc.items()})
        if self.transitions == "sticky":  # inside the half-normal's support
            out["transition_stickiness"] = np.asarray(self.stickiness)
        if self.emission == "bernoulli":
            out["emission_bias"] = bernoulli_bias(data)
        return out

    def em_prior(self, obs_dim: int, dtype=jnp.float64) -> sw.EMPrior:
        """The SLDS's conjugate M-step regularisers without the Dirichlet on P (there is no P here)."""
        prior = super().em_prior(obs_dim, dtype)
        return prior._replace(transition_pseudocounts=jnp.zeros_like(prior.transition_pseudocounts))


# --------------------------------------------------------------------------------------------------
# Helpers (the guide's and the fast path's data-driven start)


def bernoulli_bias(data) -> np.ndarray:
    """Logit of each neuron's observed spike rate (clipped to [1e-3, 1 - 1e-3]): a Bernoulli readout's start bias."""
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    rate = np.clip(np.where(mask, y, 0).sum((0, 1)) / np.maximum(mask.sum((0, 1)), 1), 1e-3, 1 - 1e-3)
    return np.log(rate / (1 - rate))


def gaussian_view(model, data: SequenceData, width: float = 5.0) -> SequenceData:
    """Data a Gaussian-emission start can use: y itself, or for Bernoulli emissions the observed spikes
    smoothed with a Gaussian kernel of ``width`` steps (normalised over the observed entries)."""
    if model.emission != "bernoulli":
        return data
    y, mask = np.asarray(data.y, float), np.asarray(data.mask)
    half = int(np.ceil(3 * width))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / width) ** 2)
    # the centred slice of the full convolution: mode="same" returns the kernel's length for shorter trials
    conv = lambda a: np.apply_along_axis(lambda v: np.convolve(v, kernel)[half: half + len(v)], 1, a)  # noqa: E731
    num, den = conv(np.where(mask, y, 0.0)), conv(mask.astype(float))
    smooth = num / np.maximum(den, 1e-9)
    observed = (den > 1e-6) & np.asarray(data.time_mask)[..., None]
    return as_sequence_data(np.where(observed, smooth, np.nan), mask=observed, lengths=data.lengths,
                            inputs=data.inputs, input_dim=model.input_dim)


__all__ = ["RSLDS", "RecurrentSwitchingChain", "recurrent_gaussian_sum_filter"]
