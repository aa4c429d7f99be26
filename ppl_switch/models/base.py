"""The interface every model in the zoo implements, so that runners, ArviZ output, the CLI and the
conformance suite treat all models alike.

A model object holds its configuration (number of states, latent dimension, emission family, ...) and
exposes its NumPyro program as :meth:`Model.program`. The program takes one :class:`SequenceData`
(padded trials + mask) and must:

* sample every parameter as a named site (shapes listed by :meth:`site_dims`);
* marginalise discrete states exactly (forward algorithm) where the model allows;
* add the data log-likelihood through sites that honour ``data.mask`` (padded steps contribute 0);
* record the pointwise log-likelihood as ``numpyro.deterministic("log_lik", ...)`` of shape
  (trials, time) -- marginal over discrete states -- only when ``record_log_lik=True`` (the runners
  compute it after fitting through :meth:`log_likelihood` instead, to keep the fitting graph small).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import jax
import numpy as np

from ppl_switch.data import SequenceData, as_sequence_data

Params = Mapping[str, Any]


def _not_defined(model, method: str) -> NotImplementedError:
    """The error a runner gets when it needs a method this model does not define."""
    return NotImplementedError(
        f"{type(model).__name__}.{method}() is not defined: a runner needs it; define it in your Model subclass "
        "(ppl_switch.models.base.Model lists what each method returns; tutorials/custom_model.py shows one)"
    )


class Model:
    """Base class. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str] = "model"
    #: number of discrete (or relaxed) states, or 0 for a model without them
    num_states: int = 0
    #: latent (continuous) dimension, or 0
    latent_dim: int = 0
    #: observation and input dimensions the model was built for (None = taken from the first data)
    obs_dim: Optional[int] = None
    input_dim: int = 0
    #: the emission family, e.g. "gaussian", "poisson", "bernoulli"
    emission: str = "gaussian"
    #: what ``ppl_switch.fit`` runs: (runner, options); see :mod:`ppl_switch.infer.recommended`
    recommended_runner: ClassVar[tuple[str, dict]] = ("svi", {})
    #: the ``fixed_points`` group a fit gets (:mod:`ppl_switch.analysis.fit_fixed_points`): None (no
    #: continuous dynamics: no group); "affine": the fixed points of the per-draw affine maps that
    #: :meth:`affine_dynamics` returns; "switching": per regime of the SLDS family (``dynamics_matrix``,
    #: ``dynamics_bias`` sites); "conditions": per condition of the inputs (CLDS); "drift_roots": the roots
    #: of a latent SDE's drift
    fixed_point_kind: ClassVar[Optional[str]] = None
    #: a small configuration (constructor options) that exercises the model's main features on tiny data;
    #: the conformance suite (tests/test_conformance.py) fits every registered model with it, so a new model
    #: is checked by declaring it. A subclass declares its own (the suite does not inherit a parent's).
    example_config: ClassVar[Optional[dict]] = None

    # ----- data ---------------------------------------------------------------------------------
    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        """Validate data for this model (shapes, dims, count/binary support) before compilation."""
        return as_sequence_data(
            y,
            mask=mask,
            lengths=lengths,
            inputs=inputs,
            input_dim=self.input_dim,
            obs_dim=self.obs_dim,
            counts=self.emission == "poisson",
            binary=self.emission == "bernoulli",
        )

    # ----- the generative program ---------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """The NumPyro model. Observes ``data.y`` under ``data.mask``."""
        raise _not_defined(self, "program")

    def default_guide(self):
        """The documented default SVI guide: a callable with the program's signature."""
        raise _not_defined(self, "default_guide")

    def affine_dynamics(self, samples: Mapping[str, Any], obs_dim: int):
        """For ``fixed_point_kind = "affine"``: the per-draw maps x -> A x + b whose fixed points the fit's
        ``fixed_points`` group holds, as (A (..., D, D), b (..., D), dims of the leading axes, name of the
        coordinate dim, number of leading coordinates of x* to keep or None), from posterior ``samples``
        {site: (chain, draw, ...)}."""
        raise _not_defined(self, "affine_dynamics")

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        """Named dims (beyond chain, draw) of every parameter and latent site, e.g.
        ``{"transition_matrix": ("state", "state_to"), "x": ("trial", "time", "latent")}``."""
        raise _not_defined(self, "site_dims")

    # ----- quantities computed from one parameter draw (jit/vmap-able) --------------------------
    def log_likelihood(self, params: Params, data: SequenceData) -> jax.Array:
        """(trials, time) pointwise log-likelihood, marginal over discrete states, 0 where unobserved."""
        raise _not_defined(self, "log_likelihood")

    def state_posterior(self, params: Params, data: SequenceData) -> dict[str, jax.Array]:
        """For models with states: ``{"state_probs": (trials, time, K), "viterbi": (trials, time) int}``."""
        raise _not_defined(self, "state_posterior")

    def sample_states(self, key, params: Params, data: SequenceData) -> jax.Array:
        """For models with states: one posterior sample of the state path, (trials, time) int."""
        raise _not_defined(self, "sample_states")

    def posterior_predictive(self, key, params: Params, data: SequenceData) -> jax.Array:
        """One draw of replicated observations, shaped like ``data.y``."""
        raise _not_defined(self, "posterior_predictive")

    # ----- simulation ---------------------------------------------------------------------------
    def simulate(self, key, num_trials: int, num_timesteps: int, *, params: Optional[Params] = None, inputs=None):
        """Draw data; returns ``(SequenceData, truth)`` where truth holds parameters and latent paths
        (``states`` (trials, time) and/or ``latents`` (trials, time, latent_dim))."""
        raise _not_defined(self, "simulate")

    def default_params(self, key) -> dict[str, Any]:
        """A well-behaved parameter set for simulation and tests."""
        raise _not_defined(self, "default_params")

    # ----- label switching ----------------------------------------------------------------------
    def state_features(self, params: Params) -> Optional[np.ndarray]:
        """(K, F) per-state features matched (Hungarian) across draws to align labels; None = no states."""
        return None

    def permute_states(self, params: Params, perm: np.ndarray) -> dict[str, Any]:
        """Params with states relabelled by ``perm`` (new state k = old state perm[k])."""
        return dict(params)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (saved beside fits so they can be reloaded)."""
        raise _not_defined(self, "config")
