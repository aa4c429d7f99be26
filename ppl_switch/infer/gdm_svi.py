"""The Gumbel Dynamical Model's trainer: GS-BBVI, i.e. relaxed-state SVI (Wang, Kim, Shea-Brown & Sümbül,
"Interpretable time series analysis with Gumbel dynamics", §3), with the released code's optimiser,
learning-rate and temperature schedules and early stopping, by default from the data-driven start of
:mod:`ppl_switch.infer.gdm_start` (hard-state EM segmentation and a PCA projection).

The temperature schedule is a program argument of :class:`~ppl_switch.models.gdm.GDM`: each SVI step gets
tau(step) through ``svi.update(state, data, temperature=tau)``, inside one jitted lax.scan per chunk.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.guides.gdm_guides import LinearGuide, MixtureGuide
from ppl_switch.errors import FitError
from ppl_switch.infer.gdm_start import pca_projection, segmentation_start
from ppl_switch.models.gdm import GDM
from ppl_switch.results import build_inference_data

__all__ = [
    "GDMFit",
    "PROJECTIONS",
    "STARTS",
    "first_stop",
    "fit_gdm_svi",
    "gdm_optimizer",
    "learning_rate_schedule",
    "resolve_start",
    "temperature_schedule",
]


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


def first_stop(elbo: np.ndarray, chunk_start: int, window: int, tolerance: float, min_steps: int):
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
    """The configurations :func:`~ppl_switch.infer.gdm_start.segmentation_start` covers (and the
    measured default path was measured on): the 2-level GDM, Gaussian, linear transition, no inputs."""
    return isinstance(model, GDM) and model.emission == "gaussian" and model.transition == "linear" and not model.input_dim


def resolve_start(model, guide, data: SequenceData, start: str, projection: str, num_restarts: int, seed: int):
    """(model, guide, start used, projection used) for :func:`fit_gdm_svi`; see its docstring."""
    if start not in STARTS:
        raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
    supported = _supports_segmentation(model)
    own_guide = guide is not None
    for name, value, needed in (("start", start, "segmentation"), ("projection", projection, "pca")):
        if value == needed and not supported:
            raise ValueError(f"{name}={needed!r} needs a 2-level GDM with emission='gaussian', transition='linear' "
                             f"and no inputs; use {name}='auto' (falls back to the released code's) for this model")
    # auto: the measured best path where it applies (model card, "Default path"), else the released code's
    if projection == "auto":
        projection = "pca" if supported and not own_guide and model.projection_matrix is None else "model"
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
        start = "segmentation" if supported and linear else "released"
    if start == "segmentation":
        guide.start = segmentation_start(model, data, guide=guide, num_restarts=num_restarts, seed=seed)
    return model, guide, start, projection


def _check_start_values(guide, obs_dim: int, start: str) -> None:
    """FitError naming the start values that are not finite (before anything is compiled)."""
    bad = sorted(k for k, v in guide.init_values(obs_dim).items() if not np.all(np.isfinite(np.asarray(v))))
    if bad:
        raise FitError(f"fit_gdm_svi: stage 'start' ({start}): non-finite start values for {bad}; "
                       "pass start='released' or check the data's scale", step=0, sites={"params": bad})


def _nonfinite_sites(model, guide, params, data, key) -> dict[str, list[str]]:
    """Sites of the guide and of the program (replayed on the guide's draw) whose value or log-density is
    not finite at ``params``, in one compiled call (tracing op by op takes minutes on a T = 1000 series)."""
    @jax.jit
    def finite_flags(params, key):
        guide_key, model_key = jax.random.split(key)
        guide_tr = handlers.trace(handlers.substitute(handlers.seed(guide, guide_key), data=params)).get_trace(data)
        model_tr = handlers.trace(handlers.replay(handlers.seed(model.program, model_key), guide_tr)).get_trace(data)
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
      (:func:`~ppl_switch.infer.gdm_start.pca_projection`); the fit's ``model`` is then a copy of ``model`` with that
      ``projection_matrix``. "model" keeps the model's F. "auto" (default): "pca" when the model
      supports the segmentation start (2-level, Gaussian, linear transition, no inputs), has no
      ``projection_matrix`` of its own and no ``guide`` is passed.
    * ``start``: "segmentation" starts SVI from the hard-state EM fit
      (:func:`~ppl_switch.infer.gdm_start.segmentation_start`, best of ``num_restarts`` EM starts); "released" from the
      released code's random start; "auto" (default): "segmentation" where supported, else "released".
      With missing entries, both read the data interpolated in time where they need every entry
      (:func:`~ppl_switch.data.interpolate_missing`); the fit itself leaves them out.
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
    model, guide, start, projection = resolve_start(model, guide, data, start, projection, num_restarts, seed)
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
        if early_stopping and first_stop(-np.concatenate(losses), done - n, window, tolerance, min_steps) is not None:
            break
    svi_params = jax.tree.map(np.asarray, svi.get_params(state))
    bad = sorted(k for k, v in svi_params.items() if not np.all(np.isfinite(v)))
    if bad:
        raise FitError(f"fit_gdm_svi: stage 'svi': non-finite parameters {bad} after step {done} with a finite ELBO",
                       step=done, sites={"params": bad}, losses=np.concatenate(losses))
    return GDMFit(model, guide, svi_params, np.concatenate(losses), done, _time.perf_counter() - begin, data, seed,
                  start, projection)
