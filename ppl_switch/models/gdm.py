"""Gumbel Dynamical Model (GDM; Wang, Kim, Shea-Brown & Sümbül), the 2-level form of paper eq. 2.1.

Soft states z_t live on the simplex and mix K linear dynamics of the observations:

    z_1 ~ GS(pi_1, tau)
    z_t ~ GS(pi_t, tau),  pi_t = (1 - gamma)(R F y_{t-1} + r) + gamma z_{t-1}      (sticky; gamma = 0 otherwise)
    y_1 ~ N(sum_k z_1k mu_k, diag(sigma^2))
    y_t ~ N(sum_k z_tk (S_k F y_{t-1} + b_k + V_k u_t), diag(sigma^2))                t >= 2

F (D x N) projects observations to a D-dim space. As in the released code F is a fixed random projection
(0.1 * N(0,1), drawn from ``projection_seed``) unless ``train_projection=True``. With ``transition="gru"``
the transition logits are pi_t = L h_t + l with h_t = GRU(h_{t-1}, F y_{t-1}) (plus gamma z_{t-1} if
sticky), and F is trained. With ``emission="poisson"`` the rate is softplus of the mixed mean.

The state path is one site ``z`` (trial, time, state) with a :class:`RelaxedMarkovChain` prior whose
log-density is vectorised over time. Parameters are sample sites with weak Normal priors (stated in
:meth:`GDM.site_priors`), so that the program runs under NUTS; under SVI they are MAP point estimates,
which matches the paper's maximum-likelihood "learning" up to these weak priors.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ppl_switch.data import DataError, SequenceData, check_positive_int, interpolate_missing, missing_share
from ppl_switch.distributions.relaxed import RelaxedOneHotCategorical
from ppl_switch.guides.gru import gru_cell, gru_init, gru_scan
from ppl_switch.models._common import require_obs_dim
from ppl_switch.models._gdm_base import GDMBase

__all__ = ["GDM"]

TRANSITIONS = ("linear", "gru")


class GDM(GDMBase):
    """The 2-level Gumbel Dynamical Model.

    Args:
        num_states: K >= 1.
        latent_dim: D >= 1, dimension of the projection F y.
        obs_dim: N, or None to take it from the data (needed for simulation without data).
        input_dim: M >= 0 control inputs u_t entering the emission mean through V_k.
        emission: "gaussian" (diagonal covariance) or "poisson" (rate softplus(mean)).
        sticky: include the gamma z_{t-1} term in the transition logits.
        transition: "linear" (R F y_{t-1} + r) or "gru" (readout of a GRU over F y_{1:t-1}).
        gru_hidden: hidden size of the transition GRU.
        temperature: Gumbel-softmax temperature tau (the paper fixes 0.99); a program argument overrides it.
        train_projection: learn F (always True for the GRU transition).
        constrain_gamma: gamma = sigmoid(site) in (0, 1) instead of the released code's unconstrained gamma.
        projection_seed: seed of the fixed random projection.
        projection_matrix: optional (latent_dim, N) fixed projection F used instead of the random one
            (e.g. ``ppl_switch.infer.gdm_start.pca_projection(data, latent_dim)``); with ``train_projection`` it is F's start.
        prior_scale: standard deviation of the Normal(0, .) priors on weights.
    """

    name = "gdm"
    example_config = dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1)
    fixed_point_kind = "affine"  # per regime, in the projected space x = F y (and back in y)
    recommended_runner = ("gdm_svi", {"start": "auto", "projection": "auto"})  # GS-BBVI from the segmentation start (model card)
    _config_keys = ("num_states", "latent_dim", "obs_dim", "input_dim", "emission", "sticky", "transition", "gru_hidden",
                    "temperature", "train_projection", "constrain_gamma", "projection_seed", "prior_scale",
                    "projection_matrix")
    path_dims = {"z": ("trial", "time", "state")}

    def __init__(
        self,
        num_states: int = 4,
        latent_dim: int = 2,
        obs_dim: Optional[int] = None,
        input_dim: int = 0,
        emission: str = "gaussian",
        sticky: bool = True,
        transition: str = "linear",
        gru_hidden: int = 16,
        temperature: float = 0.99,
        train_projection: bool = False,
        constrain_gamma: bool = False,
        projection_seed: int = 0,
        prior_scale: float = 5.0,
        projection_matrix=None,
    ):
        super().__init__(num_states, latent_dim, obs_dim, emission, sticky, temperature, prior_scale)
        self.input_dim = check_positive_int(input_dim, "input_dim", minimum=0)
        if transition not in TRANSITIONS:
            raise ValueError(f"transition: expected one of {TRANSITIONS}, got {transition!r}")
        self.transition = transition
        self.gru_hidden = check_positive_int(gru_hidden, "gru_hidden")
        self.train_projection = bool(train_projection) or transition == "gru"
        self.constrain_gamma = bool(constrain_gamma)
        self.projection_seed = int(projection_seed)
        # kept as nested lists so that model.config() stays JSON-serialisable
        self.projection_matrix = None if projection_matrix is None else np.asarray(projection_matrix, float).tolist()
        if projection_matrix is not None:
            F = np.asarray(self.projection_matrix)
            if F.ndim != 2 or F.shape[0] != self.latent_dim or not np.all(np.isfinite(F)):
                raise ValueError(f"projection_matrix: expected a finite (latent_dim = {self.latent_dim}, obs_dim) array, got shape {F.shape}")
            if obs_dim is not None and F.shape[1] != obs_dim:
                raise ValueError(f"projection_matrix: has {F.shape[1]} columns, expected obs_dim = {obs_dim}")

    # ----- sites --------------------------------------------------------------------------------
    def site_shapes(self, obs_dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter sites (the state path ``z`` is (trials, time, K))."""
        K, D, N, M, H = self.num_states, self.latent_dim, obs_dim, self.input_dim, self.gru_hidden
        shapes = {"init_logits": (K,), "init_mean": (K, N), "dynamics": (K, N, D), "offsets": (K, N)}
        if M:
            shapes["input_weights"] = (K, N, M)
        if self.transition == "linear":
            shapes.update(transition_weights=(K, D), transition_bias=(K,))
        else:
            shapes.update(gru_W=(3 * H, D), gru_U=(3 * H, H), gru_b=(3 * H,), readout_weights=(K, H), readout_bias=(K,))
        shapes.update(self._gamma_and_noise_shapes(N))
        if self.train_projection:
            shapes["projection"] = (D, N)
        return shapes

    def _param_dims(self) -> dict[str, tuple[str, ...]]:
        return {
            **super()._param_dims(),
            "init_mean": ("state", "obs"),
            "dynamics": ("state", "obs", "latent"),
            "offsets": ("state", "obs"),
            "input_weights": ("state", "obs", "input"),
            "gru_W": ("gate_hidden", "latent"),
            "gru_U": ("gate_hidden", "hidden"),
            "gru_b": ("gate_hidden",),
            "readout_weights": ("state", "hidden"),
            "readout_bias": ("state",),
            "projection": ("latent", "obs"),
        }

    def affine_dynamics(self, samples, obs_dim: int):
        """x = F y follows x -> F S_k x + F b_k in regime k (App. B), per draw: see :meth:`Model.affine_dynamics`."""
        S = np.asarray(samples["dynamics"], float)  # (..., K, N, D)
        F = np.asarray(samples["projection"], float) if self.train_projection else self.fixed_projection(obs_dim)  # (..., D, N)
        A = np.einsum("...dn,...kne->...kde", F, S)
        b = np.einsum("...dn,...kn->...kd", F, np.asarray(samples["offsets"], float))
        return A, b, ("chain", "draw", "state"), "latent", None

    def observation_fixed_points(self, samples, fixed_points) -> np.ndarray:
        """(..., K, N) the fixed points back in observation space, y*_k = S_k x*_k + b_k."""
        S, offsets = np.asarray(samples["dynamics"]), np.asarray(samples["offsets"])
        return np.einsum("...knd,...kd->...kn", S, fixed_points) + offsets

    def fixed_projection(self, obs_dim: int) -> np.ndarray:
        """The fixed projection F (D, N): ``projection_matrix`` if given, else 0.1 N(0, 1) drawn from
        ``projection_seed`` (the released code's)."""
        if self.projection_matrix is not None:
            F = np.asarray(self.projection_matrix)
            if F.shape[1] != obs_dim:
                raise ValueError(f"projection_matrix: has {F.shape[1]} columns, but the data have obs_dim = {obs_dim}")
            return F
        return 0.1 * np.random.default_rng(self.projection_seed).standard_normal((self.latent_dim, obs_dim))

    # ----- data ---------------------------------------------------------------------------------
    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        """Validated data; missing entries inside the trials hold values interpolated in time
        (:func:`~ppl_switch.data.interpolate_missing`), the mask still False there. y_{t-1} drives the
        transition and the emission mean (F y_{t-1}), so a missing entry there needs a value: zero, the
        padding value, would bias both; the likelihood still leaves the missing entries out."""
        data = super().prepare(y, mask=mask, lengths=lengths, inputs=inputs)
        if self.input_dim and data.inputs is None:
            raise DataError(f"inputs: the model was built with input_dim={self.input_dim}; pass inputs (trials, time, {self.input_dim})")
        if missing_share(data) > 0:
            data = data._replace(y=interpolate_missing(data).y.astype(np.asarray(data.y).dtype))
        return data

    # ----- deterministic pieces (jit/vmap-able) -------------------------------------------------
    def projection(self, params, obs_dim: int):
        return params["projection"] if self.train_projection else jnp.asarray(self.fixed_projection(obs_dim))

    def transition_base_logits(self, params, y):
        """(..., T, K) the part of the transition logits that does not depend on z: pi_1 at t = 1 and
        (1 - gamma) f(F y_{1:t-1}) at t >= 2. ``y`` is (..., T, N)."""
        proj = y[..., :-1, :] @ self.projection(params, y.shape[-1]).T
        if self.transition == "linear":
            drive = proj @ params["transition_weights"].T + params["transition_bias"]
        else:
            gru = {"W": params["gru_W"], "U": params["gru_U"], "b": params["gru_b"]}
            drive = gru_scan(gru, proj) @ params["readout_weights"].T + params["readout_bias"]
        return self._prepend_initial_logits(params, drive)

    def state_means(self, params, y, inputs=None):
        """(..., T, K, N) per-state emission means m_tk: mu_k at t = 1, S_k F y_{t-1} + b_k (+ V_k u_t) after."""
        proj = y[..., :-1, :] @ self.projection(params, y.shape[-1]).T
        later = jnp.einsum("knd,...td->...tkn", params["dynamics"], proj) + params["offsets"]
        first = jnp.broadcast_to(params["init_mean"], y.shape[:-2] + (1,) + params["init_mean"].shape)
        means = jnp.concatenate([first, later], axis=-3)
        if self.input_dim:
            means = means + jnp.einsum("knm,...tm->...tkn", params["input_weights"], inputs)
        return means

    def mixed_mean(self, params, z, y, inputs=None):
        """(..., T, N) emission mean sum_k z_tk m_tk (the pre-softplus rate for Poisson)."""
        return jnp.einsum("...tk,...tkn->...tn", z, self.state_means(params, y, inputs))

    def emission_log_prob(self, params, z, data: SequenceData):
        """(..., trials, time) log p(y_t | y_{t-1}, z_t), 0 at unobserved entries."""
        return self._observation_log_prob(params, self.mixed_mean(params, z, data.y, data.inputs), data)

    def state_prior(self, params, data: SequenceData, temperature=None):
        """p(z | y): the relaxed chain with logits driven by y_{t-1}."""
        return self._relaxed_chain(params, self.transition_base_logits(params, data.y), data.time_mask, temperature)

    # ----- the program --------------------------------------------------------------------------
    def _sample_paths(self, params, data: SequenceData, temperature):
        z = numpyro.sample("z", self.state_prior(params, data, temperature))
        return self.mixed_mean(params, z, data.y, data.inputs)

    def default_guide(self):
        from ppl_switch.guides.gdm_guides import LinearGuide

        return LinearGuide(self)

    # ----- per-draw quantities ------------------------------------------------------------------
    def noise_free_path(self, params, data: SequenceData, temperature=None):
        """(trials, time, K) the prior chain without Gumbel noise: z_t = softmax(pi_t / tau), with
        pi_t built from the observed y_{t-1} and this path's z_{t-1}. A deterministic stand-in for z
        when a parameter set carries no state draws."""
        tau = self.temperature if temperature is None else temperature
        base = jnp.moveaxis(self.transition_base_logits(params, data.y), -2, 0)
        gamma = self.gamma(params)
        z1 = jax.nn.softmax(base[0] / tau, -1)

        def step(z_prev, base_t):
            z = jax.nn.softmax((base_t + gamma * z_prev) / tau, -1)
            return z, z

        _, rest = jax.lax.scan(step, z1, base[1:])
        return jnp.moveaxis(jnp.concatenate([z1[None], rest], 0), 0, -2)

    def _states(self, params, data):
        """The draw's ``z`` if it has one, else :meth:`noise_free_path`."""
        return params["z"] if "z" in params else self.noise_free_path(params, data)

    def _observation_mean(self, params, data):
        """sum_k z_tk m_tk with the observed y_{t-1}: the log-likelihood and the posterior-predictive
        replicate are one step ahead given the draw's z."""
        return self.mixed_mean(params, self._states(params, data), data.y, data.inputs)

    # ----- simulation ---------------------------------------------------------------------------
    def init_params(self, rng: np.random.Generator, obs_dim: int) -> dict[str, np.ndarray]:
        """The released code's initialisation: S_k = C Q_k (Q_k random orthogonal), mu ~ N(0,1),
        R ~ N(0,1), b = r = pi_1 = 0, gamma = 0.1, log sigma^2 = -1 + U(0,1)."""
        K, D, N = self.num_states, self.latent_dim, obs_dim
        C = rng.standard_normal((N, D))
        orth = [np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(K)]
        out = {
            "init_logits": np.zeros(K),
            "init_mean": rng.standard_normal((K, N)),
            "dynamics": np.stack([C @ q for q in orth]),
            "offsets": np.zeros((K, N)),
        }
        if self.input_dim:
            out["input_weights"] = np.zeros((K, N, self.input_dim))
        if self.transition == "linear":
            out.update(transition_weights=rng.standard_normal((K, D)), transition_bias=np.zeros(K))
        else:
            gru = gru_init(rng, D, self.gru_hidden)
            out.update(gru_W=gru["W"], gru_U=gru["U"], gru_b=gru["b"])
            out.update(readout_weights=rng.uniform(-1, 1, (K, self.gru_hidden)) / np.sqrt(self.gru_hidden), readout_bias=np.zeros(K))
        if self.sticky:
            out["stickiness"] = np.array(np.log(0.1 / 0.9) if self.constrain_gamma else 0.1)
        if self.emission == "gaussian":
            out["log_obs_var"] = -1.0 + rng.uniform(size=N)
        if self.train_projection:
            out["projection"] = 0.1 * rng.standard_normal((D, N)) if self.projection_matrix is None else self.fixed_projection(N)
        return out

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        """Ancestral sampling of (z, y) jointly (y_{t-1} drives z_t and the mean of y_t)."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        require_obs_dim(self)
        key_params, key_path, key_inputs = jax.random.split(key, 3)
        if self.input_dim and inputs is None:  # no inputs given: standard-normal ones, returned in the data
            inputs = np.asarray(jax.random.normal(key_inputs, (num_trials, num_timesteps, self.input_dim)))
        params = self.default_params(key_params) if params is None else params
        params = jax.tree.map(jnp.asarray, dict(params))
        u = None if inputs is None else jnp.asarray(inputs, dtype=float)
        simulate_trials = jax.jit(jax.vmap(lambda k, p, u_i: self._simulate_trial(k, p, num_timesteps, u_i), (0, None, 0)))
        y, z = simulate_trials(
            jax.random.split(key_path, num_trials), params, u if u is not None else jnp.zeros((num_trials, num_timesteps, 0))
        )
        data = self.prepare(np.asarray(y), inputs=None if inputs is None else np.asarray(inputs))
        truth = {"params": params, "soft_states": z, "states": jnp.argmax(z, -1)}
        return data, truth

    def _simulate_trial(self, key, params, num_timesteps, inputs):
        N = self.obs_dim
        tau = self.temperature
        F = self.projection(params, N)
        gamma = self.gamma(params)

        def emit(k, mean):
            return self._draw_observations(k, params, mean)

        def drive_logits(h, y_prev):
            x = F @ y_prev
            if self.transition == "linear":
                return h, params["transition_weights"] @ x + params["transition_bias"]
            gru = {"W": params["gru_W"], "U": params["gru_U"], "b": params["gru_b"]}
            h = gru_cell(gru, h, x)
            return h, params["readout_weights"] @ h + params["readout_bias"]

        def input_term(u_t):
            return jnp.einsum("knm,m->kn", params["input_weights"], u_t) if self.input_dim else 0.0

        k0, k1, key = jax.random.split(key, 3)
        z1 = RelaxedOneHotCategorical(tau, logits=params["init_logits"]).sample(k0)
        y1 = emit(k1, z1 @ (params["init_mean"] + input_term(inputs[0])))

        def step(carry, xs):
            z_prev, y_prev, h = carry
            k, u_t = xs
            kz, ky = jax.random.split(k)
            h, drive = drive_logits(h, y_prev)
            logits = (1.0 - gamma) * drive + gamma * z_prev
            z = RelaxedOneHotCategorical(tau, logits=logits).sample(kz)
            means = jnp.einsum("knd,d->kn", params["dynamics"], F @ y_prev) + params["offsets"] + input_term(u_t)
            y = emit(ky, z @ means)
            return (z, y, h), (z, y)

        h0 = jnp.zeros(self.gru_hidden)
        _, (zs, ys) = jax.lax.scan(step, (z1, y1, h0), (jax.random.split(key, num_timesteps - 1), inputs[1:]))
        return jnp.concatenate([y1[None], ys]), jnp.concatenate([z1[None], zs])
