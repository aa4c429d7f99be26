"""The default SVI guide of the Poisson CLDS (:class:`~ppl_switch.models.clds.CLDS` with
``emission="poisson"``): a mean-field normal over the parameters and a Gauss–Markov chain over the latent
paths x (trials, time, latent), padded steps decoupled.

The guide reads the model only through its public interface (``program``, ``init_values``, ``latent_dim``),
so it imports no model module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer.autoguide import AutoNormal

from ppl_switch.data import SequenceData
from ppl_switch.guides.gauss_markov import GaussMarkovChain, gauss_markov_chain
from ppl_switch.guides.init import init_to_values_then_median, parameter_program

__all__ = ["CLDSPathGuide"]


class CLDSPathGuide:
    """Default SVI guide of the Poisson CLDS: a mean-field normal over the parameters (x hidden from it)
    and a Gauss–Markov chain over the paths x (:func:`ppl_switch.guides.gauss_markov.gauss_markov_chain`,
    padded steps decoupled). Called with the program's signature.

    ``init_values`` (site dict, e.g. :meth:`~ppl_switch.models.clds.CLDS.init_values`) sets where every site
    starts. ``data`` alone starts the path at :meth:`~ppl_switch.models.clds.CLDS.init_values` (Gaussian EM +
    Laplace) and the parameters at prior medians; without either, the parameters start at prior medians and x
    at 0. ``model`` is the CLDS (read through ``program``, ``init_values`` and ``latent_dim`` only).
    """

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05):
        if not init_scale > 0:
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        self.model = model
        self.init_scale = float(init_scale)
        # A data-driven start (``data`` only) sets the path; the parameters start at prior medians, as in the
        # model card's measurements. Explicit ``init_values`` set every site.
        path_only = init_values is None
        if init_values is None and data is not None:
            init_values = model.init_values(data)
        self.init_values = None if init_values is None else {k: np.asarray(v) for k, v in init_values.items()}
        values = {} if path_only else {k: v for k, v in self.init_values.items() if k != "x"}
        self.parameter_guide = AutoNormal(
            parameter_program(model.program, ("x",), self.init_values), init_loc_fn=init_to_values_then_median(values),
            init_scale=self.init_scale,
        )
        self.__name__ = "CLDSPathGuide"

    def __call__(self, data: SequenceData, *, record_log_lik: bool = False):
        out = self.parameter_guide(data, record_log_lik=record_log_lik)
        B, T = data.y.shape[:2]
        x0 = None if self.init_values is None else self.init_values.get("x")
        chain = gauss_markov_chain(
            "x", B, T, self.model.latent_dim, init_loc=x0, init_scale=self.init_scale, time_mask=data.time_mask
        )
        with numpyro.plate("trial", B):
            out["x"] = numpyro.sample("x", chain)
        return out

    def sample_posterior(self, key, params, *args, sample_shape=(), **kwargs):
        from numpyro.infer import Predictive

        n = int(np.prod(sample_shape)) if sample_shape else 1
        return Predictive(self, params=params, num_samples=n)(key, *args, **kwargs)

    @staticmethod
    def path_means(params, data: SequenceData) -> jax.Array:
        """(trials, time, latent) exact mean of q(x) at fitted guide parameters ``params`` (``Fit.params``)."""
        get = lambda n: jnp.asarray(params[f"x_{n}"])  # noqa: E731
        F = get("transition_matrices") * jnp.asarray(data.time_mask)[:, 1:, None, None]
        chain = GaussMarkovChain(get("initial_loc"), get("initial_scale_tril"), F, get("transition_offsets"),
                                 get("transition_scale_trils"))
        return chain.mean
