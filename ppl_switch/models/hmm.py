"""Hidden Markov model with Gaussian, diagonal-Gaussian or Poisson emissions.

Generative program (trial n, step t = 0..T-1, K states, D observed dims)::

    pi        ~ Dirichlet(1_K)                                   initial_probs       (K,)
    P_k       ~ Dirichlet(1_K + sticky e_k)                      transition_matrix   (K, K), rows
    gaussian:      mu_k ~ N(0, 5^2 I),  s_k ~ HalfNormal(2),  Omega_k ~ LKJCholesky(2)
                   Sigma_k = diag(s_k) Omega_k Omega_k' diag(s_k)
    diag_gaussian: mu_k ~ N(0, 5^2 I),  s_k ~ HalfNormal(2),  Sigma_k = diag(s_k^2)
    poisson:       lambda_k ~ Gamma(2, 0.2) elementwise (mean 10)
    z_0 ~ Cat(pi),  z_t | z_{t-1} ~ Cat(P_{z_{t-1}})
    y_t | z_t = k ~ N(mu_k, Sigma_k)   or   Poisson(lambda_k)

The state path is summed out exactly with the forward algorithm (``ppl_switch.ops.hmm``), so NUTS
and SVI see only the continuous parameters; states are decoded afterwards (smoother, Viterbi, FFBS).
Missing entries: a step with no observed entry contributes nothing (the chain just propagates); in a
partly observed step, Gaussian emissions use the marginal over the observed coordinates and
diagonal/Poisson emissions sum the observed entries.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.initialization import init_to_sample

from ppl_switch.compile_cache import labelled_model_key
from ppl_switch.data import DataError, SequenceData, as_sequence_data, check_positive_int
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.models._common import (
    check_nonneg_float,
    check_optional_dim,
    permute_by_dims,
    require_obs_dim,
)
from ppl_switch.models._emissions import state_log_likelihoods
from ppl_switch.models.base import Model
from ppl_switch.ops.hmm import hmm_filter, hmm_sample, hmm_smoother, hmm_viterbi, stationary_distribution

EMISSIONS = ("gaussian", "diag_gaussian", "poisson")
INITIAL_MODES = ("learned", "stationary")

# Prior hyperparameters (stated in the module docstring and the model card).
MEAN_PRIOR_SCALE = 5.0
SCALE_PRIOR_SCALE = 2.0
LKJ_CONCENTRATION = 2.0
RATE_PRIOR_SHAPE, RATE_PRIOR_RATE = 2.0, 0.2


def sample_markov_chain(key, initial_probs, transition_matrix, num_timesteps: int) -> jax.Array:
    """(T,) int32 path of a Markov chain with (K,) initial probabilities and a (K, K) transition matrix."""
    key0, key_rest = jax.random.split(key)
    z0 = jax.random.categorical(key0, jnp.log(initial_probs))

    def step(z_prev, k):
        z = jax.random.categorical(k, jnp.log(transition_matrix[z_prev]))
        return z, z

    _, rest = jax.lax.scan(step, z0, jax.random.split(key_rest, num_timesteps - 1))
    return jnp.concatenate([z0[None], rest]).astype(jnp.int32)


def check_initial(initial, num_states: int):
    """Validate the ``initial`` option: "learned", "stationary" or a fixed (K,) probability vector.

    Returns the string, or the fixed vector as a float numpy array.
    """
    if isinstance(initial, str):
        if initial not in INITIAL_MODES:
            raise ValueError(f"initial: expected one of {INITIAL_MODES} or a ({num_states},) probability vector, got {initial!r}")
        return initial
    probs = np.asarray(initial, dtype=float)
    if probs.shape != (num_states,) or not np.all(np.isfinite(probs)) or np.any(probs < 0) or abs(probs.sum() - 1) > 1e-6:
        raise ValueError(
            f"initial: a fixed initial distribution must be a ({num_states},) non-negative vector summing to 1, "
            f"got {np.array2string(probs, precision=4)}"
        )
    return probs


def per_step_log_likelihood(initial_probs, transition_matrix, log_likelihoods, step_mask) -> jax.Array:
    """(T,) log p(y_t | y_{<t}) for one trial; sums to the marginal log-likelihood, 0 where unobserved.

    From the filter's one-step predictions: log sum_k p(z_t = k | y_{<t}) p(y_t | z_t = k).
    """
    ll = jnp.where(step_mask[:, None], log_likelihoods, 0.0)
    predicted = hmm_filter(initial_probs, transition_matrix, ll, step_mask).predicted_probs
    return jnp.where(step_mask, jax.nn.logsumexp(ll, axis=-1, b=predicted), 0.0)


class StateChainModel(Model):
    """Shared parts of the models with a discrete Markov chain and per-step emission log-likelihoods.

    Subclasses implement :meth:`emission_log_likelihoods` ((trials, T, K)) and :meth:`step_mask`.
    """

    sticky: float = 0.0
    #: p(z_0): "learned" (a Dirichlet(1) site), "stationary" (the stationary distribution of the
    #: transition matrix, as in statsmodels' Markov switching models) or a fixed (K,) vector
    initial: Any = "learned"

    def initial_config(self):
        """``initial`` as JSON (a list when fixed)."""
        return self.initial if isinstance(self.initial, str) else [float(v) for v in self.initial]

    @property
    def learns_initial(self) -> bool:
        return isinstance(self.initial, str) and self.initial == "learned"

    # ----- the chain prior ----------------------------------------------------------------------
    def sample_chain_params(self) -> tuple[jax.Array, jax.Array]:
        K = self.num_states
        if self.learns_initial:
            initial_probs = numpyro.sample("initial_probs", dist.Dirichlet(jnp.ones(K)))
        concentration = jnp.ones((K, K)) + self.sticky * jnp.eye(K)
        transition_matrix = numpyro.sample("transition_matrix", dist.Dirichlet(concentration).to_event(1))
        if not self.learns_initial:  # a function of P, or a constant: recorded, not sampled
            initial_probs = numpyro.deterministic("initial_probs", self.initial_probs_of(transition_matrix))
        return initial_probs, transition_matrix

    def initial_probs_of(self, transition_matrix) -> jax.Array:
        """p(z_0) implied by ``initial`` when it is not learned: (K,) (batched over leading axes of P)."""
        P = jnp.asarray(transition_matrix)
        if self.learns_initial:
            raise ValueError("initial_probs_of: initial='learned' has no implied initial distribution")
        if isinstance(self.initial, str):  # "stationary"
            return stationary_distribution(P)
        return jnp.broadcast_to(jnp.asarray(self.initial, P.dtype), P.shape[:-1])

    def chain_params(self, params) -> tuple[jax.Array, jax.Array]:
        """(initial_probs, transition_matrix) of one draw; initial_probs derived when not learned."""
        P = jnp.asarray(params["transition_matrix"])
        if self.learns_initial:
            return jnp.asarray(params["initial_probs"]), P
        return self.initial_probs_of(P), P

    def step_mask(self, data: SequenceData) -> jax.Array:
        """(trials, T) bool: steps whose emission log-likelihood enters the chain."""
        return jnp.asarray(data.mask).any(-1)

    def emission_log_likelihoods(self, params, data: SequenceData) -> jax.Array:
        raise NotImplementedError

    def observe_chain(self, params, data: SequenceData, record_log_lik: bool) -> None:
        """Add log p(y_n) of every trial, the state path summed out by the forward filter."""
        ll = self.emission_log_likelihoods(params, data)
        mask = self.step_mask(data)
        pi, P = self.chain_params(params)
        log_marginal = jax.vmap(lambda l, m: hmm_filter(pi, P, l, m).log_normalizer)(ll, mask)
        with numpyro.plate("trial", data.num_trials):
            numpyro.factor("y", log_marginal)
        if record_log_lik:
            numpyro.deterministic("log_lik", self._per_step(params, ll, mask))

    # ----- quantities from one draw -------------------------------------------------------------
    def _per_step(self, params, ll, mask):
        fn = jax.vmap(per_step_log_likelihood, in_axes=(None, None, 0, 0))
        return fn(*self.chain_params(params), ll, mask)

    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        return self._per_step(params, self.emission_log_likelihoods(params, data), self.step_mask(data))

    def state_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        ll, mask = self.emission_log_likelihoods(params, data), self.step_mask(data)
        pi, P = self.chain_params(params)
        probs = jax.vmap(lambda l, m: hmm_smoother(pi, P, l, m).smoothed_probs)(ll, mask)
        viterbi = jax.vmap(lambda l, m: hmm_viterbi(pi, P, l, m))(ll, mask)
        return {"state_probs": probs, "viterbi": viterbi}

    def sample_states(self, key, params, data: SequenceData) -> jax.Array:
        ll, mask = self.emission_log_likelihoods(params, data), self.step_mask(data)
        pi, P = self.chain_params(params)
        keys = jax.random.split(key, data.num_trials)
        return jax.vmap(lambda k, l, m: hmm_sample(k, pi, P, l, m))(keys, ll, mask)

    def permute_states(self, params, perm) -> dict[str, Any]:
        return permute_by_dims(params, perm, self.site_dims())

    def default_guide(self):
        """A mean-field normal in the unconstrained space over all parameters (AutoNormal's family, set up
        by one compiled program: :class:`~ppl_switch.guides.mean_field.MeanFieldNormal`), started from a
        prior draw: starting all states at the prior median would make them identical, and a symmetric
        start never separates under gradient steps."""
        return MeanFieldNormal(self.program, init_loc_fn=init_to_sample, init_scale=0.1,
                               cache_key=labelled_model_key("init_to_sample", self))


class HMM(StateChainModel):
    """Hidden Markov model with i.i.d. emissions given the state.

    Args:
        num_states: K >= 1.
        obs_dim: D, or None to take it from the data (then pass it to simulate).
        emission: "gaussian" (full covariance), "diag_gaussian" or "poisson".
        sticky: extra Dirichlet concentration on self-transitions (>= 0; 0 = uniform Dirichlet(1) rows).
        initial: p(z_0): "learned" (Dirichlet(1) prior), "stationary" (the stationary distribution of
            the transition matrix) or a fixed (K,) probability vector.
    """

    name = "hmm"
    example_config = dict(num_states=2, obs_dim=2)
    recommended_runner = ("em", {})

    def __init__(
        self, num_states: int, obs_dim: Optional[int] = None, emission: str = "gaussian", sticky: float = 0.0, initial="learned"
    ):
        self.num_states = check_positive_int(num_states, "num_states")
        self.initial = check_initial(initial, self.num_states)
        self.obs_dim = check_optional_dim(obs_dim, "obs_dim")
        if emission not in EMISSIONS:
            raise ValueError(f"emission: expected one of {EMISSIONS}, got {emission!r}")
        self.emission = emission
        self.sticky = check_nonneg_float(sticky, "sticky")
        self.input_dim = 0

    def config(self) -> dict[str, Any]:
        return {
            "num_states": self.num_states,
            "obs_dim": self.obs_dim,
            "emission": self.emission,
            "sticky": self.sticky,
            "initial": self.initial_config(),
        }

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {"initial_probs": ("state",), "transition_matrix": ("state", "state_to")}
        if self.emission == "poisson":
            dims["rates"] = ("state", "obs")
        else:
            dims["means"] = ("state", "obs")
            dims["scales"] = ("state", "obs")
        if self.emission == "gaussian":
            dims["corr_cholesky"] = ("state", "obs", "obs_to")
            dims["scale_tril"] = ("state", "obs", "obs_to")
        return dims

    # ----- program ------------------------------------------------------------------------------
    def sample_emission_params(self, obs_dim: int) -> dict[str, jax.Array]:
        K, D = self.num_states, obs_dim
        if self.emission == "poisson":
            rates = numpyro.sample("rates", dist.Gamma(RATE_PRIOR_SHAPE, RATE_PRIOR_RATE).expand([K, D]).to_event(2))
            return {"rates": rates}
        means = numpyro.sample("means", dist.Normal(0.0, MEAN_PRIOR_SCALE).expand([K, D]).to_event(2))
        scales = numpyro.sample("scales", dist.HalfNormal(SCALE_PRIOR_SCALE).expand([K, D]).to_event(2))
        out = {"means": means, "scales": scales}
        if self.emission == "gaussian":
            if D > 1:
                corr = numpyro.sample("corr_cholesky", dist.LKJCholesky(D, LKJ_CONCENTRATION).expand([K]).to_event(1))
            else:  # LKJ needs D >= 2; a 1-D correlation factor is 1
                corr = jnp.ones((K, 1, 1))
            out["corr_cholesky"] = corr
            out["scale_tril"] = numpyro.deterministic("scale_tril", scales[..., :, None] * corr)
        return out

    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        initial_probs, transition_matrix = self.sample_chain_params()
        params = {"initial_probs": initial_probs, "transition_matrix": transition_matrix}
        params.update(self.sample_emission_params(data.obs_dim))
        self.observe_chain(params, data, record_log_lik)

    def emission_log_likelihoods(self, params, data: SequenceData) -> jax.Array:
        return state_log_likelihoods(self.emission, jnp.asarray(data.y), jnp.asarray(data.mask), self._emission_params(params))

    def _emission_params(self, params) -> dict[str, jax.Array]:
        if self.emission != "gaussian":
            return params
        scales = jnp.asarray(params["scales"])
        corr = params.get("corr_cholesky")
        corr = jnp.ones(scales.shape + (1,)) if corr is None else jnp.asarray(corr)
        return {"means": params["means"], "scale_tril": scales[..., :, None] * corr}

    # ----- replicates and simulation ------------------------------------------------------------
    def _emit(self, key, params, states) -> jax.Array:
        """(trials, T, D) emissions for a (trials, T) state path."""
        p = self._emission_params(params)
        if self.emission == "poisson":
            return jax.random.poisson(key, jnp.asarray(p["rates"])[states]).astype(jnp.result_type(float))
        means = jnp.asarray(p["means"])[states]
        noise = jax.random.normal(key, means.shape, means.dtype)
        if self.emission == "diag_gaussian":
            return means + jnp.asarray(p["scales"])[states] * noise
        return means + (jnp.asarray(p["scale_tril"])[states] @ noise[..., None])[..., 0]

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        key_z, key_y = jax.random.split(key)
        states = self.sample_states(key_z, params, data)
        return self._emit(key_y, params, states)

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        if inputs is not None:
            raise DataError("inputs: the HMM takes no inputs (input_dim=0)")
        key_params, key_z, key_y = jax.random.split(key, 3)
        params = self.default_params(key_params) if params is None else dict(params)

        @jax.jit  # one compilation instead of op-by-op dispatch
        def draw(key_z, key_y, params):
            keys = jax.random.split(key_z, num_trials)
            chain = lambda k: sample_markov_chain(k, *self.chain_params(params), num_timesteps)  # noqa: E731
            states = jax.vmap(chain)(keys)
            return states, self._emit(key_y, params, states)

        states, y = draw(key_z, key_y, {k: jnp.asarray(v) for k, v in params.items()})
        data = as_sequence_data(np.asarray(y), obs_dim=y.shape[-1], input_dim=0, counts=self.emission == "poisson")
        return data, {"params": params, "states": np.asarray(states)}

    def default_params(self, key) -> dict[str, Any]:
        """Sticky chain (0.9 self-transition), means on a circle of radius 3 (first two dims), noise
        scale 0.6 with correlation +-0.3^|i-j|; Poisson rates log-normal around 5 (drawn with ``key``)."""
        K, D = self.num_states, require_obs_dim(self)
        stay = 0.9 if K > 1 else 1.0
        P = np.full((K, K), (1 - stay) / max(K - 1, 1)) + (stay - (1 - stay) / max(K - 1, 1)) * np.eye(K)
        params: dict[str, Any] = {"initial_probs": jnp.full(K, 1.0 / K), "transition_matrix": jnp.asarray(P)}
        if self.emission == "poisson":
            params["rates"] = jnp.exp(jnp.log(5.0) + 0.8 * jax.random.normal(key, (K, D)))
            return params
        angles = 2 * np.pi * np.arange(K) / K
        means = np.zeros((K, D))
        if D == 1:
            means[:, 0] = np.linspace(-3.0, 3.0, K) if K > 1 else 0.0
        else:
            means[:, 0], means[:, 1] = 3 * np.cos(angles), 3 * np.sin(angles)
        params["means"] = jnp.asarray(means)
        params["scales"] = jnp.full((K, D), 0.6)
        if self.emission == "gaussian":
            # correlation 0.3^|i-j| between coordinates (alternating sign across states)
            lag = np.abs(np.arange(D)[:, None] - np.arange(D)[None, :])
            corr = [np.linalg.cholesky((0.3 * (-1) ** k) ** lag) for k in range(K)]
            params["corr_cholesky"] = jnp.asarray(np.stack(corr))
            params["scale_tril"] = params["scales"][..., :, None] * params["corr_cholesky"]
        return params

    def state_features(self, params) -> np.ndarray:
        if self.emission == "poisson":
            return np.log(np.asarray(params["rates"]))
        return np.asarray(params["means"])
