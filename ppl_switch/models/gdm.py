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

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ppl_switch.data import DataError, SequenceData, check_positive_int
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
            (e.g. ``models.gdm_start.pca_projection(data, latent_dim)``); with ``train_projection`` it is F's start.
        prior_scale: standard deviation of the Normal(0, .) priors on weights.
    """

    name = "gdm"
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
        data = super().prepare(y, mask=mask, lengths=lengths, inputs=inputs)
        if self.input_dim and data.inputs is None:
            raise DataError(f"inputs: the model was built with input_dim={self.input_dim}; pass inputs (trials, time, {self.input_dim})")
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
        N, K = self.obs_dim, self.num_states
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


# ===== GS-BBVI training ==========================================================================
# Kept beside the model because the temperature schedule is a program argument: each SVI step gets
# tau(step) through ``svi.update(state, data, temperature=tau)``, inside one jitted lax.scan per chunk.

from dataclasses import dataclass, field  # noqa: E402
import time as _time  # noqa: E402

import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402


def learning_rate_schedule(learning_rate: float = 1e-2, final_learning_rate: float = 1e-3, warmup_steps: int = 200):
    """The released code's schedule: constant for ``warmup_steps``, linear to the final rate over
    2 * warmup_steps, then constant."""
    return optax.join_schedules(
        [
            optax.constant_schedule(learning_rate),
            optax.linear_schedule(learning_rate, final_learning_rate, 2 * warmup_steps),
            optax.constant_schedule(final_learning_rate),
        ],
        [warmup_steps, 3 * warmup_steps],
    )


def temperature_schedule(tau_start: float = 0.99, tau_end: float = 0.99, delay: int = 200, rise: int = 400):
    """Delayed cosine schedule: tau_start for ``delay`` steps, cosine to tau_end over ``rise``, then held."""

    def schedule(step):
        frac = jnp.clip((step - delay) / max(rise, 1), 0.0, 1.0)
        return tau_start + (tau_end - tau_start) * 0.5 * (1.0 - jnp.cos(jnp.pi * frac))

    return schedule


def gdm_optimizer(learning_rate=1e-2, final_learning_rate=1e-3, warmup_steps=200, weight_decay=1e-4, clip_norm=1.0):
    """optax chain of the released code: global-norm clipping then AdamW on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate_schedule(learning_rate, final_learning_rate, warmup_steps), weight_decay=weight_decay),
    )


def _device(data: SequenceData) -> SequenceData:
    return jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)


@dataclass
class GDMFit:
    """Result of :func:`fit_gdm_svi`.

    Attributes:
        model, guide: what was fitted.
        svi_params: all optimised values (``<site>_map`` point estimates and ``guide_*`` encoder weights).
        params: the model's point estimates by site name.
        losses: (steps,) negative ELBO per step.
        num_steps: steps run (early stopping may end before the maximum).
        wall_time: seconds for the fit, compilation included (and the start's time).
        start: where SVI started: "segmentation" (hard-state EM fit), "given" (the guide's own ``start``
            values) or "released" (the released code's random start).
        projection: "pca" (``model`` is a copy of the model passed, with F = ``pca_projection(data, D)``)
            or "model" (the model's own F). Read results with ``fit.model``, not the model passed in.
    """

    model: GDM
    guide: Any
    svi_params: dict
    losses: np.ndarray
    num_steps: int
    wall_time: float
    data: SequenceData
    seed: int = 0
    start: str = "released"
    projection: str = "model"
    params: dict = field(init=False)

    def __post_init__(self):
        self.params = self.guide.model_params(self.svi_params)

    def encode(self, data: Optional[SequenceData] = None, *, num_samples: int = 20, seed: int = 0, temperature=None):
        """(num_samples, trials, time, K) soft-state samples from the amortised guide (no optimisation)."""
        data = self.data if data is None else data
        encode = jax.jit(lambda p, d, k, tau: self.guide.encode(p, d, k, num_samples, tau))
        tau = self.model.temperature if temperature is None else temperature
        return encode(self.svi_params, _device(data), jax.random.PRNGKey(seed), tau)

    def soft_states(self, data: Optional[SequenceData] = None, *, num_samples: int = 20, seed: int = 0):
        """(trials, time, K) posterior mean of z: the average of ``num_samples`` guide samples (paper §4)."""
        return jnp.mean(self.encode(data, num_samples=num_samples, seed=seed), 0)

    def to_inference_data(self, data: Optional[SequenceData] = None, *, num_draws: int = 20, seed: int = 0):
        """InferenceData: posterior = point estimates (repeated) + z draws; log-likelihood conditional on
        z; one-step posterior predictive; posterior_states; the loss trace as group ``svi_trace``."""
        from ppl_switch.results import build_inference_data

        data = self.data if data is None else data
        z = self.encode(data, num_samples=num_draws, seed=seed)
        samples = {k: jnp.broadcast_to(jnp.asarray(v), (1, num_draws) + jnp.shape(v)) for k, v in self.params.items()}
        samples["z"] = z[None]
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_draws)
        per_draw = jax.jit(
            jax.vmap(
                lambda k, z_i: (
                    self.model.log_likelihood(dict(self.params, z=z_i), data),
                    self.model.posterior_predictive(k, dict(self.params, z=z_i), data),
                )
            )
        )
        log_lik, ppc = per_draw(keys, z)
        log_lik, ppc = log_lik[None], ppc[None]
        hard = jnp.argmax(z, -1)[None]
        return build_inference_data(
            self.model,
            data,
            {k: np.asarray(v) for k, v in samples.items()},
            log_likelihood=np.asarray(log_lik),
            posterior_predictive=np.asarray(ppc),
            posterior_states={"state_probs": np.asarray(z.mean(0)), "viterbi": np.asarray(hard), "state_samples": np.asarray(hard)},
            extra_groups={"svi_trace": {"loss": (("step",), np.asarray(self.losses))}},
            attrs={"inference": "svi", "num_steps": self.num_steps},
        )


def _first_stop(elbo: np.ndarray, chunk_start: int, window: int, tolerance: float, min_steps: int):
    """First step i in [chunk_start, len(elbo)) with i + 1 >= max(min_steps, window) where the mean
    per-step ELBO change over the ``window`` steps ending at i is below ``tolerance`` (the released code
    checks this after every step); None if there is none."""
    for i in range(max(chunk_start, min_steps - 1, window - 1), len(elbo)):
        if (elbo[i] - elbo[i - window + 1]) / (window - 1) < tolerance:
            return i
    return None


STARTS = ("auto", "segmentation", "released")
PROJECTIONS = ("auto", "pca", "model")


def _supports_segmentation(model) -> bool:
    """The configurations :func:`~ppl_switch.models.gdm_start.segmentation_start` covers (and the
    measured default path was measured on): the 2-level GDM, Gaussian, linear transition, no inputs."""
    return isinstance(model, GDM) and model.emission == "gaussian" and model.transition == "linear" and not model.input_dim


def _resolve_start(model, guide, data: SequenceData, start: str, projection: str, num_restarts: int, seed: int):
    """(model, guide, start used, projection used) for :func:`fit_gdm_svi`; see its docstring."""
    from ppl_switch.guides.gdm_guides import LinearGuide, MixtureGuide
    from ppl_switch.models.gdm_start import pca_projection, segmentation_start

    if start not in STARTS:
        raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
    supported = _supports_segmentation(model)
    fully_observed = bool(np.all(np.asarray(data.mask).all(-1) | ~np.asarray(data.time_mask)))
    own_guide = guide is not None
    for name, value, needed in (("start", start, "segmentation"), ("projection", projection, "pca")):
        if value == needed and not supported:
            raise ValueError(f"{name}={needed!r} needs a 2-level GDM with emission='gaussian', transition='linear' "
                             f"and no inputs; use {name}='auto' (falls back to the released code's) for this model")
        if value == needed and not fully_observed:
            raise DataError(f"{name}={needed!r} needs every dimension observed at every step inside a trial; "
                            f"pass {name}='auto' or impute the missing entries")
    # auto: the measured best path where it applies (model card, "Default path"), else the released code's
    if projection == "auto":
        projection = "pca" if supported and fully_observed and not own_guide and model.projection_matrix is None else "model"
    if projection == "pca":
        model = GDM(**{**model.config(), "obs_dim": data.obs_dim,
                       "projection_matrix": pca_projection(data, model.latent_dim)})
        if own_guide:
            guide.model = model
    if guide is None:
        guide = LinearGuide(model, seed=seed)
    if getattr(guide, "start", None) is not None:
        return model, guide, "given", projection
    linear = isinstance(guide, LinearGuide) and not isinstance(guide, MixtureGuide)
    if start == "segmentation" and not linear:
        raise ValueError(f"start='segmentation' fits a LinearGuide's encoder; got {type(guide).__name__} (use start='released')")
    if start == "auto":
        start = "segmentation" if supported and fully_observed and linear else "released"
    if start == "segmentation":
        guide.start = segmentation_start(model, data, guide=guide, num_restarts=num_restarts, seed=seed)
    return model, guide, start, projection


def _check_start_values(guide, obs_dim: int, start: str) -> None:
    """FitError naming the start values that are not finite (before anything is compiled)."""
    from ppl_switch.infer.errors import FitError

    bad = sorted(k for k, v in guide.init_values(obs_dim).items() if not np.all(np.isfinite(np.asarray(v))))
    if bad:
        raise FitError(f"fit_gdm_svi: stage 'start' ({start}): non-finite start values for {bad}; "
                       "pass start='released' or check the data's scale", step=0, sites={"params": bad})


def _nonfinite_sites(model, guide, params, data, key) -> dict[str, list[str]]:
    """Sites of the guide and of the program (replayed on the guide's draw) whose value or log-density is
    not finite at ``params``, in one compiled call (tracing op by op takes minutes on a T = 1000 series)."""
    from numpyro.handlers import replay, seed, substitute, trace

    @jax.jit
    def finite_flags(params, key):
        guide_key, model_key = jax.random.split(key)
        guide_tr = trace(substitute(seed(guide, guide_key), data=params)).get_trace(data)
        model_tr = trace(replay(seed(model.program, model_key), guide_tr)).get_trace(data)
        flags = {}
        for where, tr in (("model", model_tr), ("guide", guide_tr)):
            for name, site in tr.items():
                if site["type"] == "sample":
                    flags[("value", f"{where} site {name!r}")] = jnp.all(jnp.isfinite(site["value"]))
                    flags[("log_density", f"{where} site {name!r}")] = jnp.all(jnp.isfinite(site["fn"].log_prob(site["value"])))
        return flags

    found = {"params": sorted(k for k, v in params.items() if not np.all(np.isfinite(np.asarray(v)))), "value": [], "log_density": []}
    for (kind, name), ok in finite_flags(params, key).items():
        if not bool(ok):
            found[kind].append(name)
    return found


def _raise_nonfinite(svi, model, guide, state, data, step, losses):
    """FitError for a non-finite ELBO at ``step``: names the sites whose value or log-density is not
    finite at ``state`` (the parameters of the last chunk that ended finite) on a fresh draw."""
    from ppl_switch.infer.errors import FitError

    try:
        found = _nonfinite_sites(model, guide, svi.get_params(state), data, jax.random.PRNGKey(step))
        where = "; ".join(f"non-finite {kind.replace('_', '-')} at {', '.join(names)}" for kind, names in found.items() if names)
        where = where or "no site is non-finite on a fresh draw (the failing draw was an outlier)"
    except Exception as err:  # the diagnosis must never hide the failure itself
        found, where = {}, f"(could not trace the program: {type(err).__name__}: {err})"
    raise FitError(
        f"fit_gdm_svi: stage 'svi': the ELBO became non-finite at step {step}. Traced at the parameters of the "
        f"last finite chunk: {where}. Try a smaller learning_rate, a higher temperature, or x64.",
        step=step, sites=found, losses=losses[: step + 1],
    )


def fit_gdm_svi(
    model: GDM,
    data,
    *,
    guide=None,
    start: str = "auto",
    projection: str = "auto",
    num_restarts: int = 20,
    num_steps: int = 4000,
    num_particles: int = 10,
    learning_rate: float = 1e-2,
    final_learning_rate: float = 1e-3,
    warmup_steps: int = 200,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
    temperature: Any = None,
    early_stopping: bool = True,
    window: int = 100,
    tolerance: float = 1e-4,
    min_steps: int = 101,
    chunk_size: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> GDMFit:
    """GS-BBVI (paper §3), by default from the data-driven start that measured best (model card,
    "Default path").

    Start and projection (the defaults measured best on fresh standard-NASCAR series, noise sd 0.01-1,
    float32 and float64; the released code's protocol is ``start="released", projection="model"``):

    * ``projection``: "pca" replaces a fixed random F by the data's D leading principal directions
      (``models.gdm_start.pca_projection``); the fit's ``model`` is then a copy of ``model`` with that
      ``projection_matrix``. "model" keeps the model's F. "auto" (default): "pca" when the model
      supports the segmentation start (2-level, Gaussian, linear transition, no inputs), has no
      ``projection_matrix`` of its own, no ``guide`` is passed and every step is fully observed.
    * ``start``: "segmentation" starts SVI from the hard-state EM fit
      (``models.gdm_start.segmentation_start``, best of ``num_restarts`` EM starts); "released" from the
      released code's random start; "auto" (default): "segmentation" where supported, else "released".
      A ``guide`` that carries its own ``start`` values is used as given. ``fit.start`` says which ran.

    Optimiser (the released code's): reparameterised Trace_ELBO with ``num_particles`` vectorised samples;
    clip_by_global_norm(clip_norm) -> AdamW(weight_decay) on :func:`learning_rate_schedule`.
    ``temperature``: None (the model's tau, 0.99), a float, or a callable step -> tau (e.g.
    :func:`temperature_schedule`). Early stopping as in the released code: stop once the mean per-step
    ELBO change over the last ``window`` steps is below ``tolerance``, checked at every step after
    ``min_steps`` (the run ends at the end of the chunk where this first happens, so at most
    ``chunk_size - 1`` extra steps at the final learning rate).

    Raises:
        FitError: non-finite start values (stage 'start') or a non-finite ELBO (stage 'svi'); the
            message names the step and the sites found non-finite.
    """
    begin = _time.perf_counter()
    if not isinstance(data, SequenceData):
        data = model.prepare(data)
    num_steps = check_positive_int(num_steps, "num_steps")
    num_particles = check_positive_int(num_particles, "num_particles")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    for name, value in dict(learning_rate=learning_rate, final_learning_rate=final_learning_rate, clip_norm=clip_norm).items():
        if not float(value) > 0:
            raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if temperature is None:
        tau_fn = lambda step: jnp.asarray(model.temperature)  # noqa: E731
    elif callable(temperature):
        tau_fn = temperature
    elif float(temperature) > 0:
        tau_fn = lambda step: jnp.asarray(float(temperature))  # noqa: E731
    else:
        raise ValueError(f"temperature: expected a positive number or a callable, got {temperature!r}")
    model, guide, start, projection = _resolve_start(model, guide, data, start, projection, num_restarts, seed)
    _check_start_values(guide, data.obs_dim, start)
    jdata = _device(data)

    optim = numpyro.optim.optax_to_numpyro(gdm_optimizer(learning_rate, final_learning_rate, warmup_steps, weight_decay, clip_norm))
    svi = SVI(model.program, guide, optim, Trace_ELBO(num_particles=num_particles, vectorize_particles=True))
    state = svi.init(jax.random.PRNGKey(seed), jdata, temperature=tau_fn(0))

    @jax.jit
    def run_chunk(state, steps, d):
        def body(s, step):
            s, loss = svi.update(s, d, temperature=tau_fn(step))
            return s, loss

        return jax.lax.scan(body, state, steps)

    losses: list[np.ndarray] = []
    done = 0
    while done < num_steps:
        n = min(chunk_size, num_steps - done)
        new_state, chunk_losses = run_chunk(state, jnp.arange(done, done + n), jdata)
        chunk_losses = np.asarray(chunk_losses)
        if not np.all(np.isfinite(chunk_losses)):
            bad = done + int(np.argmin(np.isfinite(chunk_losses)))
            _raise_nonfinite(svi, model, guide, state, jdata, bad, np.concatenate(losses + [chunk_losses]))
        state = new_state
        losses.append(chunk_losses)
        done += n
        if progress:
            print(f"step {done}: loss {chunk_losses[-1]:.2f}")
        if early_stopping and _first_stop(-np.concatenate(losses), done - n, window, tolerance, min_steps) is not None:
            break
    svi_params = jax.tree.map(np.asarray, svi.get_params(state))
    bad = sorted(k for k, v in svi_params.items() if not np.all(np.isfinite(v)))
    if bad:
        from ppl_switch.infer.errors import FitError

        raise FitError(f"fit_gdm_svi: stage 'svi': non-finite parameters {bad} after step {done} with a finite ELBO",
                       step=done, sites={"params": bad}, losses=np.concatenate(losses))
    return GDMFit(model, guide, svi_params, np.concatenate(losses), done, _time.perf_counter() - begin, data, seed,
                  start, projection)
