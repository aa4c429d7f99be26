"""Path guides: a mean-field normal (AutoNormal's family, set up by one compiled program:
:class:`~ppl_switch.guides.mean_field.MeanFieldNormal`) over a model's parameters, with its path sites hidden from
it, and a Gauss–Markov chain over one path site (trials, time, latent), padded steps decoupled
(:func:`ppl_switch.guides.gauss_markov.gauss_markov_chain`). The default SVI guide of the SLDS family
(:class:`SLDSGuide`) and of the Poisson CLDS (:class:`CLDSPathGuide`).

A path guide reads its model only through the model's public interface (``program``, ``latent_dim``,
``init_values(data)``, and where the model has them ``path_site``, ``path_sites`` and
``latent_site_values(values, data)``), so it imports no model module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ppl_switch.data import SequenceData
from ppl_switch.guides.gauss_markov import GaussMarkovChain, gauss_markov_chain
from ppl_switch.guides.init import init_to_values_then_median, parameter_program
from ppl_switch.guides.mean_field import MeanFieldNormal

__all__ = ["ParameterBlockSetUp", "PathGuide", "SLDSGuide", "CLDSPathGuide"]


class ParameterBlockSetUp:
    """A guide whose parameters are drawn by ``self.parameter_guide`` (a compiled-set-up
    :class:`~ppl_switch.guides.mean_field.MeanFieldNormal` or its full-rank form) and whose other parameters need
    no start search: ``fit_svi`` sets the block up eagerly and then compiles the rest of ``svi.init``."""

    def set_up(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        """Set the parameter block up (its start) before a compiled ``svi.init`` traces this guide; inside a
        seeded handler, with the key its first draw in ``__call__`` would get."""
        if self.parameter_guide.sites is None:
            self.parameter_guide.set_up(data, record_log_lik=record_log_lik)


class PathGuide(ParameterBlockSetUp):
    """A mean-field normal over the parameters and a Gauss–Markov chain over ``path_site``; called with the program's
    signature.

    Args:
        model: the model (read through its public interface, module docstring).
        data: with ``init_values`` None, the path starts at ``model.init_values(data)``'s path and the
            parameters at prior medians; with ``init_values`` too, they are first mapped to the model's
            path coordinates by ``model.latent_site_values`` where the model has it.
        init_values: site dict (e.g. a ``fit_em`` estimate) setting where every site starts.
        init_scale: the start scale of every guide factor (> 0).
        path_site: the site the chain draws, (trials, time, latent).
        hidden_sites: the program's path sites the parameter guide must not see.
        ignored_values: start values that are no site of the parameter guide.
    """

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05, *, path_site: str = "x",
                 hidden_sites: tuple = ("x",), ignored_values: tuple = ()):
        if not init_scale > 0:
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        self.model = model
        self.init_scale = float(init_scale)
        self.path_site = path_site
        # A data-driven start (``data`` only) sets the path; the parameters start at prior medians, as in the
        # model cards' measurements. Explicit ``init_values`` set every site.
        path_only = init_values is None
        if init_values is None and data is not None:
            init_values = model.init_values(data)
        elif init_values is not None and data is not None and hasattr(model, "latent_site_values"):
            init_values = model.latent_site_values(init_values, data)
        self.init_values = None if init_values is None else {k: np.asarray(v) for k, v in init_values.items()}
        skip = set(hidden_sites) | set(ignored_values)
        values = {} if path_only else {k: v for k, v in self.init_values.items() if k not in skip}
        # its start (prior medians, the start path's density and gradient) is one compiled program; op by op
        # it was hundreds of eager compilations, about half of a first SLDS fit (benchmarks/results.md)
        self.parameter_guide = MeanFieldNormal(
            parameter_program(model.program, tuple(hidden_sites), self.init_values),
            init_loc_fn=init_to_values_then_median(values), init_scale=self.init_scale,
        )
        self.__name__ = type(self).__name__

    def __call__(self, data: SequenceData, *, record_log_lik: bool = False):
        out = self.parameter_guide(data, record_log_lik=record_log_lik)
        B, T = data.y.shape[:2]
        site = self.path_site
        x0 = None if self.init_values is None else self.init_values.get(site)
        chain = gauss_markov_chain(
            site, B, T, self.model.latent_dim, init_loc=x0, init_scale=self.init_scale, time_mask=data.time_mask
        )
        with numpyro.plate("trial", B):
            out[site] = numpyro.sample(site, chain)
        return out

    def sample_posterior(self, key, params, *args, sample_shape=(), **kwargs):
        from numpyro.infer import Predictive

        n = int(np.prod(sample_shape)) if sample_shape else 1
        return Predictive(self, params=params, num_samples=n)(key, *args, **kwargs)


class SLDSGuide(PathGuide):
    """The SLDS family's default guide: the chain over the model's path site (x, ``x_innovations`` for a
    whitened model, ``x - m0`` for an anchored one: a Gauss–Markov family in those coordinates), every path
    parameterisation hidden from the parameter guide. For a whitened model pass ``data`` with
    ``init_values`` so that the start of x can be turned into innovations. ``data`` alone starts the path at
    the PCA start of the model's ``init_values`` and the parameters at prior medians: the PCA/AR(1)
    parameter start measured worse (state accuracy 0.756 against 0.817 at T = 1000,
    ``benchmarks/slds.py --paths svi``)."""

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05):
        super().__init__(model, data, init_values, init_scale, path_site=model.path_site,
                         hidden_sites=tuple(model.path_sites), ignored_values=("q_state_probs",))


class CLDSPathGuide(PathGuide):
    """The Poisson CLDS's default guide: the chain over the paths x. ``data`` alone starts the path at the
    model's cheap ``init_values`` (Kalman-smoothed log counts at a PCA start, no EM) and the parameters at
    prior medians; ``ppl_switch.fit`` passes ``init_values={"x": ...}``, the Laplace paths after a Gaussian EM
    on the log counts (``ppl_switch.infer.clds_em.clds_guide_start``), with the same parameter start. Without
    either, the parameters start at prior medians and x at 0."""

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05):
        super().__init__(model, data, init_values, init_scale)

    @staticmethod
    def path_means(params, data: SequenceData) -> jax.Array:
        """(trials, time, latent) exact mean of q(x) at fitted guide parameters ``params`` (``Fit.params``)."""
        get = lambda n: jnp.asarray(params[f"x_{n}"])  # noqa: E731
        F = get("transition_matrices") * jnp.asarray(data.time_mask)[:, 1:, None, None]
        chain = GaussMarkovChain(get("initial_loc"), get("initial_scale_tril"), F, get("transition_offsets"),
                                 get("transition_scale_trils"))
        return chain.mean
