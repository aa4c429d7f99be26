"""Amortised guides for the Gumbel Dynamical Model.

q(z_{1:T} | y_{1:T}) is a chain of Gumbel-softmax variables whose logits come from an encoder of the
observations; the model's parameters get point masses (MAP, numpyro.param + Delta):

* :class:`LinearGuide`: pi'_t = W y_t + b (paper §3.1; W init 0.8 N(0,1), b = 0), optionally sticky:
  pi'_t = W y_t + b + B z_{t-1} (B init 0).
* :class:`BiGRUGuide`: e_{1:T} = BiGRU(y_{1:T}) (hidden per direction, 64 in the released code),
  pi'_t = L e_t + l, optionally + B z_{t-1}.

Encoders are written in pure JAX with ``numpyro.param`` (no NN library: the GRU is 30 lines in
``ppl_switch.guides.gru``), so the guide adds no dependency. Guide parameters are global, so a new trial
is encoded by :meth:`encode` without any optimisation (amortisation).

:class:`MixtureGuide` (the 3-level model, paper App. C) adds a Gauss–Markov path guide for the latent x
and lets the z encoder also read x_{t-1}.

All guides take the program's signature ``(data, *, temperature=None, record_log_lik=False)``.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.data import SequenceData
from ppl_switch.distributions.relaxed import RelaxedMarkovChain
from ppl_switch.guides.gru import bigru_scan, gru_init

__all__ = ["LinearGuide", "BiGRUGuide", "MixtureGuide"]

MAP_SUFFIX = "_map"


class _AmortisedGuide:
    """Shared parts: MAP point masses for the model parameters and the relaxed chain over z."""

    prefix = "guide_"

    def __init__(self, model, *, sticky: bool = False, seed: int = 0, start: Optional[dict] = None):
        self.model = model
        self.sticky = bool(sticky)
        self.seed = int(seed)
        #: start values replacing the defaults of :meth:`init_values` (e.g. ``infer.gdm_start.segmentation_start``)
        self.start = None if start is None else {k: np.asarray(v) for k, v in dict(start).items()}

    # encoder-specific ------------------------------------------------------------------------------
    def init_encoder(self, rng: np.random.Generator, obs_dim: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encoder_logits(self, enc, y):
        """(..., T, K) logits from observations (..., T, N)."""
        raise NotImplementedError

    # shared ------------------------------------------------------------------------------------
    def init_values(self, obs_dim: int) -> dict[str, np.ndarray]:
        """Initial guide parameters: model parameter inits (``<site>_map``) and encoder weights."""
        rng = np.random.default_rng(self.seed)
        values = {name + MAP_SUFFIX: v for name, v in self.model.init_params(rng, obs_dim).items()}
        values.update({self.prefix + k: v for k, v in self.init_encoder(rng, obs_dim).items()})
        if self.sticky:
            values[self.prefix + "B"] = np.zeros((self.model.num_states, self.model.num_states))
        if self.start is not None:
            for name, value in self.start.items():
                if name not in values:
                    raise ValueError(f"start: {name!r} is not a value of this guide; expected names among {sorted(values)}")
                if value.shape != np.shape(values[name]):
                    raise ValueError(f"start: {name!r} has shape {value.shape}, expected {np.shape(values[name])}")
            values.update(self.start)
        return values

    def __call__(self, data: SequenceData, *, temperature=None, record_log_lik: bool = False):
        init, enc = self.point_estimates_and_encoder(data)
        with numpyro.plate("trial", data.num_trials):
            numpyro.sample("z", self.posterior(enc, data, temperature))

    def point_estimates_and_encoder(self, data: SequenceData) -> tuple[dict, dict]:
        """Register the model parameters as point estimates (Delta sites) and the encoder weights as
        params; returns (the initial values, the encoder weights without their prefix)."""
        init = self.init_values(data.obs_dim)
        for name, shape in self.model.site_shapes(data.obs_dim).items():
            value = numpyro.param(name + MAP_SUFFIX, jnp.asarray(init[name + MAP_SUFFIX], dtype=data.y.dtype))
            numpyro.sample(name, dist.Delta(value, event_dim=len(shape)))
        enc = {
            k[len(self.prefix) :]: numpyro.param(k, jnp.asarray(v, dtype=data.y.dtype))
            for k, v in init.items()
            if k.startswith(self.prefix)
        }
        return init, enc

    def posterior(self, enc, data: SequenceData, temperature=None) -> RelaxedMarkovChain:
        tau = self.model.temperature if temperature is None else temperature
        return RelaxedMarkovChain(tau, self.encoder_logits(enc, data.y), enc.get("B"), data.time_mask)

    @staticmethod
    def model_params(svi_params) -> dict:
        """The model's point estimates from SVI params (strips the ``_map`` suffix)."""
        return {k[: -len(MAP_SUFFIX)]: v for k, v in svi_params.items() if k.endswith(MAP_SUFFIX)}

    def encoder_params(self, svi_params) -> dict:
        return {k[len(self.prefix) :]: v for k, v in svi_params.items() if k.startswith(self.prefix)}

    def encode(self, svi_params, data: SequenceData, key, num_samples: int = 20, temperature=None):
        """(num_samples, trials, time, K) soft-state samples for (possibly new) data, no optimisation."""
        q = self.posterior(self.encoder_params(svi_params), data, temperature)
        return q.sample(key, (int(num_samples),))


class LinearGuide(_AmortisedGuide):
    """pi'_t = W y_t + b (+ B z_{t-1} if sticky); W (K, N) init 0.8 N(0, 1).

    ``start``: ``{name: value}`` replacing start values by name (``<site>_map``, ``guide_W``, ...), e.g.
    from :func:`ppl_switch.infer.gdm_start.segmentation_start`."""

    def __init__(self, model, *, sticky: bool = False, seed: int = 0, init_scale: float = 0.8, start: Optional[dict] = None):
        super().__init__(model, sticky=sticky, seed=seed, start=start)
        self.init_scale = float(init_scale)

    def init_encoder(self, rng, obs_dim):
        K = self.model.num_states
        # a separate stream so that the encoder init does not shift the model-parameter init
        enc_rng = np.random.default_rng([self.seed, 1])
        return {"W": self.init_scale * enc_rng.standard_normal((K, obs_dim)), "b": np.zeros(K)}

    def encoder_logits(self, enc, y):
        return y @ enc["W"].T + enc["b"]


class BiGRUGuide(_AmortisedGuide):
    """e_{1:T} = BiGRU(y_{1:T}) with ``hidden`` units per direction; pi'_t = L e_t + l (+ B z_{t-1})."""

    def __init__(self, model, *, hidden: int = 64, sticky: bool = False, seed: int = 0):
        super().__init__(model, sticky=sticky, seed=seed)
        self.hidden = int(hidden)

    def init_encoder(self, rng, obs_dim):
        enc_rng = np.random.default_rng([self.seed, 2])
        fwd, bwd = gru_init(enc_rng, obs_dim, self.hidden), gru_init(enc_rng, obs_dim, self.hidden)
        K = self.model.num_states
        out = {f"fwd_{k}": v for k, v in fwd.items()}
        out.update({f"bwd_{k}": v for k, v in bwd.items()})
        out["L"] = enc_rng.uniform(-1, 1, (K, 2 * self.hidden)) / np.sqrt(2 * self.hidden)
        out["l"] = np.zeros(K)
        return out

    def encoder_logits(self, enc, y):
        fwd = {k: enc[f"fwd_{k}"] for k in ("W", "U", "b")}
        bwd = {k: enc[f"bwd_{k}"] for k in ("W", "U", "b")}
        return bigru_scan(fwd, bwd, y) @ enc["L"].T + enc["l"]


class MixtureGuide(LinearGuide):
    """Guide for the 3-level mixture GDM (:class:`~ppl_switch.models.gdm_mixture.GDMMixture`)::

        q(x, z) = q(x) q(z | x, y)
        q(x)         = Gauss–Markov chain per trial (block-tridiagonal precision, ``gauss_markov_chain``)
        q(z | x, y)  = GS chain, logits W y_t + b + W_x x_{t-1} (+ B z_{t-1} if sticky)

    The paper (App. C) orders it q(z | x) q(x | z) with x's chain built from the sampled z; here x is
    drawn first from a free-form Gauss–Markov chain (the same family, with time-varying rather than
    z-indexed transition parameters) and z then conditions on x_{t-1} as in the paper's q(z_t | z_{t-1},
    x_{t-1}), so that one reparameterised pass samples both without a block-tridiagonal solve per draw.
    The z encoder is amortised; q(x) has per-trial parameters (initialised at pinv(C) (y - d), the
    paper's "initialize the samples for x using observation y").
    """

    path_prefix = "x_path"

    def __init__(self, model, *, sticky: bool = False, seed: int = 0, init_scale: float = 0.8, path_init_scale: float = 0.1):
        super().__init__(model, sticky=sticky, seed=seed, init_scale=init_scale)
        self.path_init_scale = float(path_init_scale)

    def init_encoder(self, rng, obs_dim):
        out = super().init_encoder(rng, obs_dim)
        out["Wx"] = np.zeros((self.model.num_states, self.model.latent_dim))
        return out

    def encoder_logits(self, enc, y, x):
        """(..., T, K) logits from y_t and x_{t-1} (no x term at t = 1)."""
        drive = (x[..., :-1, :] @ enc["Wx"].T)
        drive = jnp.concatenate([jnp.zeros_like(drive[..., :1, :]), drive], -2)
        return y @ enc["W"].T + enc["b"] + drive

    @staticmethod
    def initial_path(data: SequenceData, params):
        """(trials, time, D) pinv(C) (y - d) from ``<site>_map`` emission values, 0 where unobserved.
        NumPy values of C (the guide's init) are inverted in NumPy: no SVD is compiled for the init."""
        C = params["emission_matrix" + MAP_SUFFIX]
        pinv = np.linalg.pinv(C) if isinstance(C, np.ndarray) else jnp.linalg.pinv(C)
        d = jnp.asarray(params["emission_bias" + MAP_SUFFIX], dtype=data.y.dtype)
        centred = jnp.where(data.mask, data.y - d, 0.0)
        return centred @ jnp.asarray(pinv, dtype=data.y.dtype).T

    def path_guide(self, data: SequenceData, init):
        from ppl_switch.guides.gauss_markov import gauss_markov_chain

        B, T, _ = data.y.shape
        return gauss_markov_chain(
            self.path_prefix, B, T, self.model.latent_dim,
            init_loc=self.initial_path(data, init), init_scale=self.path_init_scale, time_mask=data.time_mask,
        )

    def __call__(self, data: SequenceData, *, temperature=None, record_log_lik: bool = False):
        init, enc = self.point_estimates_and_encoder(data)
        q_x = self.path_guide(data, init)
        with numpyro.plate("trial", data.num_trials):
            x = numpyro.sample("x", q_x)
            numpyro.sample("z", self.posterior(enc, data, x, temperature))

    def posterior(self, enc, data: SequenceData, x, temperature=None) -> RelaxedMarkovChain:
        tau = self.model.temperature if temperature is None else temperature
        return RelaxedMarkovChain(tau, self.encoder_logits(enc, data.y, x), enc.get("B"), data.time_mask)

    def encode(self, svi_params, data: SequenceData, key, num_samples: int = 20, temperature=None, x=None):
        """(num_samples, trials, time, K) soft states given a latent path ``x`` (trials, time, D); by
        default pinv(C) (y - d) with the fitted C, d, so that a new trial is encoded without optimisation."""
        if x is None:
            params = {k: v for k, v in svi_params.items() if k.endswith(MAP_SUFFIX)}
            x = self.initial_path(data, params)
        return self.posterior(self.encoder_params(svi_params), data, x, temperature).sample(key, (int(num_samples),))
