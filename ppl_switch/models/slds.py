"""Switching linear dynamical system (SLDS), with the discrete chain summed out exactly.

Generative program (trial n, step t = 1..T, K regimes, latent dim D, obs dim N, input dim U), the sites in
the order :meth:`SLDS.program` samples them::

    pi0                ~ Dirichlet(1_K)                                  initial_probs          (K,)
    P[j]               ~ Dirichlet(alpha 1_K + kappa e_j)  (sticky)      transition_matrix      (K, K)
    A_k                ~ N(I, 0.5^2) elementwise (matrix normal, I x I)   dynamics_matrix        (K, D, D)
    s0                 ~ HalfNormal(1)                                   initial_scales         (D,)
    s_k                ~ HalfNormal(0.5), or Gamma(a, b) (boundary-avoiding)  dynamics_scales   (K, D)
    L_k                ~ LKJCholesky(D, 2)                if D > 1       dynamics_corr_chol     (K, D, D)
    B_k                ~ N(0, 1)                          if U > 0       dynamics_input_weights (K, D, U)
    C                  ~ N(0, 1)                  unless C is given      emission_matrix        (N, D)
    d                  ~ N(0, 5^2)                                       emission_bias          (N,)
    b_k                ~ N(0, 1)                                         dynamics_bias          (K, D)
    m0                 ~ N(0, 3^2)                                       initial_mean           (D,)
    r                  ~ HalfNormal(2)            Gaussian emissions     emission_scales        (N,)
    L_R                ~ LKJCholesky(N, 2)        emission_cov="full"    emission_corr_chol     (N, N)

    z_1 ~ Cat(pi0),  z_t | z_{t-1} ~ Cat(P[z_{t-1}])
    x_1 ~ N(m0, diag(s0^2)),  x_t | x_{t-1}, z_t = k ~ N(A_k x_{t-1} + b_k + B_k u_t, Q_k),
                               Q_k = diag(s_k) L_k L_k' diag(s_k)
    y_t | x_t ~ N(C x_t + d, R)  with R = diag(r^2) or diag(r) L_R L_R' diag(r)
             or Poisson(bin_size * link(C x_t + d))  with link exp or softplus

The continuous path ``x`` (trials, T, D) is one block site. Its density p(x | theta) sums the regimes
out with the HMM forward algorithm of :mod:`ppl_switch.ops.hmm` -- the per-regime "observation"
log-likelihoods are log N(x_t; A_k x_{t-1} + b_k, Q_k) -- so NUTS and SVI see a continuous model and no
enumeration is needed. Steps past a trial's length get x_t ~ N(0, I), independent of everything else.
With ``path_parameterisation="whitened"`` the sample site is instead the path's innovations under the
regime-averaged dynamics (:class:`WhitenedSwitchingChain`) and ``x`` is a deterministic site; with
``"anchored"`` the sites are the path, m0 and b_k measured from the anchor a = -C^+ d
(:class:`AnchoredSwitchingChain`), so that the likelihood-invisible translation of the path is a move of d
alone. Same model in every case, different coordinates for NUTS. These path distributions live in
:mod:`ppl_switch.distributions.switching_chain`. :meth:`SLDS.program` reads top to bottom: the regime
chain's priors, :meth:`SLDS.sample_dynamics_and_emission_params` (every other prior, in the order above;
the rSLDS shares it), the path site, the emission.

Inference paths: NUTS over parameters and x; SVI with :meth:`SLDS.default_guide` (mean-field normal over
parameters and a Gauss–Markov chain over x, :mod:`ppl_switch.guides.gauss_markov`); structured
mean-field variational EM :func:`~ppl_switch.infer.slds_em.slds_em` (``fit_em``), the fast path; the
collapsed Gaussian-sum filter :meth:`SLDS.filter` for online filtering and an approximate log p(y). This
module holds what that EM needs from the model: the parameter conversions :meth:`SLDS.params_to_em` /
:meth:`SLDS.params_from_em`, its conjugate priors :meth:`SLDS.em_prior`, and the data-driven start
(:func:`em_initial_params`, :func:`local_dynamics_paths`, :func:`random_sticky_paths`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.distributions.switching_chain import (
    AnchoredSwitchingChain,
    PathWithRelativeParameters,
    SwitchingLinearChain,
    WhitenedSwitchingChain,
    join_relative_site,
    split_relative_site,
)
from ppl_switch.guides.path_guide import SLDSGuide
from ppl_switch.models._common import check_nonneg_float, check_nonneg_int, check_optional_dim, permute_by_dims, require_obs_dim
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_mvn_log_prob, masked_poisson_log_prob
from ppl_switch.models.base import Model
from ppl_switch.ops import switching as sw
from ppl_switch.ops.hmm import hmm_sample, hmm_smoother, hmm_viterbi

DYNAMICS_PRIOR_SCALE = 0.5
DYNAMICS_NOISE_PRIOR_SCALE = 0.5
INITIAL_MEAN_PRIOR_SCALE = 3.0
EMISSION_BIAS_PRIOR_SCALE = 5.0
EMISSION_SCALE_PRIOR_SCALE = 2.0
LKJ_CONCENTRATION = 2.0
#: the sample site that holds the path, per ``path_parameterisation``
PATH_SITES = {"centred": "x", "whitened": "x_innovations", "anchored": "x_anchored"}
#: the joint site of dynamics_scale_coordinates="path_relative" (:class:`PathWithRelativeParameters`)
RELATIVE_PATH_SITE = "path_and_relative_parameters"


def _check_scale_prior(prior):
    """``"half_normal"`` or ``("gamma", shape, rate)`` with shape > 1 (zero density at s = 0)."""
    if isinstance(prior, str) and prior == "half_normal":
        return prior
    if isinstance(prior, (tuple, list)) and len(prior) == 3 and prior[0] == "gamma":
        shape, rate = float(prior[1]), float(prior[2])
        if shape > 1.0 and rate > 0.0:
            return ("gamma", shape, rate)
    raise ValueError(
        "dynamics_scale_prior: expected 'half_normal' or ('gamma', shape, rate) with shape > 1 and rate > 0 "
        f"(a prior with zero density at scale 0), got {prior!r}"
    )


# --------------------------------------------------------------------------------------------------
# The model


def _link(name: str):
    return jnp.exp if name == "exp" else jax.nn.softplus


class SLDS(Model):
    """Switching linear dynamical system; the regimes are summed out, the path x is a block site.

    Args:
        num_states: K >= 1 regimes.
        latent_dim: D >= 1.
        obs_dim: N, or None to take it from the data.
        input_dim: U >= 0; inputs drive the dynamics (B_k u_t).
        emission: "gaussian" or "poisson".
        emission_cov: "diagonal" or "full" (Gaussian emissions).
        link: "exp" or "softplus" (Poisson emissions).
        bin_size: Poisson rate multiplier (> 0).
        stickiness: kappa >= 0, extra Dirichlet mass on the diagonal of P.
        transition_concentration: alpha > 0, Dirichlet mass on every entry of P.
        emission_matrix: optional known (N, D) readout C; then C is not a parameter (removes the
            latent-basis non-identifiability, e.g. C = I for directly observed noisy states).
        path_parameterisation: "centred" (the path x is the sample site), "whitened" (the site is
            ``x_innovations``, the path's innovations under the regime-averaged dynamics, see
            :class:`WhitenedSwitchingChain`) or "anchored" (the sites are ``x_anchored`` = x - a,
            ``initial_mean_anchored`` and ``dynamics_bias_anchored`` with the anchor a = -C^+ d, see
            :class:`AnchoredSwitchingChain`); x (and m0, b_k) are then deterministic sites. Same model,
            different coordinates for NUTS: "whitened" removes the Q_k--x funnel and the path-translation
            ridge but ties every dynamics parameter to the whole path; "anchored" removes the translation
            ridge and keeps the path otherwise centred (measured: benchmarks/results.md, SLDS history).
        dynamics_scale_prior: prior of each dynamics noise scale s_kd: "half_normal" (HalfNormal(0.5),
            the default) or ``("gamma", shape, rate)`` with shape > 1, a boundary-avoiding prior (zero
            density at s = 0; Chung et al. 2013) against the funnel toward Q_k -> 0 when the data hardly
            separate dynamics noise from observation noise (measured effect on NUTS: benchmarks/results.md, SLDS history).
            It is the program's prior (NUTS, SVI); the EM (:func:`~ppl_switch.infer.slds_em.slds_em`) keeps its
            conjugate inverse-Wishart regulariser.
        dynamics_scale_coordinates: "direct" (``dynamics_scales`` is a sample site) or "path_relative"
            (NUTS only: the path, and the noise scales and initial mean measured relative to it, are one
            block site ``path_and_relative_parameters``, see :class:`PathWithRelativeParameters`;
            ``dynamics_scales``, ``initial_mean`` and ``x`` are then deterministic sites). Same model;
            removes the funnels between Q_k and the path and between s0 and m0.
    """

    name = "slds"
    example_config = dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1)
    fixed_point_kind = "switching"  # x*_k = (I - A_k)^-1 b_k per regime and draw
    recommended_runner = ("em", {"num_restarts": 4, "num_iters": 100, "requires": {"emission": ("gaussian",)}, "otherwise": ("svi", {})})  # structured mean-field EM (model card)
    #: the constructor arguments :meth:`config` records, in order (a subclass lists its own)
    _config_keys: ClassVar[tuple[str, ...]] = (
        "num_states", "latent_dim", "obs_dim", "input_dim", "emission", "emission_cov", "link", "bin_size", "stickiness",
        "transition_concentration", "emission_matrix", "path_parameterisation", "dynamics_scale_prior",
        "dynamics_scale_coordinates",
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
        stickiness: float = 10.0,
        transition_concentration: float = 1.0,
        emission_matrix=None,
        path_parameterisation: str = "centred",
        dynamics_scale_prior="half_normal",
        dynamics_scale_coordinates: str = "direct",
    ):
        self.dynamics_scale_prior = _check_scale_prior(dynamics_scale_prior)
        if dynamics_scale_coordinates not in ("direct", "path_relative"):
            raise ValueError(
                f"dynamics_scale_coordinates: expected 'direct' or 'path_relative', got {dynamics_scale_coordinates!r}")
        if dynamics_scale_coordinates == "path_relative" and path_parameterisation == "whitened":
            raise ValueError("dynamics_scale_coordinates: 'path_relative' needs path_parameterisation 'centred' or "
                             "'anchored' (the whitened path is already measured in units of the scales)")
        self.dynamics_scale_coordinates = dynamics_scale_coordinates
        if path_parameterisation not in PATH_SITES:
            raise ValueError(
                f"path_parameterisation: expected one of {sorted(PATH_SITES)}, got {path_parameterisation!r}")
        self.path_parameterisation = path_parameterisation
        self.num_states = check_positive_int(num_states, "num_states")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = check_optional_dim(obs_dim, "obs_dim")
        self.input_dim = check_nonneg_int(input_dim, "input_dim")
        if emission not in ("gaussian", "poisson"):
            raise ValueError(f"emission: expected 'gaussian' or 'poisson', got {emission!r}")
        if emission_cov not in ("diagonal", "full"):
            raise ValueError(f"emission_cov: expected 'diagonal' or 'full', got {emission_cov!r}")
        if link not in ("exp", "softplus"):
            raise ValueError(f"link: expected 'exp' or 'softplus', got {link!r}")
        self.emission = emission
        self.emission_cov = emission_cov
        self.link = link
        self.bin_size = check_nonneg_float(bin_size, "bin_size")
        if self.bin_size <= 0:
            raise ValueError(f"bin_size: expected a positive number, got {bin_size!r}")
        self.stickiness = check_nonneg_float(stickiness, "stickiness")
        self.transition_concentration = check_nonneg_float(transition_concentration, "transition_concentration")
        if self.transition_concentration <= 0:
            raise ValueError(f"transition_concentration: expected a positive number, got {transition_concentration!r}")
        self.fixed_emission_matrix = None
        if emission_matrix is not None:
            C = np.asarray(emission_matrix, dtype=float)
            if C.ndim != 2 or C.shape[1] != self.latent_dim or (self.obs_dim is not None and C.shape[0] != self.obs_dim):
                raise ValueError(f"emission_matrix: expected shape (obs_dim, {self.latent_dim}), got {C.shape}")
            if not np.isfinite(C).all():
                raise ValueError("emission_matrix: contains NaN or inf")
            self.fixed_emission_matrix = C
            self.obs_dim = C.shape[0] if self.obs_dim is None else self.obs_dim

    def config(self) -> dict[str, Any]:
        return {key: self._config_value(key) for key in self._config_keys}

    def _config_value(self, key: str):
        if key == "emission_matrix":  # stored as an array, saved as nested lists (JSON)
            return None if self.fixed_emission_matrix is None else self.fixed_emission_matrix.tolist()
        return getattr(self, key)

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "initial_probs": ("state",),
            "transition_matrix": ("state", "state_to"),
            "dynamics_matrix": ("state", "latent", "latent_prev"),
            "dynamics_bias": ("state", "latent"),
            "dynamics_scales": ("state", "latent"),
            "initial_mean": ("latent",),
            "initial_scales": ("latent",),
            "emission_bias": ("obs",),
            "x": ("trial", "time", "latent"),
            "q_state_probs": ("trial", "time", "state"),
        }
        if self.dynamics_scale_coordinates == "path_relative":
            dims[RELATIVE_PATH_SITE] = ("path_coordinate",)
        elif self.path_parameterisation != "centred":
            dims[self.path_site] = ("trial", "time", "latent")
        if self.path_parameterisation == "anchored":
            dims["dynamics_bias_anchored"] = ("state", "latent")
            if self.dynamics_scale_coordinates == "direct":
                dims["initial_mean_anchored"] = ("latent",)
        if self.latent_dim > 1:
            dims["dynamics_corr_chol"] = ("state", "latent", "latent_prev")
        if self.input_dim:
            dims["dynamics_input_weights"] = ("state", "latent", "input")
        if self.fixed_emission_matrix is None:
            dims["emission_matrix"] = ("obs", "latent")
        if self.emission == "gaussian":
            dims["emission_scales"] = ("obs",)
            if self.emission_cov == "full" and (self.obs_dim or 2) > 1:
                dims["emission_corr_chol"] = ("obs", "obs_prev")
        return dims

    # ----- derived quantities of one draw ---------------------------------------------------------
    def _emission_matrix(self, params):
        if self.fixed_emission_matrix is not None:
            return jnp.asarray(self.fixed_emission_matrix)
        return jnp.asarray(params["emission_matrix"])

    def dynamics_scale_trils(self, params):
        """(K, D, D) lower Cholesky factors of Q_k."""
        s = jnp.asarray(params["dynamics_scales"])
        if self.latent_dim == 1:
            return s[..., None]
        return s[..., :, None] * jnp.asarray(params["dynamics_corr_chol"])

    def emission_scale_tril(self, params):
        """(N, N) lower Cholesky factor of R (Gaussian emissions)."""
        r = jnp.asarray(params["emission_scales"])
        if self.emission_cov == "full" and r.shape[-1] > 1:
            return r[:, None] * jnp.asarray(params["emission_corr_chol"])
        return jnp.diag(r)

    def _dynamics_biases(self, params, data: SequenceData):
        """(B, T-1, K, D): b_k + B_k u_{t+1}."""
        b = jnp.asarray(params["dynamics_bias"])
        B, T = data.y.shape[:2]
        if self.input_dim:
            u = jnp.asarray(data.inputs)[:, 1:]
            return b + jnp.einsum("kdu,btu->btkd", jnp.asarray(params["dynamics_input_weights"]), u)
        return jnp.broadcast_to(b, (B, T - 1) + b.shape)

    def path_distribution(self, params, data: SequenceData) -> SwitchingLinearChain:
        """p(x | theta) with the regimes summed out, for every trial."""
        return SwitchingLinearChain(
            jnp.asarray(params["initial_probs"]),
            jnp.asarray(params["transition_matrix"]),
            jnp.asarray(params["initial_mean"]),
            jnp.diag(jnp.asarray(params["initial_scales"])),
            jnp.asarray(params["dynamics_matrix"]),
            self.dynamics_scale_trils(params),
            self._dynamics_biases(params, data),
            jnp.asarray(data.time_mask),
        )

    def emission_log_prob(self, params, x, data: SequenceData):
        """(B, T) log p(y_t | x_t) over the observed entries."""
        mean = x @ self._emission_matrix(params).T + jnp.asarray(params["emission_bias"])
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)
        if self.emission == "poisson":
            return masked_poisson_log_prob(y, mask, self.bin_size * _link(self.link)(mean))
        if self.emission_cov == "full":
            return masked_mvn_log_prob(y, mask, mean, self.emission_scale_tril(params), shared_over_steps=True)
        return masked_diag_normal_log_prob(y, mask, mean, jnp.asarray(params["emission_scales"]))

    # ----- program ------------------------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """The SLDS; its sites in the order they are sampled (K regimes, trial n, step t)::

            pi0  ~ Dirichlet(1_K)                                    initial_probs
            P[j] ~ Dirichlet(alpha 1_K + kappa e_j)                  transition_matrix
            A_k, s0, s_k, L_k, B_k, C, d, b_k, m0, r, L_R ~ their priors   (sample_dynamics_and_emission_params)
            x_n  ~ sum_z p(z | pi0, P) p(x | z, theta)               x: one block site per trial, z summed out
                   z_1 ~ Cat(pi0), z_t ~ Cat(P[z_{t-1}]);  x_1 ~ N(m0, diag(s0^2)),
                   x_t | x_{t-1}, z_t = k ~ N(A_k x_{t-1} + b_k + B_k u_t, Q_k = diag(s_k) L_k L_k' diag(s_k))
            y_t  ~ N(C x_t + d, R)  or  Poisson(bin_size * link(C x_t + d))    y: the observed entries

        Other coordinates of the same path (same model, for NUTS): the sample site is ``x_innovations``
        ("whitened") or ``x_anchored`` ("anchored") and ``x`` a deterministic site; with
        ``dynamics_scale_coordinates="path_relative"`` it is ``path_and_relative_parameters``, which also
        holds s_k and m0 (then deterministic sites). ``record_log_lik`` adds the deterministic site
        ``log_lik``, (trials, T) log p(y_t | x_t).
        """
        K = self.num_states
        # the regime chain z: initial probabilities and sticky transition rows
        initial_probs = numpyro.sample("initial_probs", dist.Dirichlet(jnp.ones(K)))
        concentration = self.transition_concentration + self.stickiness * jnp.eye(K)
        transition_matrix = numpyro.sample("transition_matrix", dist.Dirichlet(concentration).to_event(1))
        # each regime's linear dynamics, the initial state and the readout
        params = {"initial_probs": initial_probs, "transition_matrix": transition_matrix,
                  **self.sample_dynamics_and_emission_params(data.obs_dim)}
        # the continuous path x, its density p(x | theta) summing the regimes out (forward algorithm)
        if self.dynamics_scale_coordinates == "path_relative":
            # one block site: the path, and the scales s_k and initial mean m0 measured relative to it
            joint = self.path_with_relative_parameters(params, data)
            x, scales, m0 = joint.path_scales_and_initial_mean(numpyro.sample(RELATIVE_PATH_SITE, joint))
            params["dynamics_scales"] = numpyro.deterministic("dynamics_scales", scales)
            params["initial_mean"] = numpyro.deterministic("initial_mean", m0)
            x = numpyro.deterministic("x", x)
        else:
            chain = self.path_distribution(params, data)  # SwitchingLinearChain
            with numpyro.plate("trial", data.num_trials):
                if self.path_parameterisation == "centred":
                    x = numpyro.sample("x", chain)
                else:  # the site is x_innovations (whitened) or x_anchored = x - a (anchored)
                    coords = self.path_coordinates(chain, params)
                    x = numpyro.deterministic("x", coords.to_path(numpyro.sample(self.path_site, coords)))
        # the emission, over the observed entries of y
        self.observe(params, x, data, record_log_lik=record_log_lik)

    def observe(self, params, x, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """The emission site ``y`` given the path x (trials, T, D), over the observed entries of y:
        N(C x_t + d, diag(r^2)), N(C x_t + d, R) (full R: each step's observed block) or
        Poisson(bin_size * link(C x_t + d)); ``record_log_lik`` adds ``log_lik``, (trials, T) log p(y_t | x_t)."""
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)
        C = self._emission_matrix(params)  # the fixed C where one is given
        mean = x @ C.T + params["emission_bias"]
        if self.emission == "poisson":
            rate = self.bin_size * (jnp.exp(mean) if self.link == "exp" else jax.nn.softplus(mean))
            numpyro.sample("y", dist.Poisson(rate).mask(mask).to_event(3), obs=y)
        elif self.emission_cov == "diagonal" or data.obs_dim == 1:
            numpyro.sample("y", dist.Normal(mean, params["emission_scales"]).mask(mask).to_event(3), obs=y)
        else:  # full R: the observed block of each step (see masked_mvn_log_prob)
            R_tril = self.emission_scale_tril(params)  # R = R_tril R_tril'
            numpyro.factor("y", jnp.sum(masked_mvn_log_prob(y, mask, mean, R_tril, shared_over_steps=True)))
        if record_log_lik:
            numpyro.deterministic("log_lik", self.emission_log_prob(params, x, data))

    def sample_dynamics_and_emission_params(self, N: int) -> dict[str, jax.Array]:
        """Samples the priors of every parameter but the regime chain's (K regimes, latent dim D, N observed
        dims, U inputs) and returns ``{site: value}``; :meth:`program` samples pi0 and P before it, and the
        rSLDS (:class:`~ppl_switch.models.rslds.RSLDS`) shares it. Its sites, in order::

            A_k ~ N(I, 0.5^2) elementwise                dynamics_matrix         (K, D, D)
            s0  ~ HalfNormal(1)                          initial_scales          (D,)
            s_k ~ HalfNormal(0.5) or Gamma(shape, rate)  dynamics_scales         (K, D)     scale coordinates "direct"
            L_k ~ LKJCholesky(D, 2)                      dynamics_corr_chol      (K, D, D)  D > 1
            B_k ~ N(0, 1)                                dynamics_input_weights  (K, D, U)  U > 0
            C   ~ N(0, 1)                                emission_matrix         (N, D)     unless C is given
            d   ~ N(0, 5^2)                              emission_bias           (N,)
            b_k ~ N(0, 1)                                dynamics_bias           (K, D)
            m0  ~ N(0, 3^2)                              initial_mean            (D,)       "direct"
            r   ~ HalfNormal(2)                          emission_scales         (N,)       Gaussian emissions
            L_R ~ LKJCholesky(N, 2)                      emission_corr_chol      (N, N)     emission_cov="full", N > 1

        With ``path_parameterisation="anchored"`` the sites of b_k and m0 are ``dynamics_bias_anchored``
        b_k - (I - A_k) a and ``initial_mean_anchored`` m0 - a, measured from the anchor a = -C^+ d
        (:meth:`path_anchor`; unit Jacobian, the same priors), and ``dynamics_bias`` and ``initial_mean``
        are deterministic sites. With ``"path_relative"`` scales, s_k and m0 are sampled with the path.
        """
        K, D, U = self.num_states, self.latent_dim, self.input_dim
        direct = self.dynamics_scale_coordinates == "direct"
        p = {}
        p["dynamics_matrix"] = numpyro.sample(
            "dynamics_matrix", dist.Normal(jnp.broadcast_to(jnp.eye(D), (K, D, D)), DYNAMICS_PRIOR_SCALE).to_event(3))
        p["initial_scales"] = numpyro.sample("initial_scales", dist.HalfNormal(1.0).expand([D]).to_event(1))
        if direct:
            p["dynamics_scales"] = numpyro.sample(
                "dynamics_scales", self.dynamics_scale_distribution().expand([K, D]).to_event(2))
        if D > 1:
            p["dynamics_corr_chol"] = numpyro.sample(
                "dynamics_corr_chol", dist.LKJCholesky(D, LKJ_CONCENTRATION).expand([K]).to_event(1))
        if U:
            p["dynamics_input_weights"] = numpyro.sample(
                "dynamics_input_weights", dist.Normal(0.0, 1.0).expand([K, D, U]).to_event(3))
        if self.fixed_emission_matrix is None:
            p["emission_matrix"] = numpyro.sample("emission_matrix", dist.Normal(0.0, 1.0).expand([N, D]).to_event(2))
        p["emission_bias"] = numpyro.sample(
            "emission_bias", dist.Normal(0.0, EMISSION_BIAS_PRIOR_SCALE).expand([N]).to_event(1))
        if self.path_parameterisation != "anchored":
            p["dynamics_bias"] = numpyro.sample("dynamics_bias", dist.Normal(jnp.zeros((K, D)), 1.0).to_event(2))
            if direct:
                p["initial_mean"] = numpyro.sample(
                    "initial_mean", dist.Normal(jnp.zeros(D), INITIAL_MEAN_PRIOR_SCALE).to_event(1))
        else:  # measured from the anchor a: m0 = m~0 + a, b_k = b~_k + (I - A_k) a
            a, b_shift = self.anchor_shifts(p)
            b = numpyro.sample("dynamics_bias_anchored", dist.Normal(-b_shift, 1.0).to_event(2)) + b_shift
            p["dynamics_bias"] = numpyro.deterministic("dynamics_bias", b)
            if direct:
                m0 = numpyro.sample("initial_mean_anchored", dist.Normal(-a, INITIAL_MEAN_PRIOR_SCALE).to_event(1)) + a
                p["initial_mean"] = numpyro.deterministic("initial_mean", m0)
        if self.emission == "gaussian":
            p["emission_scales"] = numpyro.sample(
                "emission_scales", dist.HalfNormal(EMISSION_SCALE_PRIOR_SCALE).expand([N]).to_event(1))
            if self.emission_cov == "full" and N > 1:
                p["emission_corr_chol"] = numpyro.sample("emission_corr_chol", dist.LKJCholesky(N, LKJ_CONCENTRATION))
        return p

    # ----- the program's building blocks: priors and path coordinates ----------------------------
    def dynamics_scale_distribution(self) -> dist.Distribution:
        """The prior of one dynamics noise scale s_kd, per ``dynamics_scale_prior``: HalfNormal(0.5) or
        Gamma(shape, rate)."""
        if self.dynamics_scale_prior == "half_normal":
            return dist.HalfNormal(DYNAMICS_NOISE_PRIOR_SCALE)
        _, shape, rate = self.dynamics_scale_prior
        return dist.Gamma(shape, rate)

    def path_anchor(self, params):
        """(D,) a = -C^+ d: the latent offset that the emission bias stands for (C (a + v) + d = C v on the
        column space of C). The anchored coordinates measure the path, m0 and b_k from it."""
        C = self._emission_matrix(params)
        return -jnp.linalg.pinv(C) @ jnp.asarray(params["emission_bias"])

    def anchor_shifts(self, params):
        """((D,) a, (K, D) (I - A_k) a) with the anchor a = :meth:`path_anchor`: the anchored coordinates'
        shifts, m0 = m~0 + a and b_k = b~_k + (I - A_k) a."""
        a = self.path_anchor(params)
        return a, a - jnp.asarray(params["dynamics_matrix"]) @ a

    def path_with_relative_parameters(self, params, data: SequenceData) -> "PathWithRelativeParameters":
        """The joint (path, scales, initial mean) site of ``dynamics_scale_coordinates="path_relative"``;
        ``params`` without ``dynamics_scales`` and ``initial_mean``, whose priors (:meth:`dynamics_scale_distribution`,
        N(0, 3^2)) it carries."""
        initial_mean_prior = dist.Normal(jnp.zeros(self.latent_dim), INITIAL_MEAN_PRIOR_SCALE).to_event(1)
        return PathWithRelativeParameters(
            lambda s, m0: self.path_distribution({**params, "dynamics_scales": s, "initial_mean": m0}, data),
            lambda chain: self.path_coordinates(chain, params),
            self.dynamics_scale_distribution(), initial_mean_prior, params["initial_scales"],
            data.y.shape[:2] + (self.latent_dim,), self.num_states)

    #: every site a path can be sampled at (one per ``path_parameterisation``): guides hide them all
    path_sites = tuple(PATH_SITES.values())

    @property
    def path_site(self) -> str:
        """The sample site that holds the path: ``x``, ``x_innovations`` or ``x_anchored``."""
        return PATH_SITES[self.path_parameterisation]

    def path_coordinates(self, chain: SwitchingLinearChain, params):
        """The distribution of the path's sample site in this model's coordinates: the innovations under the
        regime-averaged dynamics (:class:`WhitenedSwitchingChain`, "whitened"), the path measured from the
        anchor (:class:`AnchoredSwitchingChain`, "anchored"), or None for the centred path (``chain`` itself)."""
        if self.path_parameterisation == "whitened":
            return WhitenedSwitchingChain(chain)
        if self.path_parameterisation == "anchored":
            return AnchoredSwitchingChain(chain, self.path_anchor(params))
        return None

    # ----- guides -------------------------------------------------------------------------------
    def default_guide(self, data=None, *, init_values=None, init_scale: float = 0.05):
        """Mean-field normal over the parameters plus a Gauss–Markov chain over x (see :class:`~ppl_switch.guides.path_guide.SLDSGuide`).

        Args:
            data: optional data used to initialise (PCA for C and x, distinct rotations for A_k).
            init_values: optional ``{site: value}`` start (e.g. ``fit_em(...).params``); overrides ``data``.
            init_scale: initial posterior standard deviation of every site.
        """
        if self.dynamics_scale_coordinates == "path_relative":
            raise ValueError("dynamics_scale_coordinates: the default SVI guide needs 'direct' scales "
                             "('path_relative' is a coordinate choice for NUTS)")
        return SLDSGuide(self, data=data, init_values=init_values, init_scale=init_scale)

    def init_values(self, data, seed: int = 0) -> dict[str, np.ndarray]:
        """A data-driven start for every site: C, d and x from PCA (or C^+ y for a known C), one AR(1)
        fit for the dynamics, A_k made distinct by small rotations so that the regimes can separate."""
        data = data if isinstance(data, SequenceData) else self.prepare(data)
        em = em_initial_params(self, data, np.random.default_rng(seed))
        K, D = self.num_states, self.latent_dim
        A = np.asarray(em["dynamics_matrices"]).copy()
        for k in range(K):
            A[k] = A[k] @ _block_rotation(D, 0.1 * (k - (K - 1) / 2))
        em["dynamics_matrices"] = A
        out = self.params_from_em(em)
        out["x"] = least_squares_latents(em, data)
        out.update(self.coordinate_site_values(out, data))
        return out

    def coordinate_site_values(self, params, data) -> dict[str, np.ndarray]:
        """The sample sites of this model's path coordinates computed from site-form ``params`` (with x,
        m0, b_k, d): ``{}`` (centred), ``{"x_innovations"}`` (whitened) or ``{"x_anchored",
        "initial_mean_anchored", "dynamics_bias_anchored"}`` (anchored)."""
        if "x" not in params:
            return {}
        data = data if isinstance(data, SequenceData) else self.prepare(data)
        p = {k: jnp.asarray(v) for k, v in params.items() if k != "q_state_probs"}
        out = {}
        if self.dynamics_scale_coordinates == "path_relative":
            joint = self.path_with_relative_parameters(p, data)
            out[RELATIVE_PATH_SITE] = np.asarray(joint.site_value(p["x"], p["dynamics_scales"], p["initial_mean"]))
        elif self.path_parameterisation != "centred":
            coords = self.path_coordinates(self.path_distribution(p, data), p)
            out[self.path_site] = np.asarray(coords.to_site(p["x"]))
        if self.path_parameterisation == "anchored":
            a, b_shift = self.anchor_shifts(p)  # the sampling's shifts, inverted
            if self.dynamics_scale_coordinates == "direct":  # path_relative: m0 is in the joint site
                out["initial_mean_anchored"] = np.asarray(p["initial_mean"] - a)
            out["dynamics_bias_anchored"] = np.asarray(p["dynamics_bias"] - b_shift)
        return out

    def latent_site_values(self, params, data) -> dict[str, np.ndarray]:
        """Site-form values (e.g. ``fit_em(...).params``) as a start for the program's latent sites:
        drops EM-only outputs, moves probabilities off the simplex boundary (the EM's MAP may put exactly
        0 on a transition, which has no unconstrained value) and adds the sites of the model's path
        coordinates (:meth:`coordinate_site_values`: ``x_innovations`` for "whitened", the anchored path and
        biases for "anchored"); pass the result as ``init_params`` to ``fit_nuts``."""
        out = {k: np.asarray(v) for k, v in params.items() if k != "q_state_probs"}
        for name in ("initial_probs", "transition_matrix"):
            if name in out:
                v = out[name] + 1e-3
                out[name] = v / v.sum(-1, keepdims=True)
        out.update(self.coordinate_site_values(out, data))
        return out

    # ----- quantities from one draw -------------------------------------------------------------
    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, T) pointwise log-likelihood of a draw.

        Gaussian emissions: the collapsed Gaussian-sum filter's log p(y_t | y_{<t}, theta), with x and z
        integrated out (approximately; exact for the first two steps) -- the predictive quantity that
        LOO/WAIC want, and independent of the sampled path. Poisson emissions: log p(y_t | x_t) given
        the draw's path ``x``."""
        if self.emission == "gaussian":
            return self.filter(params, data).step_log_likelihoods
        return self.emission_log_prob(params, jnp.asarray(params["x"]), data)

    def _regime_log_likelihoods(self, params, data):
        return self.path_distribution(params, data).regime_log_likelihoods(jnp.asarray(params["x"]))

    def state_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        """p(z | x, theta) -- exact given the draw's path: marginals (B, T, K) and the Viterbi path (B, T).

        For an EM point estimate (``q_state_probs`` present) the marginals are the structured mean-field
        q(z) and the path is their argmax."""
        if "q_state_probs" in params:
            q = jnp.asarray(params["q_state_probs"])
            return {"state_probs": q, "viterbi": jnp.argmax(q, -1).astype(jnp.int32)}
        ll = self._regime_log_likelihoods(params, data)
        tm = jnp.asarray(data.time_mask)
        P0, P = jnp.asarray(params["initial_probs"]), jnp.asarray(params["transition_matrix"])
        probs = jax.vmap(lambda l, m: hmm_smoother(P0, P, l, m).smoothed_probs)(ll, tm)
        path = jax.vmap(lambda l, m: hmm_viterbi(P0, P, l, m))(ll, tm)
        return {"state_probs": probs, "viterbi": jnp.asarray(path, jnp.int32)}

    def sample_states(self, key, params, data: SequenceData) -> jax.Array:
        """One path z ~ p(z | x, theta) per trial (FFBS given the draw's x), (B, T) int."""
        if "q_state_probs" in params:
            q = jnp.asarray(params["q_state_probs"])
            return jax.random.categorical(key, jnp.log(q)).astype(jnp.int32)
        ll = self._regime_log_likelihoods(params, data)
        tm = jnp.asarray(data.time_mask)
        keys = jax.random.split(key, ll.shape[0])
        P0, P = jnp.asarray(params["initial_probs"]), jnp.asarray(params["transition_matrix"])
        return jax.vmap(lambda k, l, m: hmm_sample(k, P0, P, l, m))(keys, ll, tm).astype(jnp.int32)

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """y ~ p(y | x) given the draw's path, shaped like data.y."""
        return self._emit(key, params, jnp.asarray(params["x"]))

    def _emit(self, key, params, x):
        mean = x @ self._emission_matrix(params).T + jnp.asarray(params["emission_bias"])
        if self.emission == "poisson":
            return jax.random.poisson(key, self.bin_size * _link(self.link)(mean)).astype(mean.dtype)
        L = self.emission_scale_tril(params)
        return mean + jax.random.normal(key, mean.shape, mean.dtype) @ L.T

    # ----- filtering ----------------------------------------------------------------------------
    def switching_params(self, params, data: SequenceData) -> sw.SwitchingParams:
        """Batched :class:`~ppl_switch.ops.switching.SwitchingParams` (leading axis trials), Gaussian only."""
        if self.emission != "gaussian":
            raise NotImplementedError("switching_params: the collapsed filter and EM need Gaussian emissions")
        B = data.y.shape[0]
        Lq = self.dynamics_scale_trils(params)
        Lr = self.emission_scale_tril(params)
        s0 = jnp.asarray(params["initial_scales"])

        def batch(a):
            return jnp.broadcast_to(a, (B,) + jnp.shape(a))

        return sw.SwitchingParams(
            batch(jnp.asarray(params["initial_probs"])), batch(jnp.asarray(params["transition_matrix"])),
            batch(jnp.asarray(params["initial_mean"])), batch(jnp.diag(s0**2)),
            batch(jnp.asarray(params["dynamics_matrix"])), self._dynamics_biases(params, data),
            batch(Lq @ jnp.swapaxes(Lq, -1, -2)), batch(self._emission_matrix(params)),
            batch(jnp.asarray(params["emission_bias"])), batch(Lr @ Lr.T),
        )

    def filter(self, params, data: SequenceData) -> sw.GaussianSumFilterResult:
        """Collapsed Gaussian-sum filter (one Gaussian per regime) of every trial; approximate
        log p(y) in ``log_likelihood`` (B,), regime probabilities p(z_t | y_{1:t}) (B, T, K)."""
        sp = self.switching_params(params, data)
        return jax.vmap(sw.gaussian_sum_filter)(sp, jnp.asarray(data.y), jnp.asarray(data.mask))

    # ----- simulation ---------------------------------------------------------------------------
    def default_params(self, key) -> dict[str, Any]:
        """Regimes rotating at distinct speeds (radius 0.95), Q = 0.03 I, R = 0.2 I (Gaussian), a
        sticky chain (0.95 on the diagonal), C = I when N = D, else a random readout."""
        K, D = self.num_states, self.latent_dim
        N = require_obs_dim(self)
        key_c, key_b = jax.random.split(key)
        angles = [0.15 * (k + 1) * (-1) ** k for k in range(K)]
        A = np.stack([0.95 * _block_rotation(D, a) for a in angles])
        P = np.full((K, K), 0.05 / max(K - 1, 1))
        np.fill_diagonal(P, 0.95 if K > 1 else 1.0)
        p = {
            "initial_probs": np.full(K, 1.0 / K),
            "transition_matrix": P,
            "dynamics_matrix": A,
            "dynamics_bias": np.zeros((K, D)),
            "dynamics_scales": np.full((K, D), math.sqrt(0.03)),
            "initial_mean": np.r_[2.0, np.zeros(D - 1)],
            "initial_scales": np.full(D, math.sqrt(0.1)),
            "emission_bias": np.zeros(N) if self.emission == "gaussian" else np.full(N, math.log(2.0)),
        }
        if D > 1:
            p["dynamics_corr_chol"] = np.broadcast_to(np.eye(D), (K, D, D)).copy()
        if self.input_dim:
            p["dynamics_input_weights"] = 0.1 * np.asarray(jax.random.normal(key_b, (K, D, self.input_dim)))
        if self.fixed_emission_matrix is None:
            p["emission_matrix"] = np.eye(N, D) if N == D else np.asarray(jax.random.normal(key_c, (N, D))) / math.sqrt(D)
        if self.emission == "gaussian":
            p["emission_scales"] = np.full(N, math.sqrt(0.2))
            if self.emission_cov == "full" and N > 1:
                p["emission_corr_chol"] = np.eye(N)
        return p

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None, lengths=None):
        """Draw data; returns ``(SequenceData, truth)``: truth = ``{"params": site values including the
        path "x", "states": (B, T) int (-1 past the end), "latents": (B, T, D)}``."""
        B = check_positive_int(num_trials, "num_trials")
        T = check_positive_int(num_timesteps, "num_timesteps")
        key_p, key_path, key_y = jax.random.split(key, 3)
        params = self.default_params(key_p) if params is None else dict(params)
        N = require_obs_dim(self)
        if self.input_dim and inputs is None:  # standard-normal inputs, drawn from the key
            inputs = np.asarray(jax.random.normal(jax.random.fold_in(key, 7), (B, T, self.input_dim)))
        lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
        shell = self.prepare(np.zeros((B, T, N)), lengths=lengths, inputs=inputs)

        @jax.jit
        def draw(params, shell, key_path, key_y):
            z, x = self.path_distribution(params, shell).sample_with_states(key_path)
            return z, x, self._emit(key_y, params, x)

        z, x, y = draw({k: jnp.asarray(v) for k, v in params.items()}, shell, key_path, key_y)
        y = np.asarray(y)
        tm = np.asarray(shell.time_mask)
        y = np.where(tm[..., None], y, np.nan)
        data = self.prepare(y, lengths=lengths, inputs=inputs)
        params = {k: np.asarray(v) for k, v in params.items()}
        params["x"] = np.asarray(x)
        return data, {"params": params, "states": np.asarray(z), "latents": np.asarray(x)}

    # ----- label switching ----------------------------------------------------------------------
    def state_features(self, params) -> np.ndarray:
        A = np.asarray(params["dynamics_matrix"])
        b = np.asarray(params["dynamics_bias"])
        return np.concatenate([A.reshape(A.shape[0], -1), b], -1)

    def permute_states(self, params, perm) -> dict[str, Any]:
        out = permute_by_dims(params, perm, self.site_dims())
        if RELATIVE_PATH_SITE in out:  # its flat block has regime rows in eta
            path, eta, zeta = split_relative_site(np.asarray(out[RELATIVE_PATH_SITE]), self.num_states, self.latent_dim)
            out[RELATIVE_PATH_SITE] = np.asarray(join_relative_site(path, eta[np.asarray(perm)], zeta))
        return out

    # ----- hooks of the structured mean-field variational EM (ppl_switch.infer.slds_em) ----------
    def params_to_em(self, params, dtype=None) -> dict[str, jax.Array]:
        """Site-form params -> the EM's parameter dict (:mod:`ppl_switch.ops.switching`)."""
        Lq = self.dynamics_scale_trils(params)
        K, D = self.num_states, self.latent_dim
        U = self.input_dim
        em = {
            "initial_probs": jnp.asarray(params["initial_probs"]),
            "transition_matrix": jnp.asarray(params["transition_matrix"]),
            "initial_mean": jnp.asarray(params["initial_mean"]),
            "initial_cov": jnp.diag(jnp.asarray(params["initial_scales"]) ** 2),
            "dynamics_matrices": jnp.asarray(params["dynamics_matrix"]),
            "dynamics_biases": jnp.asarray(params["dynamics_bias"]),
            "input_matrices": jnp.asarray(params["dynamics_input_weights"]) if U else jnp.zeros((K, D, 0)),
            "dynamics_covs": Lq @ jnp.swapaxes(Lq, -1, -2),
            "emission_matrix": self._emission_matrix(params),
            "emission_bias": jnp.asarray(params["emission_bias"]),
        }
        Lr = self.emission_scale_tril(params)
        em["emission_cov"] = Lr @ Lr.T
        if dtype is not None:
            em = {k: v.astype(dtype) for k, v in em.items()}
        return em

    def params_from_em(self, em) -> dict[str, np.ndarray]:
        """The EM's parameter dict -> site-form params (numpy)."""
        em = {k: np.asarray(v) for k, v in em.items()}
        Q = em["dynamics_covs"]
        s = np.sqrt(np.diagonal(Q, axis1=-2, axis2=-1))
        p = {
            "initial_probs": em["initial_probs"],
            "transition_matrix": em["transition_matrix"],
            "dynamics_matrix": em["dynamics_matrices"],
            "dynamics_bias": em["dynamics_biases"],
            "dynamics_scales": s,
            "initial_mean": em["initial_mean"],
            "initial_scales": np.sqrt(np.diagonal(em["initial_cov"])),
            "emission_bias": em["emission_bias"],
        }
        if self.latent_dim > 1:
            p["dynamics_corr_chol"] = np.linalg.cholesky(Q / (s[..., :, None] * s[..., None, :]))
        if self.input_dim:
            p["dynamics_input_weights"] = em["input_matrices"]
        if self.fixed_emission_matrix is None:
            p["emission_matrix"] = em["emission_matrix"]
        R = em["emission_cov"]
        r = np.sqrt(np.diagonal(R))
        p["emission_scales"] = r
        if self.emission_cov == "full" and R.shape[0] > 1:
            p["emission_corr_chol"] = np.linalg.cholesky(R / (r[:, None] * r[None, :]))
        return p

    def em_prior(self, obs_dim: int, dtype=jnp.float64) -> sw.EMPrior:
        """The M-step's conjugate regularisers: the model's sticky Dirichlet on P; weak MNIW on
        ([A_k b_k B_k], Q_k) centred on A = I; weak inverse-Wishart / inverse-gamma on S0 and R."""
        K, D, U, N = self.num_states, self.latent_dim, self.input_dim, obs_dim
        F = D + 1 + U
        conc = self.transition_concentration + self.stickiness * np.eye(K)
        W0 = np.concatenate([np.eye(D), np.zeros((D, 1 + U))], 1)
        arr = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        full = self.emission_cov == "full"
        return sw.EMPrior(
            transition_pseudocounts=arr(conc - 1.0),
            dynamics_prior_mean=arr(W0),
            dynamics_prior_precision=arr(1e-2 * np.eye(F)),
            dynamics_cov_scale=arr(1e-3 * np.eye(D)),
            dynamics_cov_dof=arr(D + 1.0),
            initial_cov_scale=arr(0.1 * np.eye(D)),
            initial_cov_dof=arr(D + 1.0),
            emission_cov_scale=arr(1e-3 * (np.eye(N) if full else np.ones(N))),
            emission_cov_dof=arr(1.0),
        )

    def em_log_prior_value(self, params, obs_dim: int, tied_dynamics_cov: bool = False) -> jax.Array:
        """log p(theta) under :meth:`em_prior` (the part of the EM objective that is not the ELBO)."""
        dtype = jnp.result_type(float)
        p = self.params_to_em(params, dtype)
        return sw.em_log_prior(p, self.em_prior(obs_dim, dtype), self.emission_cov == "diagonal", tied_dynamics_cov)


# --------------------------------------------------------------------------------------------------
# Initialisation helpers (host-side NumPy)


def _block_rotation(D: int, angle: float) -> np.ndarray:
    """D x D matrix with 2-D rotations by ``angle`` on consecutive coordinate pairs (1 on a leftover)."""
    R = np.eye(D)
    c, s = np.cos(angle), np.sin(angle)
    for i in range(0, D - 1, 2):
        R[i : i + 2, i : i + 2] = [[c, -s], [s, c]]
    return R


def least_squares_latents(em, data: SequenceData) -> np.ndarray:
    """x_t = argmin ||y_t - C x - d||^2 over observed entries (+ small ridge), (B, T, D)."""
    C = np.asarray(em["emission_matrix"])
    d = np.asarray(em["emission_bias"])
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    D = C.shape[1]
    Cm = np.where(mask[..., None], C, 0.0)  # (B, T, N, D)
    r = np.where(mask, y - d, 0.0)
    lhs = np.einsum("btnd,btne->btde", Cm, Cm) + 1e-3 * np.eye(D)
    rhs = np.einsum("btnd,btn->btd", Cm, r)
    return np.linalg.solve(lhs, rhs[..., None])[..., 0]


def em_initial_params(model: SLDS, data: SequenceData, rng) -> dict[str, np.ndarray]:
    """Starting parameters: C, d from PCA (or the fixed C), R from the residual, one shared AR(1) fit."""
    K, D, U = model.num_states, model.latent_dim, model.input_dim
    y, mask = np.asarray(data.y), np.asarray(data.mask)
    N = y.shape[-1]
    obs = mask.sum((0, 1))
    d = np.where(mask, y, 0.0).sum((0, 1)) / np.maximum(obs, 1)
    yc = np.where(mask, y - d, 0.0).reshape(-1, N)
    var = (yc**2).sum(0) / np.maximum(obs, 1)
    if model.fixed_emission_matrix is not None:
        C = model.fixed_emission_matrix
    else:
        _, svals, Vt = np.linalg.svd(yc, full_matrices=False)
        C = np.zeros((N, D))
        k = min(D, Vt.shape[0])
        C[:, :k] = Vt[:k].T
        if k < D:
            C[:, k:] = 0.1 * rng.standard_normal((N, D - k))
    em = {"emission_matrix": C, "emission_bias": d}
    x = least_squares_latents(em, data)
    resid = np.where(mask, y - x @ C.T - d, 0.0)
    rvar = (resid**2).sum((0, 1)) / np.maximum(obs, 1)
    R = np.diag(np.maximum(rvar, 0.25 * var) + 1e-6)
    # one AR(1) regression x_{t+1} ~ [x_t, 1, u_{t+1}] over steps inside the trials
    tm = np.asarray(data.time_mask)
    valid = (tm[:, 1:] & tm[:, :-1]).reshape(-1)
    u = np.asarray(data.inputs)[:, 1:] if U else np.zeros(x[:, 1:].shape[:2] + (0,))
    f = np.concatenate([x[:, :-1], np.ones(x[:, :-1].shape[:2] + (1,)), u], -1).reshape(-1, D + 1 + U)[valid]
    target = x[:, 1:].reshape(-1, D)[valid]
    if len(target) > D + 1 + U:
        W = np.linalg.solve(f.T @ f + 1e-3 * np.eye(f.shape[1]), f.T @ target).T
        Q = np.cov((target - f @ W.T).T).reshape(D, D) + 1e-3 * np.eye(D)
    else:
        W = np.concatenate([0.9 * np.eye(D), np.zeros((D, 1 + U))], 1)
        Q = 0.1 * np.eye(D)
    P = np.full((K, K), 0.1 / max(K - 1, 1))
    np.fill_diagonal(P, 0.9 if K > 1 else 1.0)
    x0 = x[:, 0]
    return {
        "initial_probs": np.full(K, 1.0 / K),
        "transition_matrix": P,
        "initial_mean": x0.mean(0),
        "initial_cov": np.diag(np.maximum(x0.var(0), 0.1)),
        "dynamics_matrices": np.broadcast_to(W[:, :D], (K, D, D)).copy(),
        "dynamics_biases": np.broadcast_to(W[:, D], (K, D)).copy(),
        "input_matrices": np.broadcast_to(W[:, D + 1 :], (K, D, U)).copy(),
        "dynamics_covs": np.broadcast_to(Q, (K, D, D)).copy(),
        "emission_matrix": C,
        "emission_bias": d,
        "emission_cov": R,
    }


def local_dynamics_paths(em, data: SequenceData, rng, num_paths: int, window: int = 10) -> list[np.ndarray]:
    """(B, T, K) one-hot starting regime paths from k-means on local linear dynamics.

    The path is smoothed once with the single-regime start (Kalman smoother), a linear map
    x_{t+1} ~ A x_t + b is fitted by least squares in a sliding window around every step, and the
    windows are clustered (k-means, a different seed per path) on vec([A b]).
    """
    from ppl_switch.ops.kalman import LGSSMParams

    K = int(em["transition_matrix"].shape[0])
    B, T = data.y.shape[:2]
    lg = LGSSMParams(
        jnp.asarray(em["initial_mean"]), jnp.asarray(em["initial_cov"]), jnp.asarray(em["dynamics_matrices"][0]),
        jnp.asarray(em["dynamics_biases"][0]), jnp.asarray(em["dynamics_covs"][0]), jnp.asarray(em["emission_matrix"]),
        jnp.asarray(em["emission_bias"]), jnp.asarray(em["emission_cov"]),
    )
    x = np.asarray(_smoothed_means(lg, jnp.asarray(data.y), jnp.asarray(data.mask)), float)
    lengths = np.asarray(data.lengths)
    inside = np.arange(T)[None] < lengths[:, None]  # (B, T): the steps that get a window, in (b, t) order
    # chunks of trials bound the (chunk, T, D+1, D+1) running sums
    feats = np.concatenate([_window_dynamics(x[c : c + 256], lengths[c : c + 256], window) for c in range(0, B, 256)])
    feats = feats.reshape(B * T, -1)[inside.reshape(-1)]
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    paths = []
    for _ in range(num_paths):
        centers = feats[rng.choice(len(feats), K, replace=False)]
        for _ in range(30):
            labels = np.argmin(((feats[:, None] - centers[None]) ** 2).sum(-1), 1)
            centers = np.stack([feats[labels == k].mean(0) if np.any(labels == k) else centers[k] for k in range(K)])
        g = np.full((B, T, K), 1.0 / K)
        g[inside] = np.eye(K)[labels]
        paths.append(g)
    return paths


@jax.jit
def _smoothed_means(lg, y, mask):
    """(B, T, D) Kalman-smoothed means of every trial under one LGSSM (compiled once per shape)."""
    from ppl_switch.ops.kalman import lgssm_smoother

    return jax.vmap(lambda y_b, m_b: lgssm_smoother(lg, y_b, m_b).smoothed_means)(y, mask)


def _window_dynamics(x: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """vec([A b]) of the ridge least-squares fit x_{s+1} ~ A x_s + b over a window of steps s around every t.

    x (B, T, D) smoothed latents, lengths (B,). For step t of a trial of length n the window is
    [lo, hi) = [max(0, t - window // 2), min(n - 1, t + window // 2)), widened to D + 2 steps near the ends
    (short trials: as far as the trial allows); the fit solves (F'F + 1e-3 I) W = F' X_next. Window sums come
    from running sums over s, so the cost is O(B T D^3) in numpy, with no loop over steps. Returns
    (B, T, (D + 1) D); rows at t >= n are unused.
    """
    B, T, D = x.shape
    half = window // 2
    t = np.arange(T)[None]
    n = lengths[:, None]
    lo, hi = np.maximum(0, t - half), np.minimum(n - 1, t + half)
    short = hi - lo < D + 2
    lo = np.where(short, np.maximum(0, np.minimum(lo, n - 1 - (D + 2))), lo)
    hi = np.where(short, np.minimum(n - 1, np.maximum(hi, D + 2)), hi)
    lo, hi = np.where(t < n, lo, 0), np.where(t < n, hi, 0)  # rows t >= n are unused: an empty window
    f = np.concatenate([x, np.ones((B, T, 1))], -1)  # (B, T, D + 1)
    # running sums over s < k of f_s f_s' and f_s x_{s+1}' (k = 0 .. T - 1)
    ff = np.concatenate([np.zeros((B, 1, D + 1, D + 1)), np.cumsum(f[:, :-1, :, None] * f[:, :-1, None, :], 1)], 1)
    fx = np.concatenate([np.zeros((B, 1, D + 1, D)), np.cumsum(f[:, :-1, :, None] * x[:, 1:, None, :], 1)], 1)
    b = np.arange(B)[:, None]
    gram = ff[b, hi] - ff[b, lo] + 1e-3 * np.eye(D + 1)
    cross = fx[b, hi] - fx[b, lo]
    return np.linalg.solve(gram, cross).reshape(B, T, -1)


def random_sticky_paths(rng, B: int, T: int, K: int, stay: float = 0.95) -> np.ndarray:
    """(B, T, K) one-hot regime paths from a sticky chain: random segments to break the symmetry."""
    z = np.zeros((B, T), dtype=int)
    z[:, 0] = rng.integers(K, size=B)
    for t in range(1, T):
        switch = rng.random(B) > stay
        z[:, t] = np.where(switch, rng.integers(K, size=B), z[:, t - 1])
    return np.eye(K)[z]


__all__ = ["SLDS", "least_squares_latents", "em_initial_params", "local_dynamics_paths", "random_sticky_paths"]
