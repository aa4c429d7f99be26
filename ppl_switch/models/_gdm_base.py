"""What the two Gumbel Dynamical Models share: :class:`~ppl_switch.models.gdm.GDM` (2-level) and
:class:`~ppl_switch.models.gdm_mixture.GDMMixture` (3-level).

Both have relaxed states z on the simplex with a sticky transition
pi_t = (1 - gamma) drive(t - 1) + gamma z_{t-1}, a Gaussian (diagonal) or Poisson (rate softplus(mean))
emission, and parameters that are sample sites under weak Normal priors. They differ in what drives
the transition (observations y_{t-1} vs latents x_{t-1}) and in what the emission mean is. This base
class holds the common scaffolding; a subclass supplies:

* :meth:`site_shapes` and :meth:`_param_dims` (the parameter sites, with :meth:`_gamma_and_noise_shapes`
  and the base's dims for the sites they share), ``path_dims`` (the path sites);
* ``transition_base_logits`` (the z-free transition logits, through :meth:`_prepend_initial_logits`);
* :meth:`_sample_paths` (the path sites of the program) and :meth:`_states` /
  :meth:`_observation_mean` (a draw's soft states and emission mean);
* ``_config_keys`` (the constructor arguments, in the order :meth:`config` lists them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.distributions.relaxed import RelaxedMarkovChain
from ppl_switch.models._common import permute_by_dims
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_poisson_log_prob
from ppl_switch.models.base import Model

EMISSIONS = ("gaussian", "poisson")

#: parameter sites on the log-variance scale: their priors are centred at -2 instead of 0
LOG_VARIANCE_SITES = ("log_obs_var", "log_latent_var")


class GDMBase(Model):
    """Shared scaffolding of the GDM family (see the module docstring for the hooks a subclass fills in).

    Attributes set by :meth:`__init__`: num_states, latent_dim, obs_dim, emission, sticky, temperature,
    prior_scale.
    """

    #: constructor arguments recorded by :meth:`config`, in order
    _config_keys: ClassVar[tuple[str, ...]] = ()
    #: named dims of the path sites (they follow the parameter sites in :meth:`site_dims`)
    path_dims: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: gamma = sigmoid(stickiness) instead of the unconstrained stickiness (a GDM option)
    constrain_gamma: bool = False

    def __init__(self, num_states: int, latent_dim: int, obs_dim: Optional[int], emission: str, sticky: bool,
                 temperature: float, prior_scale: float):
        self.num_states = check_positive_int(num_states, "num_states")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = None if obs_dim is None else check_positive_int(obs_dim, "obs_dim")
        if emission not in EMISSIONS:
            raise ValueError(f"emission: expected one of {EMISSIONS}, got {emission!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if not float(prior_scale) > 0:
            raise ValueError(f"prior_scale: expected a positive number, got {prior_scale!r}")
        self.emission = emission
        self.sticky = bool(sticky)
        self.temperature = float(temperature)
        self.prior_scale = float(prior_scale)

    def config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._config_keys}

    # ----- sites --------------------------------------------------------------------------------
    def site_shapes(self, obs_dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter sites of this configuration."""
        raise NotImplementedError

    def _gamma_and_noise_shapes(self, obs_dim: int) -> dict[str, tuple[int, ...]]:
        """The sites every GDM has when so configured: ``stickiness`` (sticky) and ``log_obs_var`` (Gaussian)."""
        shapes = {}
        if self.sticky:
            shapes["stickiness"] = ()
        if self.emission == "gaussian":
            shapes["log_obs_var"] = (obs_dim,)
        return shapes

    def _param_dims(self) -> dict[str, tuple[str, ...]]:
        """Named dims of every parameter site any configuration may have; a subclass adds its own."""
        return {
            "init_logits": ("state",),
            "transition_weights": ("state", "latent"),
            "transition_bias": ("state",),
            "stickiness": (),
            "log_obs_var": ("obs",),
        }

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = self._param_dims()
        return {**{name: dims[name] for name in self.site_shapes(self.obs_dim or 1)}, **self.path_dims}

    def _prior_loc_scale(self, name: str) -> tuple[float, float]:
        """(loc, scale) of the Normal prior of parameter site ``name``."""
        if name == "stickiness":
            return 0.0, 1.0
        if name in LOG_VARIANCE_SITES:
            return -2.0, self.prior_scale
        return 0.0, self.prior_scale

    def _prior_words(self, name: str) -> str:
        loc, scale = self._prior_loc_scale(name)
        return f"Normal({loc:g}, {scale:g})"

    def _prior(self, name: str, shape):
        loc, scale = self._prior_loc_scale(name)
        return dist.Normal(loc, scale).expand(shape).to_event(len(shape))

    def site_priors(self) -> dict[str, str]:
        """The priors of the parameter sites, in words (also used by the model card)."""
        return {name: self._prior_words(name) for name in self.site_shapes(self.obs_dim or 1)}

    # ----- transition ---------------------------------------------------------------------------
    def gamma(self, params):
        """The stickiness weight gamma of z_{t-1} in the logits (0 without a sticky transition)."""
        if not self.sticky:
            return 0.0
        return jax.nn.sigmoid(params["stickiness"]) if self.constrain_gamma else params["stickiness"]

    def _prepend_initial_logits(self, params, drive):
        """(..., T, K) the part of the transition logits that does not depend on z: pi_1 at t = 1 and
        (1 - gamma) ``drive`` at t >= 2, where ``drive`` (..., T - 1, K) is f(y or x at t - 1)."""
        drive = (1.0 - self.gamma(params)) * drive
        init = jnp.broadcast_to(params["init_logits"], drive.shape[:-2] + (1, self.num_states))
        return jnp.concatenate([init, drive], axis=-2)

    def _relaxed_chain(self, params, base_logits, time_mask, temperature=None) -> RelaxedMarkovChain:
        """The relaxed state chain given :meth:`transition_base_logits` at temperature ``temperature``
        (None: the model's)."""
        tau = self.temperature if temperature is None else temperature
        coupling = self.gamma(params) if self.sticky else None
        return RelaxedMarkovChain(tau, base_logits, coupling, time_mask)

    # ----- emission -----------------------------------------------------------------------------
    def _observation_dist(self, params, mean) -> dist.Distribution:
        """Elementwise p(y | mean): Normal(mean, sigma) or Poisson(softplus(mean))."""
        if self.emission == "gaussian":
            return dist.Normal(mean, jnp.exp(0.5 * params["log_obs_var"]))
        return dist.Poisson(jax.nn.softplus(mean))

    def _observation_log_prob(self, params, mean, data: SequenceData):
        """(..., trials, time) log p(y_t | mean_t), 0 at unobserved entries."""
        if self.emission == "gaussian":
            return masked_diag_normal_log_prob(data.y, data.mask, mean, jnp.exp(0.5 * params["log_obs_var"]))
        return masked_poisson_log_prob(data.y, data.mask, jax.nn.softplus(mean))

    def _draw_observations(self, key, params, mean):
        """One draw of y given its emission mean (any shape ending in N)."""
        if self.emission == "gaussian":
            return mean + jnp.exp(0.5 * params["log_obs_var"]) * jax.random.normal(key, mean.shape, mean.dtype)
        return jax.random.poisson(key, jax.nn.softplus(mean)).astype(mean.dtype)

    # ----- the program --------------------------------------------------------------------------
    def _sample_paths(self, params, data: SequenceData, temperature):
        """Declare the path sites (inside the trial plate); return the (trials, time, N) emission mean."""
        raise NotImplementedError

    def program(self, data: SequenceData, *, temperature=None, record_log_lik: bool = False) -> None:
        params = {name: numpyro.sample(name, self._prior(name, shape)) for name, shape in self.site_shapes(data.obs_dim).items()}
        with numpyro.plate("trial", data.num_trials):
            mean = self._sample_paths(params, data, temperature)
            numpyro.sample("y", self._observation_dist(params, mean).mask(data.mask).to_event(2), obs=data.y)
        if record_log_lik:
            numpyro.deterministic("log_lik", self._observation_log_prob(params, mean, data))

    # ----- per-draw quantities ------------------------------------------------------------------
    def _states(self, params, data: SequenceData):
        """(trials, time, K) the draw's soft states (its ``z``, or a noise-free stand-in)."""
        raise NotImplementedError

    def _observation_mean(self, params, data: SequenceData):
        """(trials, time, N) the draw's emission mean (pre-softplus rate for Poisson)."""
        raise NotImplementedError

    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, time) log p(y_t | ...), 0 where unobserved, conditional on the draw's paths.

        The GDMs' marginal over the paths has no closed form. Draws from a guide or NUTS carry them
        (``params["z"]``, and ``params["x"]`` for the mixture); a draw without them uses the model's
        noise-free stand-in.
        """
        return self._observation_log_prob(params, self._observation_mean(params, data), data)

    def state_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        """The draw's soft states (or the noise-free stand-in) and their argmax."""
        z = self._states(params, data)
        return {"state_probs": z, "viterbi": jnp.argmax(z, -1)}

    def sample_states(self, key, params, data: SequenceData) -> jax.Array:
        return self.state_posterior(params, data)["viterbi"]

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """One replicate of y given the draw's paths."""
        return self._draw_observations(key, params, self._observation_mean(params, data))

    # ----- simulation ---------------------------------------------------------------------------
    def init_params(self, rng: np.random.Generator, obs_dim: int) -> dict[str, np.ndarray]:
        """Initial parameter values drawn from ``rng`` for ``obs_dim`` observations."""
        raise NotImplementedError

    def default_params(self, key) -> dict[str, Any]:
        """:meth:`init_params` seeded by ``key`` (an int or a JAX key)."""
        if self.obs_dim is None:
            raise ValueError(f"obs_dim: {type(self).__name__} was built with obs_dim=None; pass obs_dim to build default parameters")
        seed = key if isinstance(key, (int, np.integer)) else np.asarray(jax.random.key_data(key)).ravel().tolist()
        return self.init_params(np.random.default_rng(seed), self.obs_dim)

    # ----- labels -------------------------------------------------------------------------------
    def state_features(self, params) -> np.ndarray:
        return np.concatenate([np.asarray(params["offsets"]), np.asarray(params["dynamics"]).reshape(self.num_states, -1)], -1)

    def permute_states(self, params, perm) -> dict[str, Any]:
        """Relabel every state axis (exact: the stickiness term is permutation-free)."""
        return permute_by_dims(params, perm, self.site_dims())
