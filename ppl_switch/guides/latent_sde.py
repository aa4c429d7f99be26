"""The latent-SDE models' default SVI guide (gpSLDS and GP-SDE): a joint normal over the parameters and,
per trial, a Gauss-Markov chain over the latent path in the SDE's own form (the q(x) of "Modeling Latent
Neural Dynamics with Gaussian Process Switching Linear Dynamical Systems"), drawn by a parallel affine scan.

The guide reads the model only through its public interface (``program``, ``prepare``, ``init_values``,
``path_start_parameters``, ``latent_dim``, ``dt``), so it imports no model module.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import constraints

from ppl_switch.data import SequenceData
from ppl_switch.guides.full_rank import FullRankNormal
from ppl_switch.guides.gauss_markov import GaussMarkovChain
from ppl_switch.guides.init import init_to_values_then_median, parameter_program
from ppl_switch.guides.path_guide import ParameterBlockSetUp
from ppl_switch.ops.sde import affine_recursion

__all__ = ["LatentSDEGuide", "SDEPathChain"]


class SDEPathChain(GaussMarkovChain):
    """:class:`GaussMarkovChain` whose paths are drawn by a parallel affine scan (log-depth in T)."""

    def _path(self, eps):
        x0 = self.initial_loc + jnp.einsum("bij,bj->bi", self.initial_scale_tril, eps[:, 0])
        h = self.transition_offsets + jnp.einsum("btij,btj->bti", self.transition_scale_trils, eps[:, 1:])
        return affine_recursion(x0, self.transition_matrices, h)


class LatentSDEGuide(ParameterBlockSetUp):
    """A full-rank normal over all parameters (:class:`~ppl_switch.guides.full_rank.FullRankNormal`:
    AutoMultivariateNormal's family, parameters and start, set up by one compiled program; x hidden from it)
    and, per trial, the paper's q(x):
    x_{t+1} = (I - dt A_t) x_t + g_t + sqrt(dt) L_t eps, x_0 ~ N(mbar_0, L_0 L_0').

    The offsets are parameterised through the guide's mean path mbar (so that Adam's step size is in
    latent units): g_t = mbar_{t+1} - (I - dt A_t) mbar_t, hence E_q[x_t] = mbar_t exactly; in the
    paper's notation b_t = g_t / dt. Parameters (``numpyro.param``): ``x_mean`` mbar (B, T, K),
    ``x_initial_scale_tril`` L_0 (B, K, K), ``x_drift_matrices`` A (B, T-1, K, K) (stored divided by
    ``DRIFT_MATRIX_UNIT``), ``x_noise_scale_trils`` L (B, T-1, K, K). Start: A = 0, L = I (the prior's
    diffusion), mbar = the initial path. With ``global_affine=True`` the chain is mapped by one learned
    affine x -> S x + m shared by all trials (``x_global_scale_tril``, ``x_global_offset``; start S = I,
    m = 0): the same variational family, re-parameterised so that SVI can rescale the whole path, which
    per-step parameters do only slowly (benchmarks/results.md, gpSLDS history: start scales). Off by default: on the two-rotation
    benchmark the ELBO then prefers a path shrunk about tenfold and the flow is lost (benchmarks/results.md, gpSLDS history).
    """

    #: A_t is stored in units of this many 1/time so that Adam moves it at a useful rate
    DRIFT_MATRIX_UNIT = 10.0
    #: model sites the parameter guide does not see (drawn by the guide's own code)
    HIDDEN_SITES = ("x",)

    def __init__(self, model, data=None, init_values=None, init_scale: float = 0.05,
                 latent_scale: float = 3.0, global_affine: bool = False):
        self.model = model
        self.init_scale = float(init_scale)
        self.global_affine = bool(global_affine)
        # A data-driven start (``data`` only) sets the path; the parameters start at prior medians, as in
        # every measurement of the model card (the data-driven parameter start measured worse on the
        # two-rotation benchmark, seed 0: NMSE 0.121 against 0.090). Explicit ``init_values`` set every site.
        # The one exception is a start the model derives from the path alone to break a symmetry
        # (``path_start_parameters``: the quadratic partition's circle, see GPSLDS).
        path_only = init_values is None
        if init_values is None and data is not None:
            data = data if isinstance(data, SequenceData) else model.prepare(data)
            init_values = model.init_values(data, latent_scale=latent_scale)
        self.init_values = None if init_values is None else {k: np.asarray(v) for k, v in init_values.items()}
        if path_only:
            values = {} if self.init_values is None else model.path_start_parameters(self.init_values["x"])
        else:
            values = {k: v for k, v in self.init_values.items() if k not in self.HIDDEN_SITES}
        self.parameter_guide = FullRankNormal(
            parameter_program(self._visible_program(), self.HIDDEN_SITES, self.init_values),
            init_loc_fn=init_to_values_then_median(values), init_scale=self.init_scale
        )
        self.__name__ = type(self).__name__

    def _visible_program(self):
        """The program the parameter guide sets itself up on, before the hidden sites are blocked
        (subclasses pin sites here)."""
        return self.model.program

    def path(self, data: SequenceData) -> SDEPathChain:
        """Register the q(x) parameters and return the chain distribution (call inside a guide)."""
        B, T = data.y.shape[:2]
        K, dt = self.model.latent_dim, self.model.dt
        x_init = None if self.init_values is None else self.init_values.get("x")
        if x_init is None or x_init.shape != (B, T, K):
            x_init = np.zeros((B, T, K))
        x_init = jnp.asarray(x_init, jnp.result_type(float))
        eye = jnp.eye(K, dtype=x_init.dtype)
        mbar = numpyro.param("x_mean", x_init)
        L0 = numpyro.param("x_initial_scale_tril", jnp.broadcast_to(0.5 * eye, (B, K, K)), constraint=constraints.lower_cholesky)
        A = self.DRIFT_MATRIX_UNIT * numpyro.param("x_drift_matrices", jnp.zeros((B, T - 1, K, K), x_init.dtype))
        L = numpyro.param("x_noise_scale_trils", jnp.broadcast_to(eye, (B, T - 1, K, K)), constraint=constraints.lower_cholesky)
        if self.global_affine:
            # x -> S x + m with one lower-triangular S (K, K) and m (K,) for all trials and steps: the chain
            # family is closed under it (mbar -> S mbar + m, A -> S A S^-1, L -> S L), so q(x) is the same
            # family, but SVI can rescale or shift every path with K(K+3)/2 numbers instead of B T K.
            S = numpyro.param("x_global_scale_tril", eye, constraint=constraints.lower_cholesky)
            m = numpyro.param("x_global_offset", jnp.zeros(K, x_init.dtype))
            mbar = mbar @ S.T + m
            L0 = S @ L0
            A = S @ A @ jnp.linalg.inv(S)
            L = S @ L
        tm = jnp.asarray(data.time_mask)[:, 1:, None, None]
        F = jnp.where(tm, eye - dt * A, 0.0)  # padded steps decoupled from the trial (prior N(0, I) there)
        g = mbar[:, 1:] - jnp.einsum("btij,btj->bti", F, mbar[:, :-1])
        Lt = jnp.where(tm, math.sqrt(dt) * L, eye)
        return SDEPathChain(mbar[:, 0], L0, F, g, Lt)

    def __call__(self, data: SequenceData, *, record_log_lik: bool = False):
        out = self.parameter_guide(data, record_log_lik=record_log_lik)
        chain = self.path(data)
        with numpyro.plate("trial", data.num_trials):
            out["x"] = numpyro.sample("x", chain)
        return out

    def sample_parameters(self, key, params, num_samples: int, data=None) -> dict[str, np.ndarray]:
        """``num_samples`` draws of the parameters (not x) from the fitted guide, {site: (num_samples, ...)}:
        cheap extra draws for fixed-point and flow-field summaries (``data`` is not needed here)."""
        sub = {k: v for k, v in params.items() if not k.startswith("x_")}
        draws = self.parameter_guide.sample_posterior(key, sub, sample_shape=(num_samples,))
        return {k: np.asarray(v) for k, v in draws.items()}

    def sample_posterior(self, key, params, *args, sample_shape=(), **kwargs):
        from numpyro.infer import Predictive

        n = int(np.prod(sample_shape)) if sample_shape else 1
        return Predictive(self, params=params, num_samples=n)(key, *args, **kwargs)
