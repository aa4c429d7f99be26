"""The 3-level mixture GDM (paper eq. 2.2 with latent noise, §2.2 last paragraph and App. C).

An explicit continuous latent path x_t (dimension D) sits between the relaxed states z_t and the
observations y_t::

    z_1 ~ GS(pi_1, tau)
    z_t ~ GS(pi_t, tau),   pi_t = (1 - gamma)(R x_{t-1} + r) + gamma z_{t-1}               t >= 2
    x_1 ~ N(sum_k z_1k mu_k, Q(z_1))
    x_t ~ N(sum_k z_tk (A_k x_{t-1} + c_k), Q(z_t))                                        t >= 2
    y_t ~ N(C x_t + d, diag(sigma^2))            (or Poisson(softplus(C x_t + d)))         t >= 1

Q(z_t) = diag(sum_k z_tk q_k) with per-state variances q_k when ``state_noise=True`` (the paper's
"state-dependent covariances": with a one-hot z_t this is an rSLDS with Q_{z_t}), else one shared
diag(q). With ``sticky=False`` gamma = 0 (the paper's f(z_{t-1}, x_{t-1}) = R x_{t-1} + r).

Where this departs from the paper, and why:

* Eq. 2.2 makes x deterministic given z (x_1 = z_1 . mu, no noise); the 3-level model the paper
  describes "more generally" adds Gaussian noise on x, which is what is built here (as q -> 0 it
  tends to eq. 2.2). The paper gives no covariance form; we use diagonal ones mixed linearly by z_t.
* The paper adds the emission offset d only in the SLDS background (App. A); we keep it.
* Covariances are diagonal (the paper writes Q_t, R_t without structure; the released code is
  diagonal throughout).
* Only the linear (optionally sticky) transition; no GRU transition and no control inputs.

As a NumPyro program: z_t depends on x_{t-1} and x_t on z_t, so neither site can be drawn first by
its own conditional. The program therefore declares ``x`` with a zero-density placeholder (a masked
N(0, I) that contributes nothing to the log joint), samples ``z`` from its exact conditional chain
p(z | x) (:class:`RelaxedMarkovChain` with x-driven logits) and adds log p(x | z) as the factor
``x_dynamics``. The log joint is exactly log p(params) + log p(z, x) + log p(y | x); only prior
*sampling* of x through the program is not ancestral (use :meth:`GDMMixture.simulate`). Padded steps
past a trial's length carry an N(0, I) density on x and no z term, so NUTS stays proper.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.distributions.relaxed import RelaxedMarkovChain, RelaxedOneHotCategorical
from ppl_switch.models._common import permute_by_dims
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_poisson_log_prob
from ppl_switch.models.base import Model

__all__ = ["GDMMixture"]

EMISSIONS = ("gaussian", "poisson")
_LOG_2PI = math.log(2.0 * math.pi)


class GDMMixture(Model):
    """The 3-level mixture Gumbel Dynamical Model (relaxed states z, latent path x, observations y).

    Args:
        num_states: K >= 1.
        latent_dim: D >= 1, dimension of x.
        obs_dim: N, or None to take it from the data (needed for simulation without data).
        emission: "gaussian" (diagonal covariance) or "poisson" (rate softplus(C x + d)).
        sticky: include the gamma z_{t-1} term in the transition logits (gamma unconstrained, as in the
            released 2-level code).
        state_noise: per-state latent variances q_k mixed by z_t; False = one shared diagonal Q.
        temperature: Gumbel-softmax temperature tau; a program argument overrides it.
        prior_scale: standard deviation of the Normal(0, .) priors on weights.

    Sites: parameters (see :meth:`site_shapes`), ``x`` (trials, time, D), ``z`` (trials, time, K).
    """

    name = "gdm_mixture"

    def __init__(
        self,
        num_states: int = 4,
        latent_dim: int = 2,
        obs_dim: Optional[int] = None,
        emission: str = "gaussian",
        sticky: bool = True,
        state_noise: bool = True,
        temperature: float = 0.99,
        prior_scale: float = 5.0,
    ):
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
        self.state_noise = bool(state_noise)
        self.temperature = float(temperature)
        self.prior_scale = float(prior_scale)

    def config(self) -> dict[str, Any]:
        return dict(
            num_states=self.num_states,
            latent_dim=self.latent_dim,
            obs_dim=self.obs_dim,
            emission=self.emission,
            sticky=self.sticky,
            state_noise=self.state_noise,
            temperature=self.temperature,
            prior_scale=self.prior_scale,
        )

    # ----- sites --------------------------------------------------------------------------------
    def site_shapes(self, obs_dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter sites (the paths are ``x`` (trials, time, D), ``z`` (trials, time, K))."""
        K, D, N = self.num_states, self.latent_dim, obs_dim
        shapes = {
            "init_logits": (K,),
            "init_mean": (K, D),
            "dynamics": (K, D, D),
            "offsets": (K, D),
            "log_latent_var": (K, D) if self.state_noise else (D,),
            "transition_weights": (K, D),
            "transition_bias": (K,),
            "emission_matrix": (N, D),
            "emission_bias": (N,),
        }
        if self.sticky:
            shapes["stickiness"] = ()
        if self.emission == "gaussian":
            shapes["log_obs_var"] = (N,)
        return shapes

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "init_logits": ("state",),
            "init_mean": ("state", "latent"),
            "dynamics": ("state", "latent", "latent_from"),
            "offsets": ("state", "latent"),
            "log_latent_var": ("state", "latent") if self.state_noise else ("latent",),
            "transition_weights": ("state", "latent"),
            "transition_bias": ("state",),
            "emission_matrix": ("obs", "latent"),
            "emission_bias": ("obs",),
            "stickiness": (),
            "log_obs_var": ("obs",),
            "x": ("trial", "time", "latent"),
            "z": ("trial", "time", "state"),
        }
        shapes = self.site_shapes(self.obs_dim or 1)
        return {k: v for k, v in dims.items() if k in shapes or k in ("x", "z")}

    def site_priors(self) -> dict[str, str]:
        """The priors of the parameter sites, in words (also used by the model card)."""
        return {name: self._prior_words(name) for name in self.site_shapes(self.obs_dim or 1)}

    def _prior_loc_scale(self, name: str):
        if name == "stickiness":
            return 0.0, 1.0
        if name in ("log_obs_var", "log_latent_var"):
            return -2.0, self.prior_scale
        return 0.0, self.prior_scale

    def _prior_words(self, name: str) -> str:
        loc, scale = self._prior_loc_scale(name)
        return f"Normal({loc:g}, {scale:g})"

    def _prior(self, name: str, shape):
        loc, scale = self._prior_loc_scale(name)
        return dist.Normal(loc, scale).expand(shape).to_event(len(shape))

    # ----- data ---------------------------------------------------------------------------------
    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        if inputs is not None:
            raise DataError("inputs: the gdm_mixture model takes no control inputs; pass inputs=None")
        return super().prepare(y, mask=mask, lengths=lengths, inputs=None)

    # ----- deterministic pieces (jit/vmap-able) -------------------------------------------------
    def gamma(self, params):
        return params["stickiness"] if self.sticky else 0.0

    def transition_base_logits(self, params, x):
        """(..., T, K) the z-free part of the logits: pi_1 at t = 1, (1 - gamma)(R x_{t-1} + r) after."""
        drive = (1.0 - self.gamma(params)) * (x[..., :-1, :] @ params["transition_weights"].T + params["transition_bias"])
        init = jnp.broadcast_to(params["init_logits"], x.shape[:-2] + (1, self.num_states))
        return jnp.concatenate([init, drive], axis=-2)

    def latent_means(self, params, z, x):
        """(..., T, D) mixed means of x_t: sum_k z_1k mu_k at t = 1, sum_k z_tk (A_k x_{t-1} + c_k) after."""
        per_state = jnp.einsum("kde,...te->...tkd", params["dynamics"], x[..., :-1, :]) + params["offsets"]
        first = jnp.einsum("...k,kd->...d", z[..., 0, :], params["init_mean"])[..., None, :]
        later = jnp.einsum("...tk,...tkd->...td", z[..., 1:, :], per_state)
        return jnp.concatenate([first, later], axis=-2)

    def latent_vars(self, params, z):
        """(..., T, D) diagonal of Q(z_t): sum_k z_tk q_k (state noise) or q."""
        q = jnp.exp(params["log_latent_var"])
        if self.state_noise:
            return z @ q
        return jnp.broadcast_to(q, z.shape[:-1] + q.shape)

    def latent_log_prob(self, params, z, x, time_mask):
        """(..., trials) log p(x | z) over each trial's steps, plus N(0, I) on padded steps."""
        mean, var = self.latent_means(params, z, x), self.latent_vars(params, z)
        inside = -0.5 * (jnp.sum((x - mean) ** 2 / var + jnp.log(var), -1) + x.shape[-1] * _LOG_2PI)
        padded = -0.5 * (jnp.sum(x**2, -1) + x.shape[-1] * _LOG_2PI)
        return jnp.sum(jnp.where(time_mask, inside, padded), -1)

    def emission_mean(self, params, x):
        """(..., T, N) C x_t + d (the pre-softplus rate for Poisson)."""
        return x @ params["emission_matrix"].T + params["emission_bias"]

    def emission_log_prob(self, params, x, data: SequenceData):
        """(..., trials, time) log p(y_t | x_t), 0 at unobserved entries."""
        mean = self.emission_mean(params, x)
        if self.emission == "gaussian":
            return masked_diag_normal_log_prob(data.y, data.mask, mean, jnp.exp(0.5 * params["log_obs_var"]))
        return masked_poisson_log_prob(data.y, data.mask, jax.nn.softplus(mean))

    def state_prior(self, params, x, time_mask, temperature=None) -> RelaxedMarkovChain:
        """p(z | x): the relaxed chain with logits driven by x_{t-1}."""
        tau = self.temperature if temperature is None else temperature
        coupling = self.gamma(params) if self.sticky else None
        return RelaxedMarkovChain(tau, self.transition_base_logits(params, x), coupling, time_mask)

    # ----- the program --------------------------------------------------------------------------
    def program(self, data: SequenceData, *, temperature=None, record_log_lik: bool = False) -> None:
        params = {name: numpyro.sample(name, self._prior(name, shape)) for name, shape in self.site_shapes(data.obs_dim).items()}
        T, D = data.y.shape[1], self.latent_dim
        time_mask = data.time_mask
        with numpyro.plate("trial", data.num_trials):
            # placeholder of zero density: log p(x | z) is added below, once z is known
            x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand((T, D)).to_event(2).mask(False))
            z = numpyro.sample("z", self.state_prior(params, x, time_mask, temperature))
            numpyro.factor("x_dynamics", self.latent_log_prob(params, z, x, time_mask))
            mean = self.emission_mean(params, x)
            if self.emission == "gaussian":
                obs_dist = dist.Normal(mean, jnp.exp(0.5 * params["log_obs_var"]))
            else:
                obs_dist = dist.Poisson(jax.nn.softplus(mean))
            numpyro.sample("y", obs_dist.mask(data.mask).to_event(2), obs=data.y)
        if record_log_lik:
            numpyro.deterministic("log_lik", self.emission_log_prob(params, x, data))

    def default_guide(self):
        from ppl_switch.guides.gdm_guides import MixtureGuide

        return MixtureGuide(self)

    # ----- per-draw quantities ------------------------------------------------------------------
    def noise_free_path(self, params, num_trials: int, num_timesteps: int, temperature=None):
        """(z, x): the prior chain with all noise set to 0 (z_t = softmax(pi_t / tau), x_t its mixed
        mean), shapes (trials, time, K) and (trials, time, D). A stand-in when a draw carries no paths."""
        tau = self.temperature if temperature is None else temperature
        gamma = self.gamma(params)
        z1 = jax.nn.softmax(params["init_logits"] / tau)
        x1 = z1 @ params["init_mean"]

        def step(carry, _):
            z_prev, x_prev = carry
            drive = params["transition_weights"] @ x_prev + params["transition_bias"]
            z = jax.nn.softmax(((1.0 - gamma) * drive + gamma * z_prev) / tau)
            x = z @ (jnp.einsum("kde,e->kd", params["dynamics"], x_prev) + params["offsets"])
            return (z, x), (z, x)

        _, (zs, xs) = jax.lax.scan(step, (z1, x1), None, length=num_timesteps - 1)
        z = jnp.concatenate([z1[None], zs])
        x = jnp.concatenate([x1[None], xs])
        tile = lambda a: jnp.broadcast_to(a, (num_trials,) + a.shape)  # noqa: E731
        return tile(z), tile(x)

    def latent_mean_path(self, params, z):
        """(..., T, D) x with the latent noise set to 0 given soft states z (..., T, K): eq. 2.2's
        deterministic x_1 = z_1 . mu, x_t = sum_k z_tk (A_k x_{t-1} + c_k)."""
        x1 = z[..., 0, :] @ params["init_mean"]

        def step(x_prev, z_t):
            x = jnp.einsum("...k,...kd->...d", z_t, jnp.einsum("kde,...e->...kd", params["dynamics"], x_prev) + params["offsets"])
            return x, x

        _, rest = jax.lax.scan(step, x1, jnp.moveaxis(z[..., 1:, :], -2, 0))
        return jnp.concatenate([x1[..., None, :], jnp.moveaxis(rest, 0, -2)], axis=-2)

    def _paths(self, params, data):
        """(z, x) of a draw: its own paths; z alone (e.g. from an encoder) with x = the noise-free
        mean path given z; neither: :meth:`noise_free_path`."""
        if "z" in params:
            z = params["z"]
            return z, params["x"] if "x" in params else self.latent_mean_path(params, z)
        return self.noise_free_path(params, data.y.shape[0], data.y.shape[1])

    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, time) log p(y_t | x_t) given the draw's x (conditional on the latent path)."""
        return self.emission_log_prob(params, self._paths(params, data)[1], data)

    def state_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        z = self._paths(params, data)[0]
        return {"state_probs": z, "viterbi": jnp.argmax(z, -1)}

    def sample_states(self, key, params, data: SequenceData) -> jax.Array:
        return self.state_posterior(params, data)["viterbi"]

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """One replicate of y given the draw's latent path x."""
        mean = self.emission_mean(params, self._paths(params, data)[1])
        if self.emission == "gaussian":
            return mean + jnp.exp(0.5 * params["log_obs_var"]) * jax.random.normal(key, mean.shape, mean.dtype)
        return jax.random.poisson(key, jax.nn.softplus(mean)).astype(mean.dtype)

    # ----- simulation ---------------------------------------------------------------------------
    def default_params(self, key) -> dict[str, Any]:
        if self.obs_dim is None:
            raise ValueError("obs_dim: GDMMixture was built with obs_dim=None; pass obs_dim to build default parameters")
        seed = key if isinstance(key, (int, np.integer)) else np.asarray(jax.random.key_data(key)).ravel().tolist()
        return self.init_params(np.random.default_rng(seed), self.obs_dim)

    def init_params(self, rng: np.random.Generator, obs_dim: int) -> dict[str, np.ndarray]:
        """A_k = 0.95 x random orthogonal, c_k, mu_k ~ N(0, 1), C ~ N(0, 1), R ~ N(0, 1), d = r = pi_1 = 0,
        gamma = 0.1, log q = -4, log sigma^2 = -2."""
        K, D, N = self.num_states, self.latent_dim, obs_dim
        out = {
            "init_logits": np.zeros(K),
            "init_mean": rng.standard_normal((K, D)),
            "dynamics": np.stack([0.95 * np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(K)]),
            "offsets": 0.1 * rng.standard_normal((K, D)),
            "log_latent_var": np.full((K, D) if self.state_noise else (D,), -4.0),
            "transition_weights": rng.standard_normal((K, D)),
            "transition_bias": np.zeros(K),
            "emission_matrix": rng.standard_normal((N, D)),
            "emission_bias": np.zeros(N),
        }
        if self.sticky:
            out["stickiness"] = np.array(0.1)
        if self.emission == "gaussian":
            out["log_obs_var"] = np.full(N, -2.0)
        return out

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        """Ancestral sampling of (z, x, y). Returns (SequenceData, truth) with truth keys
        ``params``, ``soft_states`` (trials, time, K), ``states`` (argmax), ``latents`` (trials, time, D)."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        if inputs is not None:
            raise DataError("inputs: the gdm_mixture model takes no control inputs; pass inputs=None")
        if self.obs_dim is None:
            raise ValueError("obs_dim: GDMMixture was built with obs_dim=None; pass obs_dim to simulate")
        key_params, key_path = jax.random.split(key)
        params = self.default_params(key_params) if params is None else params
        params = jax.tree.map(jnp.asarray, dict(params))
        run = jax.jit(jax.vmap(lambda k, p: self._simulate_trial(k, p, num_timesteps), (0, None)))
        z, x, y = run(jax.random.split(key_path, num_trials), params)
        data = self.prepare(np.asarray(y))
        truth = {"params": params, "soft_states": z, "states": jnp.argmax(z, -1), "latents": x}
        return data, truth

    def _simulate_trial(self, key, params, num_timesteps):
        tau, gamma = self.temperature, self.gamma(params)

        def draw_x(k, z, mean):
            return mean + jnp.sqrt(self.latent_vars(params, z)) * jax.random.normal(k, mean.shape, mean.dtype)

        kz, kx, key = jax.random.split(key, 3)
        z1 = RelaxedOneHotCategorical(tau, logits=params["init_logits"]).sample(kz)
        x1 = draw_x(kx, z1, z1 @ params["init_mean"])

        def step(carry, k):
            z_prev, x_prev = carry
            kz, kx = jax.random.split(k)
            drive = params["transition_weights"] @ x_prev + params["transition_bias"]
            z = RelaxedOneHotCategorical(tau, logits=(1.0 - gamma) * drive + gamma * z_prev).sample(kz)
            x = draw_x(kx, z, z @ (jnp.einsum("kde,e->kd", params["dynamics"], x_prev) + params["offsets"]))
            return (z, x), (z, x)

        key_y, key = jax.random.split(key)
        _, (zs, xs) = jax.lax.scan(step, (z1, x1), jax.random.split(key, num_timesteps - 1))
        z = jnp.concatenate([z1[None], zs])
        x = jnp.concatenate([x1[None], xs])
        mean = self.emission_mean(params, x)
        if self.emission == "gaussian":
            y = mean + jnp.exp(0.5 * params["log_obs_var"]) * jax.random.normal(key_y, mean.shape, mean.dtype)
        else:
            y = jax.random.poisson(key_y, jax.nn.softplus(mean)).astype(mean.dtype)
        return z, x, y

    # ----- labels -------------------------------------------------------------------------------
    def state_features(self, params) -> np.ndarray:
        return np.concatenate([np.asarray(params["offsets"]), np.asarray(params["dynamics"]).reshape(self.num_states, -1)], -1)

    def permute_states(self, params, perm) -> dict[str, Any]:
        """Relabel every state axis (exact: the stickiness term is permutation-free)."""
        return permute_by_dims(params, perm, self.site_dims())
