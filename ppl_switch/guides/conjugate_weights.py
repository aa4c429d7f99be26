"""gpSLDS guide with the linear drift weights integrated out in closed form.

Given a path x and the other parameters (partition W, tau, centres c, scales m, sigma0, input matrix B),
the drift f(x) = sum_j pi_j(x) (A_j (x - c_j) + e_j) is linear in the weights w_k = [A_j[k, :], e_j[k]]_j
and the Euler increments are Gaussian in them, so p(A, e | x, theta) is Gaussian with the closed form of
:mod:`ppl_switch.ops.conjugate_drift` (the conjugacy the paper's variational EM uses for q(u)).

:class:`ConjugateWeightsGuide` draws theta from a joint normal (FullRankNormal with A, e and x
hidden), x from the Gauss–Markov path chain, and then the weights from that *exact* conditional, with its
full (D x D, D = J (K+1)) covariance. Because q(w | x, theta) = p(w | x, theta), the ELBO's terms in w
cancel for every draw:

    log p(w | theta) + log p(x | w, theta) - log q(w | x, theta) = log p(x | theta)   (weights marginalised),

so SVI optimises the collapsed objective E_q[log p(y | x) + log p(x | theta) + log p(theta) - log q(x, theta)]
with no Monte Carlo noise from w, and the fitted q(w) = E_q(x, theta)[p(w | x, theta)] is the weights'
posterior used for fixed points and flow fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers

from ppl_switch.data import SequenceData
from ppl_switch.guides.latent_sde import LatentSDEGuide
from ppl_switch.ops.conjugate_drift import weight_posterior

__all__ = ["ConjugateWeightsGuide", "WEIGHT_SITES"]

#: the GPSLDS sites integrated out in closed form
WEIGHT_SITES = ("regime_matrix", "regime_offset")
#: auxiliary guide site holding the flat weights (K, D); not a model site
AUX_SITE = "_drift_weights"


class ConjugateWeightsGuide(LatentSDEGuide):
    """Joint normal over the non-weight parameters, Gauss–Markov q(x), exact Gaussian q(A, e | x, theta).

    Args as :class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`; ``model`` must be a
    :class:`~ppl_switch.models.gpslds.GPSLDS`.
    """

    HIDDEN_SITES = ("x",) + WEIGHT_SITES

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05, latent_scale: float = 3.0,
                 global_affine: bool = False):
        # what the closed-form weight posterior reads from the model (a GPSLDS has them; guides import no model)
        needed = ("weight_regression_stats", "weight_prior_precision", "weights_to_sites")
        if not all(callable(getattr(model, name, None)) for name in needed):
            raise ValueError(f"model: expected a GPSLDS (drift linear in its weights, with {', '.join(needed)}), "
                             f"got {type(model).__name__}")
        super().__init__(model, data=data, init_values=init_values, init_scale=init_scale, latent_scale=latent_scale,
                         global_affine=global_affine)

    def _visible_program(self):
        # The parameter guide's set-up runs the program with the hidden sites drawn from the prior (the
        # path too, unless a start path is given); with A, e ~ prior the prior path x (2500 steps) depends
        # explosively on the visible parameters and its gradient overflows in float32. Zero weights make
        # f = 0 there: x is then free of the parameters.
        J, K = self.model.num_states, self.model.latent_dim
        zero_weights = {"regime_matrix": np.zeros((J, K, K)), "regime_offset": np.zeros((J, K))}
        return handlers.substitute(self.model.program, data=zero_weights)

    def weight_conditional(self, params, x, data: SequenceData) -> dist.Distribution:
        """p(w | x, theta) as a distribution over the flat weights (K, D): column k of the drift regression
        in row k, all rows sharing one precision."""
        model = self.model
        stats = model.weight_regression_stats(params, x, data)
        mean, precision, _ = weight_posterior(model.weight_prior_precision(params), stats, model.dt)
        K = model.latent_dim
        return dist.MultivariateNormal(mean.T, precision_matrix=jnp.broadcast_to(precision, (K,) + precision.shape)).to_event(1)

    def __call__(self, data: SequenceData, *, record_log_lik: bool = False):
        out = self.parameter_guide(data, record_log_lik=record_log_lik)
        chain = self.path(data)
        with numpyro.plate("trial", data.num_trials):
            x = numpyro.sample("x", chain)
        out["x"] = x
        w = numpyro.sample(AUX_SITE, self.weight_conditional(out, x, data), infer={"is_auxiliary": True})
        for name, value in self.model.weights_to_sites(w).items():
            # a reshape of the auxiliary draw: Delta adds no density (unit Jacobian)
            out[name] = numpyro.sample(name, dist.Delta(value, event_dim=value.ndim))
        return out

    def sample_parameters(self, key, params, num_samples: int, data=None) -> dict[str, np.ndarray]:
        """``num_samples`` joint draws of all parameters (x excluded), {site: (num_samples, ...)}: each draws
        theta and a path from the guide, then the weights from their conditional. Needs ``data``."""
        if data is None:
            raise ValueError("data: ConjugateWeightsGuide.sample_parameters needs the fitted SequenceData "
                             "(the weights' conditional depends on the path)")
        data = data if isinstance(data, SequenceData) else self.model.prepare(data)

        def one(k):
            tr = handlers.trace(handlers.seed(handlers.substitute(self, data=params), k)).get_trace(data)
            return {name: site["value"] for name, site in tr.items()
                    if site["type"] == "sample" and name != "x" and not site["infer"].get("is_auxiliary")}

        keys = jax.random.split(key, num_samples)
        draws = jax.jit(lambda ks: jax.lax.map(one, ks, batch_size=min(10, num_samples)))(keys)
        return {k: np.asarray(v) for k, v in draws.items()}
