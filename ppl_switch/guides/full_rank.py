"""A full-rank (multivariate) normal guide whose set-up is one compiled program.

q(theta) = one MultivariateNormal(loc, L L') over the concatenated unconstrained values of every latent site,
each site then mapped to its support by ``biject_to(support)`` with the Jacobian term: the family of numpyro's
``AutoMultivariateNormal``, with its parameter names (``{prefix}_loc`` (n,), ``{prefix}_scale_tril`` (n, n)),
its auxiliary site ``_{prefix}_latent``, its layout of the vector (the sites in the program's order), its start and its draws, so that a fit with either gives the same numbers up to rounding.

What differs is the set-up, as for :class:`~ppl_switch.guides.mean_field.MeanFieldNormal` (whose compiled set-up
this guide uses): numpyro's finds the start by running the program op by op, ~600 single-op XLA compilations
for the gpSLDS's parameter block (benchmarks/results.md, session of 2026-12-07).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.util import constrain_fn

from ppl_switch.guides.mean_field import MeanFieldNormal

__all__ = ["FullRankNormal"]


class FullRankNormal(MeanFieldNormal):
    """Full-rank normal guide over every latent site of ``program``, set up by one compiled program.

    Args: as :class:`~ppl_switch.guides.mean_field.MeanFieldNormal` (``init_scale``: the start's
    ``scale_tril`` is ``init_scale`` times the identity). Every plate must be used whole (no subsampling):
    one vector holds all the sites' values.

    Call it with the program's arguments inside a numpyro handler stack (SVI does). ``get_posterior(params)``
    gives q as a MultivariateNormal over the vector; ``sample_posterior(key, params, sample_shape=...)``
    constrained draws of every latent and deterministic site; ``median(params)`` the constrained loc.
    """

    #: the scale factor's constraint (AutoMultivariateNormal's)
    scale_tril_constraint = AutoMultivariateNormal.scale_tril_constraint

    def set_up(self, *args, **kwargs) -> None:
        super().set_up(*args, **kwargs)
        subsampled = [frame.name for _, _, _, frames in self.sites for frame in frames
                      if frame.size != self.plate_sizes.get(frame.name, frame.size)]
        if subsampled:
            raise ValueError(f"FullRankNormal: plates {sorted(set(subsampled))} are subsampled; one vector holds every "
                             "site, so use MeanFieldNormal for a subsampled program")

    # ----- the vector's layout: sites in the program's order (numpyro's start dict's), each raveled in its
    # unconstrained shape (``init_locs`` comes out of a jitted program, which orders a dict's keys)
    def _layout(self) -> list[tuple[str, tuple]]:
        return [(name, tuple(np.shape(self.init_locs[name]))) for name, *_ in self.sites]

    def unpack_latent(self, latent) -> dict:
        """{site: unconstrained value} from the vector (its last axis)."""
        out, start = {}, 0
        for name, shape in self._layout():
            size = int(np.prod(shape))
            out[name] = jnp.reshape(latent[..., start:start + size], jnp.shape(latent)[:-1] + shape)
            start += size
        return out

    def _sample_latent(self, sample_shape=()):
        init = jnp.concatenate([jnp.ravel(self.init_locs[name]) for name, _ in self._layout()])
        loc = numpyro.param(f"{self.prefix}_loc", init)
        scale_tril = numpyro.param(f"{self.prefix}_scale_tril", jnp.identity(init.shape[0], dtype=init.dtype) * self.init_scale,
                                   constraint=self.scale_tril_constraint)
        q = dist.MultivariateNormal(loc, scale_tril=scale_tril)
        return numpyro.sample(f"_{self.prefix}_latent", q.expand_by(sample_shape), infer={"is_auxiliary": True})

    # ----- the guide
    def __call__(self, *args, **kwargs) -> dict:
        if self.sites is None:
            self.set_up(*args, **kwargs)
        unconstrained = self.unpack_latent(self._sample_latent())
        supports = {name: support for name, _, support, _ in self.sites}
        result = {}
        for name, value_u in unconstrained.items():
            support = supports[name]
            transform = biject_to(support)
            value = transform(value_u)
            if numpyro.get_mask() is False:
                log_density = 0.0
            else:  # q's density of the constrained value: the normal's, less the transform's log |det J|
                ldj = transform.log_abs_det_jacobian(value_u, value)
                log_density = -sum_rightmost(ldj, jnp.ndim(ldj) - jnp.ndim(value) + support.event_dim)
            result[name] = numpyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=support.event_dim))
        return result

    def get_posterior(self, params: dict) -> dist.MultivariateNormal:
        """q over the unconstrained vector at fitted ``params``."""
        return dist.MultivariateNormal(params[f"{self.prefix}_loc"], scale_tril=params[f"{self.prefix}_scale_tril"])

    def _constrain(self, unconstrained: dict) -> dict:
        """Every latent site constrained and the program's deterministic sites, at one set of unconstrained values."""
        if self.sites is None or self.model_args is None:
            raise RuntimeError(f"{type(self).__name__}: call the guide once with concrete data first (SVI's init does)")
        args, kwargs = self.model_args
        return handlers.seed(constrain_fn, rng_seed=0)(self.model, args, kwargs, unconstrained, return_deterministic=True)

    def sample_posterior(self, rng_key, params: dict, *args, sample_shape=(), **kwargs) -> dict:
        """``{site: sample_shape + shape}`` constrained draws of every latent and deterministic site."""
        latent = handlers.substitute(handlers.seed(self._sample_latent, rng_key), params)(sample_shape=sample_shape)
        if not sample_shape:
            return self._constrain(self.unpack_latent(latent))
        flat = jnp.reshape(latent, (-1, jnp.shape(latent)[-1]))
        draws = jax.lax.map(lambda one: self._constrain(self.unpack_latent(one)), flat)
        return jax.tree.map(lambda x: jnp.reshape(x, tuple(sample_shape) + jnp.shape(x)[1:]), draws)

    def median(self, params: dict) -> dict:
        """{site: constrained value at q's mean} for every latent site, and the deterministic sites there."""
        return self._constrain(self.unpack_latent(params[f"{self.prefix}_loc"]))
