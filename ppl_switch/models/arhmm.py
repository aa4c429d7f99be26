"""Autoregressive hidden Markov model: each state has its own vector autoregression.

Generative program (trial n, step t = 0..T-1, K states, D observed dims, L lags, U inputs)::

    pi ~ Dirichlet(1_K),  P_k ~ Dirichlet(1_K + sticky e_k)          initial_probs, transition_matrix
    A_{k,l} ~ N(0, 1) elementwise  (K, L, D, D)                       ar_weights
    b_k ~ N(0, 3^2 I)  (K, D)                                         biases
    V_k ~ N(0, 1) elementwise  (K, D, U)                              input_weights (only if U > 0)
    s_k ~ HalfNormal(2), Omega_k ~ LKJCholesky(2)                     scales, corr_cholesky
    Sigma_k = diag(s_k) Omega_k Omega_k' diag(s_k)                    (scale_tril = diag(s_k) Omega_k)
    m0 ~ N(0, 5^2 I),  s0 ~ HalfNormal(5)  (D,)                       initial_mean, initial_scales
    z_0 ~ Cat(pi),  z_t | z_{t-1} ~ Cat(P_{z_{t-1}})
    t <  L:  y_t ~ N(m0, diag(s0^2))                                  (the same for every state)
    t >= L:  y_t | z_t = k ~ N(sum_l A_{k,l} y_{t-1-l} + b_k + V_k u_t, Sigma_k)

The state path is summed out with the forward algorithm, as in the HMM.

Missing data. A step whose *predictors* y_{t-1}, ..., y_{t-L} are not all fully observed is treated
as unobserved: it contributes 0 to the log-likelihood and the chain only propagates through it (the
predictors are not imputed). The log-likelihood is then that of the observed steps conditional on
observed predictors -- a documented approximation that keeps the marginal exact and cheap. A step
with observed predictors but some missing entries of y_t uses the Gaussian marginal over its observed
coordinates.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import DataError, SequenceData, as_sequence_data, check_positive_int
from ppl_switch.models._common import check_nonneg_float, check_nonneg_int, check_optional_dim, require_obs_dim
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_mvn_log_prob
from ppl_switch.models.hmm import LKJ_CONCENTRATION, SCALE_PRIOR_SCALE, StateChainModel, check_initial, sample_markov_chain

AR_WEIGHT_PRIOR_SCALE = 1.0
BIAS_PRIOR_SCALE = 3.0
INPUT_WEIGHT_PRIOR_SCALE = 1.0
INITIAL_MEAN_PRIOR_SCALE = 5.0
INITIAL_SCALE_PRIOR_SCALE = 5.0


def lagged(x, lags: int, fill=0.0):
    """(..., T, D) -> (..., L, T, D) with ``[..., l, t] = x[..., t-1-l]`` and ``fill`` before the start."""
    T = x.shape[-2]
    out = []
    for l in range(lags):
        shift = min(l + 1, T)
        pad = jnp.full(x.shape[:-2] + (shift,) + x.shape[-1:], fill, dtype=x.dtype)
        out.append(jnp.concatenate([pad, x[..., : T - shift, :]], axis=-2))
    return jnp.stack(out, axis=-3)


class ARHMM(StateChainModel):
    """Autoregressive HMM (Gaussian vector autoregression per state).

    Args:
        num_states: K >= 1.
        obs_dim: D, or None to take it from the data.
        lags: L >= 1, the autoregressive order.
        input_dim: U >= 0, dimension of known inputs u_t entering as V_k u_t.
        sticky: extra Dirichlet concentration on self-transitions (>= 0).
        initial: p(z_0): "learned" (Dirichlet(1) prior), "stationary" (the stationary distribution of
            the transition matrix; then z_L, the first regressed step, is stationary too, as in
            statsmodels' Markov switching regressions) or a fixed (K,) probability vector.
    """

    name = "arhmm"
    example_config = dict(num_states=2, obs_dim=2, input_dim=1)
    recommended_runner = ("em", {})
    fixed_point_kind = "affine"  # y*_k of each regime's AR recursion, via its companion form

    def __init__(
        self,
        num_states: int,
        obs_dim: Optional[int] = None,
        lags: int = 1,
        input_dim: int = 0,
        sticky: float = 0.0,
        initial="learned",
    ):
        self.num_states = check_positive_int(num_states, "num_states")
        self.initial = check_initial(initial, self.num_states)
        self.obs_dim = check_optional_dim(obs_dim, "obs_dim")
        self.lags = check_positive_int(lags, "lags")
        self.input_dim = check_nonneg_int(input_dim, "input_dim")
        self.sticky = check_nonneg_float(sticky, "sticky")
        self.emission = "gaussian"

    def config(self) -> dict[str, Any]:
        return {
            "num_states": self.num_states,
            "obs_dim": self.obs_dim,
            "lags": self.lags,
            "input_dim": self.input_dim,
            "sticky": self.sticky,
            "initial": self.initial_config(),
        }

    def affine_dynamics(self, samples, obs_dim: int):
        """Each regime's AR(L) recursion as a first-order one on (y_t, ..., y_{t-L+1}), per draw: its fixed
        point repeats y*_k L times (the first ``obs_dim`` coordinates are kept) and its eigenvalues decide the
        stability of the AR process. See :meth:`Model.affine_dynamics`."""
        W, bias = np.asarray(samples["ar_weights"], float), np.asarray(samples["biases"], float)  # (..., K, L, D, D), (..., K, D)
        L, D = W.shape[-3], W.shape[-1]
        top = np.concatenate([W[..., lag, :, :] for lag in range(L)], -1)  # (..., K, D, L*D)
        shift = np.broadcast_to(np.eye((L - 1) * D, L * D), top.shape[:-2] + ((L - 1) * D, L * D))
        companion = np.concatenate([top, shift], -2)
        padded = np.concatenate([bias, np.zeros(bias.shape[:-1] + ((L - 1) * D,))], -1)
        return companion, padded, ("chain", "draw", "state"), "obs", D

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "initial_probs": ("state",),
            "transition_matrix": ("state", "state_to"),
            "ar_weights": ("state", "lag", "obs", "obs_prev"),
            "biases": ("state", "obs"),
            "scales": ("state", "obs"),
            "corr_cholesky": ("state", "obs", "obs_to"),
            "scale_tril": ("state", "obs", "obs_to"),
            "initial_mean": ("obs",),
            "initial_scales": ("obs",),
        }
        if self.input_dim:
            dims["input_weights"] = ("state", "obs", "input")
        return dims

    # ----- program ------------------------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        K, D, L, U = self.num_states, data.obs_dim, self.lags, self.input_dim
        initial_probs, transition_matrix = self.sample_chain_params()
        normal = lambda scale, shape: dist.Normal(0.0, scale).expand(shape).to_event(len(shape))  # noqa: E731
        params = {
            "initial_probs": initial_probs,
            "transition_matrix": transition_matrix,
            "ar_weights": numpyro.sample("ar_weights", normal(AR_WEIGHT_PRIOR_SCALE, [K, L, D, D])),
            "biases": numpyro.sample("biases", normal(BIAS_PRIOR_SCALE, [K, D])),
            "scales": numpyro.sample("scales", dist.HalfNormal(SCALE_PRIOR_SCALE).expand([K, D]).to_event(2)),
        }
        if D > 1:
            params["corr_cholesky"] = numpyro.sample(
                "corr_cholesky", dist.LKJCholesky(D, LKJ_CONCENTRATION).expand([K]).to_event(1)
            )
        else:  # LKJ needs D >= 2
            params["corr_cholesky"] = jnp.ones((K, 1, 1))
        numpyro.deterministic("scale_tril", params["scales"][..., :, None] * params["corr_cholesky"])
        if U:
            params["input_weights"] = numpyro.sample("input_weights", normal(INPUT_WEIGHT_PRIOR_SCALE, [K, D, U]))
        params["initial_mean"] = numpyro.sample("initial_mean", normal(INITIAL_MEAN_PRIOR_SCALE, [D]))
        params["initial_scales"] = numpyro.sample(
            "initial_scales", dist.HalfNormal(INITIAL_SCALE_PRIOR_SCALE).expand([D]).to_event(1)
        )
        self.observe_chain(params, data, record_log_lik)

    # ----- emission log-likelihoods -------------------------------------------------------------
    def _scale_tril(self, params) -> jax.Array:
        scales = jnp.asarray(params["scales"])
        corr = params.get("corr_cholesky")
        corr = jnp.ones(scales.shape + (1,)) if corr is None else jnp.asarray(corr)
        return scales[..., :, None] * corr

    def _regression_means(self, params, y, inputs) -> jax.Array:
        """(trials, T, K, D) AR means from the lagged (zero-filled) observations."""
        ylag = lagged(y, self.lags)  # (trials, L, T, D)
        means = jnp.einsum("klde,nlte->ntkd", jnp.asarray(params["ar_weights"]), ylag)
        means = means + jnp.asarray(params["biases"])
        if self.input_dim:
            means = means + jnp.einsum("kdu,ntu->ntkd", jnp.asarray(params["input_weights"]), inputs)
        return means

    def predictors_observed(self, data: SequenceData) -> jax.Array:
        """(trials, T) bool: every lagged predictor entry observed (vacuously true for t < L)."""
        mask = jnp.asarray(data.mask)
        lag_ok = lagged(mask, self.lags, fill=True).all(axis=(-3, -1))
        return lag_ok

    def step_mask(self, data: SequenceData) -> jax.Array:
        return jnp.asarray(data.mask).any(-1) & self.predictors_observed(data)

    def emission_log_likelihoods(self, params, data: SequenceData) -> jax.Array:
        mask = jnp.asarray(data.mask)
        y = jnp.where(mask, jnp.asarray(data.y), 0.0)
        inputs = None if data.inputs is None else jnp.asarray(data.inputs)
        means = self._regression_means(params, y, inputs)
        ll_ar = masked_mvn_log_prob(y[..., None, :], mask[..., None, :], means, self._scale_tril(params), shared_over_steps=True)
        ll_init = masked_diag_normal_log_prob(y, mask, jnp.asarray(params["initial_mean"]), jnp.asarray(params["initial_scales"]))
        first = jnp.arange(y.shape[-2]) < self.lags
        ll = jnp.where(first[:, None], ll_init[..., None], ll_ar)
        return jnp.where(self.step_mask(data)[..., None], ll, 0.0)

    # ----- replicates and simulation ------------------------------------------------------------
    def _rollout(self, key, params, states, inputs) -> jax.Array:
        """(trials, T, D) observations generated forward in time along a (trials, T) state path."""
        N, T = states.shape
        D = jnp.asarray(params["biases"]).shape[-1]
        L = self.lags
        A = jnp.asarray(params["ar_weights"])
        b = jnp.asarray(params["biases"])
        V = jnp.asarray(params["input_weights"]) if self.input_dim else None
        tril = self._scale_tril(params)
        m0, s0 = jnp.asarray(params["initial_mean"]), jnp.asarray(params["initial_scales"])
        eps = jax.random.normal(key, (N, T, D), b.dtype)
        u = jnp.zeros((N, T, 0), b.dtype) if inputs is None else jnp.asarray(inputs, b.dtype)

        def one_trial(z, e, u_n):
            def step(history, xs):  # history: (L, D), most recent first
                t, z_t, e_t, u_t = xs
                mean = jnp.einsum("lde,le->d", A[z_t], history) + b[z_t]
                if V is not None:
                    mean = mean + V[z_t] @ u_t
                y_ar = mean + tril[z_t] @ e_t
                y_t = jnp.where(t < L, m0 + s0 * e_t, y_ar)
                return jnp.concatenate([y_t[None], history[:-1]]), y_t

            _, ys = jax.lax.scan(step, jnp.zeros((L, D), b.dtype), (jnp.arange(T), z, e, u_n))
            return ys

        return jax.vmap(one_trial)(states, eps, u)

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """One-step-ahead replicates: y_t drawn given the *observed* predictors and a posterior state
        path, so the replicate stays aligned with the data (a free-running rollout would drift)."""
        key_z, key_y = jax.random.split(key)
        states = self.sample_states(key_z, params, data)
        mask = jnp.asarray(data.mask)
        y = jnp.where(mask, jnp.asarray(data.y), 0.0)
        inputs = None if data.inputs is None else jnp.asarray(data.inputs)
        means = jnp.take_along_axis(self._regression_means(params, y, inputs), states[..., None, None], axis=-2)[..., 0, :]
        tril = self._scale_tril(params)[states]
        eps = jax.random.normal(key_y, y.shape, y.dtype)
        y_ar = means + (tril @ eps[..., None])[..., 0]
        y_init = jnp.asarray(params["initial_mean"]) + jnp.asarray(params["initial_scales"]) * eps
        first = (jnp.arange(y.shape[-2]) < self.lags)[:, None]
        return jnp.where(first, y_init, y_ar)

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        """Draw data. Without ``inputs`` and with input_dim > 0, inputs are standard-normal draws."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        key_params, key_z, key_y, key_u = jax.random.split(key, 4)
        params = self.default_params(key_params) if params is None else dict(params)
        if inputs is None and self.input_dim:
            inputs = jax.random.normal(key_u, (num_trials, num_timesteps, self.input_dim))
        if inputs is not None:
            inputs = np.asarray(inputs, dtype=float)
            if inputs.shape != (num_trials, num_timesteps, self.input_dim):
                raise DataError(
                    f"inputs: expected shape ({num_trials}, {num_timesteps}, {self.input_dim}), got {inputs.shape}"
                )

        @jax.jit  # one compilation instead of op-by-op dispatch
        def draw(key_z, key_y, params, inputs):
            keys = jax.random.split(key_z, num_trials)
            chain = lambda k: sample_markov_chain(k, *self.chain_params(params), num_timesteps)  # noqa: E731
            states = jax.vmap(chain)(keys)
            return states, self._rollout(key_y, params, states, inputs)

        states, y = draw(key_z, key_y, {k: jnp.asarray(v) for k, v in params.items()}, inputs)
        data = as_sequence_data(np.asarray(y), inputs=inputs, input_dim=self.input_dim, obs_dim=y.shape[-1])
        return data, {"params": params, "states": np.asarray(states)}

    def default_params(self, key) -> dict[str, Any]:
        """Sticky chain (0.95 self-transition); state k rotates (D >= 2) or decays (D = 1) around its
        own fixed point c_k on a circle of radius 2, via A_k = 0.9 R(theta_k), b_k = (I - A_k) c_k;
        noise scale 0.3; higher lags zero; input weights small random."""
        K, D, L = self.num_states, require_obs_dim(self), self.lags
        stay = 0.95 if K > 1 else 1.0
        off = (1 - stay) / max(K - 1, 1)
        P = np.full((K, K), off) + (stay - off) * np.eye(K)
        A = np.zeros((K, L, D, D))
        b = np.zeros((K, D))
        for k in range(K):
            theta = (-1) ** k * np.pi / 8 * (1 + k // 2)
            A1 = 0.9 * np.eye(D)
            if D >= 2:
                A1[:2, :2] = 0.9 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
            c = np.zeros(D)
            c[0] = 2 * np.cos(2 * np.pi * k / K) if K > 1 else 0.0
            if D >= 2:
                c[1] = 2 * np.sin(2 * np.pi * k / K) if K > 1 else 0.0
            A[k, 0] = A1
            b[k] = (np.eye(D) - A1) @ c
        params: dict[str, Any] = {
            "initial_probs": jnp.full(K, 1.0 / K),
            "transition_matrix": jnp.asarray(P),
            "ar_weights": jnp.asarray(A),
            "biases": jnp.asarray(b),
            "scales": jnp.full((K, D), 0.3),
            "corr_cholesky": jnp.broadcast_to(jnp.eye(D), (K, D, D)),
            "initial_mean": jnp.zeros(D),
            "initial_scales": jnp.ones(D),
        }
        params["scale_tril"] = params["scales"][..., :, None] * params["corr_cholesky"]
        if self.input_dim:
            params["input_weights"] = 0.5 * jax.random.normal(key, (K, D, self.input_dim))
        return params

    def state_features(self, params) -> np.ndarray:
        """Flattened lag-1 AR matrix and bias of each state, (K, D*D + D)."""
        A = np.asarray(params["ar_weights"])[:, 0]
        return np.concatenate([A.reshape(A.shape[0], -1), np.asarray(params["biases"])], axis=-1)
