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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.distributions.relaxed import RelaxedMarkovChain, RelaxedOneHotCategorical
from ppl_switch.models._common import require_obs_dim
from ppl_switch.models._gdm_base import GDMBase

__all__ = ["GDMMixture"]

_LOG_2PI = math.log(2.0 * math.pi)


class GDMMixture(GDMBase):
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
    example_config = dict(num_states=2, latent_dim=2, obs_dim=3)
    _config_keys = ("num_states", "latent_dim", "obs_dim", "emission", "sticky", "state_noise", "temperature", "prior_scale")
    path_dims = {"x": ("trial", "time", "latent"), "z": ("trial", "time", "state")}

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
        super().__init__(num_states, latent_dim, obs_dim, emission, sticky, temperature, prior_scale)
        self.state_noise = bool(state_noise)

    # ----- sites --------------------------------------------------------------------------------
    def site_shapes(self, obs_dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter sites (the paths are ``x`` (trials, time, D), ``z`` (trials, time, K))."""
        K, D, N = self.num_states, self.latent_dim, obs_dim
        return {
            "init_logits": (K,),
            "init_mean": (K, D),
            "dynamics": (K, D, D),
            "offsets": (K, D),
            "log_latent_var": (K, D) if self.state_noise else (D,),
            "transition_weights": (K, D),
            "transition_bias": (K,),
            "emission_matrix": (N, D),
            "emission_bias": (N,),
            **self._gamma_and_noise_shapes(N),
        }

    def _param_dims(self) -> dict[str, tuple[str, ...]]:
        return {
            **super()._param_dims(),
            "init_mean": ("state", "latent"),
            "dynamics": ("state", "latent", "latent_from"),
            "offsets": ("state", "latent"),
            "log_latent_var": ("state", "latent") if self.state_noise else ("latent",),
            "emission_matrix": ("obs", "latent"),
            "emission_bias": ("obs",),
        }

    # ----- data ---------------------------------------------------------------------------------
    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        if inputs is not None:
            raise DataError("inputs: the gdm_mixture model takes no control inputs; pass inputs=None")
        return super().prepare(y, mask=mask, lengths=lengths, inputs=None)

    # ----- deterministic pieces (jit/vmap-able) -------------------------------------------------
    def transition_base_logits(self, params, x):
        """(..., T, K) the z-free part of the logits: pi_1 at t = 1, (1 - gamma)(R x_{t-1} + r) after."""
        return self._prepend_initial_logits(params, x[..., :-1, :] @ params["transition_weights"].T + params["transition_bias"])

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
        return self._observation_log_prob(params, self.emission_mean(params, x), data)

    def state_prior(self, params, x, time_mask, temperature=None) -> RelaxedMarkovChain:
        """p(z | x): the relaxed chain with logits driven by x_{t-1}."""
        return self._relaxed_chain(params, self.transition_base_logits(params, x), time_mask, temperature)

    # ----- the program --------------------------------------------------------------------------
    def _sample_paths(self, params, data: SequenceData, temperature):
        T, D = data.y.shape[1], self.latent_dim
        time_mask = data.time_mask
        # placeholder of zero density: log p(x | z) is added below, once z is known
        x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand((T, D)).to_event(2).mask(False))
        z = numpyro.sample("z", self.state_prior(params, x, time_mask, temperature))
        numpyro.factor("x_dynamics", self.latent_log_prob(params, z, x, time_mask))
        return self.emission_mean(params, x)

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

    def _states(self, params, data):
        return self._paths(params, data)[0]

    def _observation_mean(self, params, data):
        """C x + d of the draw's latent path x (so the log-likelihood is conditional on x)."""
        return self.emission_mean(params, self._paths(params, data)[1])

    # ----- simulation ---------------------------------------------------------------------------
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
        require_obs_dim(self)
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
        return z, x, self._draw_observations(key_y, params, self.emission_mean(params, x))
