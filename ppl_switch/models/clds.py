"""Conditionally linear dynamical system (CLDS; Geadah, Nejatbakhsh, Lipshutz, Pillow & Williams).

Given an observed condition u_t (e.g. head direction), the latent state evolves linearly with
parameters that are smooth functions of u::

    x_1     ~ N(m(u_1), Q_1)
    x_{t+1} = A(u_t) x_t + b(u_t) + N(0, Q)          (A, b at the condition of step t)
    y_t     = C(u_t) x_t + d(u_t) + N(0, R)          (d = 0 unless ``emission_bias=True``)
    or y_t  ~ Poisson(bin_size * link(C(u_t) x_t + d(u_t)))     (``emission="poisson"``)

Every entry of A, b, C, d, m is a weight-space GP: ``M(u)[i, j] = sum_l phi_l(u) W_M[l, i, j]`` with
``W_M ~ N(0, 1)`` iid and the basis ``phi`` from :mod:`ppl_switch.ops.basis` (Fourier features on the
circle/torus for angles, HSGP for non-periodic conditions, a linear basis for additive inputs, a
constant basis for parameters that do not vary with u). Conditioned on u the model is a time-varying
linear-Gaussian state space model, so x is marginalised exactly by the Kalman filter
(:mod:`ppl_switch.ops.kalman`): NUTS and SVI run over the basis weights and the covariances only.

With Poisson emissions x cannot be marginalised in closed form: the path x_{1:T} of every trial is one
block site ``x`` (trials, time, latent) whose prior is the conditionally linear Gauss–Markov chain above
(steps past a trial's length get N(0, I), independent of the trial), and the default SVI guide
(:class:`~ppl_switch.guides.path_guide.CLDSPathGuide`) is a Gauss–Markov path guide
(:mod:`ppl_switch.guides.gauss_markov`) plus a mean-field normal over the parameters. For analyses that
need the latent posterior of new trials (co-smoothing, tuning curves) :meth:`CLDS.smooth` uses a Laplace
approximation at the posterior mode of x given the parameters, found by Newton's method, where each step is
one Kalman smoother pass on Gaussian pseudo-observations (the log-concave case of Paninski et al. 2010, as
suggested in the paper's §2.3).

Gaussian emissions are fitted by the exact MAP-EM of the paper (ECM: Kalman-smoother E-step, closed-form
conditional M-steps), which lives in the inference layer, :mod:`ppl_switch.infer.clds_em` (``fit_em`` finds
it; :func:`~ppl_switch.infer.clds_em.clds_start` is the EM-based SVI start that ``ppl_switch.fit`` uses).
Paper: Geadah, Nejatbakhsh, Lipshutz, Pillow & Williams, "Modeling Neural Activity with Conditionally Linear
Dynamical Systems".
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.compile_cache import labelled_model_key
from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.guides.path_guide import CLDSPathGuide
from ppl_switch.guides.gauss_markov import GaussMarkovChain
from ppl_switch.guides.init import init_to_values_then_median
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_mvn_log_prob_cov, masked_poisson_log_prob
from ppl_switch.models.base import Model, Params
from ppl_switch.ops.basis import ConstantBasis, FourierBasis, basis_from_config, basis_to_config, evaluate
from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter, lgssm_simulate, lgssm_smoother
from ppl_switch.ops.switching import symmetrize
from ppl_switch.ops.sde import inverse_link

PARAMETER_FUNCTIONS = ("A", "b", "C", "d", "m")
#: Newton iterations of the Laplace smoother (Poisson emissions)
LAPLACE_ITERS = 20
_COV_SITES = {
    "dynamics_cov": ("dynamics_scale", "dynamics_corr_chol"),
    "initial_cov": ("initial_scale", "initial_corr_chol"),
    "emission_cov": ("emission_scale", "emission_corr_chol"),
}


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def cov_from_sites(scale, corr_chol=None):
    """Covariance from standard deviations (..., D) and a correlation Cholesky factor (..., D, D)."""
    if corr_chol is None:
        return scale**2
    L = scale[..., :, None] * corr_chol
    return L @ _mT(L)


def _scale_tril(scale, corr_chol):
    """Lower Cholesky factor diag(scale) L_corr of the covariance of :func:`cov_from_sites`."""
    return scale[..., :, None] * corr_chol


def sites_from_cov(cov, full: bool = True):
    """Inverse of :func:`cov_from_sites`: (scale, corr_chol) of a covariance (corr_chol None if not full)."""
    scale = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1)) if cov.ndim >= 2 else jnp.sqrt(cov)
    if not full:
        return scale, None
    corr = cov / (scale[..., :, None] * scale[..., None, :])
    return scale, jnp.linalg.cholesky(symmetrize(corr))


def _jit_method(fn):
    """jit a method with ``self`` static (models hash by identity), so that repeated eager calls
    (analyses, tests, runners) compile once per shape instead of dispatching op by op."""
    jitted = jax.jit(fn, static_argnums=0)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return jitted(self, *args, **kwargs)

    return wrapper


class CLDS(Model):
    """Conditionally linear dynamical system with weight-space GP priors over A, b, C, d, m.

    Args:
        latent_dim: D.
        obs_dim: N (None = taken from the data).
        input_dim: number of condition columns in ``inputs`` (>= 1).
        basis: basis of every parameter listed in ``varying`` (default: Fourier features on the circle,
            N = 5 frequencies (L = 9), sigma = 0.5, kappa = 0.1 -- the paper's synthetic setting).
        varying: which of "A", "b", "C", "d", "m" vary with u (use ``basis``); the others are constant in
            u with prior N(0, constant_scale^2) on each entry.
        bases: per-parameter bases overriding the two above, e.g. ``{"b": LinearBasis()}`` with A
            constant gives the LDS with additive inputs.
        emission_bias: include d(u). Default: False for Gaussian emissions (d = 0 as in all the
            paper's experiments), True for Poisson (d is the log baseline rate).
        emission_cov: "diag" (default) or "full" R (Gaussian emissions only).
        constant_scale: prior sd of the entries of parameters that do not vary with u.
        fixed: values held fixed (not sampled, not updated by EM): "C" (N, D) constant emission matrix
            (needs C constant), "dynamics_cov", "initial_cov" (D, D), "emission_cov" ((N,) variances for
            diag or (N, N)), or any site name with its value.
        emission: "gaussian" (x marginalised by the Kalman filter; EM, SVI, NUTS) or "poisson"
            (x a block site; SVI with the path guide, or NUTS; no EM).
        link: "exp" (default) or "softplus", the Poisson rate function of C x + d.
        bin_size: Poisson rate multiplier (bin width), > 0.
    """

    name = "clds"
    example_config = dict(latent_dim=2, obs_dim=3, input_dim=1, basis={"type": "FourierBasis", "num_frequencies": 3})
    fixed_point_kind = "conditions"  # x*(u) = (I - A(u))^-1 b(u) on a grid of input conditions
    recommended_runner = ("em", {"num_iters": 200, "requires": {"emission": ("gaussian",)}, "otherwise": ("svi", {"num_steps": 1000, "learning_rate": 0.01})})  # exact MAP-EM; Poisson: path-guide SVI
    num_states = 0

    def __init__(
        self,
        latent_dim: int = 2,
        obs_dim: Optional[int] = None,
        input_dim: int = 1,
        *,
        basis=None,
        varying=("A", "b", "m"),
        bases: Optional[Mapping[str, Any]] = None,
        emission_bias: Optional[bool] = None,
        emission_cov: str = "diag",
        constant_scale: float = 1.0,
        fixed: Optional[Mapping[str, Any]] = None,
        emission: str = "gaussian",
        link: str = "exp",
        bin_size: float = 1.0,
    ):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = None if obs_dim is None else check_positive_int(obs_dim, "obs_dim")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        if emission not in ("gaussian", "poisson"):
            raise ValueError(f"emission: expected 'gaussian' or 'poisson', got {emission!r}")
        self.emission = emission
        if emission_cov not in ("diag", "full"):
            raise ValueError(f"emission_cov: expected 'diag' or 'full', got {emission_cov!r}")
        if emission == "poisson" and emission_cov != "diag":
            raise ValueError("emission_cov: only used with emission='gaussian' (Poisson has no R); leave it 'diag'")
        self.emission_cov = emission_cov
        inverse_link(link)  # validates the name
        self.link = link
        try:
            self.bin_size = float(bin_size)
        except (TypeError, ValueError):
            raise ValueError(f"bin_size: expected a positive number, got {bin_size!r}") from None
        if not (math.isfinite(self.bin_size) and self.bin_size > 0):
            raise ValueError(f"bin_size: expected a positive number, got {bin_size!r}")
        if not constant_scale > 0:
            raise ValueError(f"constant_scale: expected a positive number, got {constant_scale!r}")
        self.constant_scale = float(constant_scale)
        self.emission_bias = (emission == "poisson") if emission_bias is None else bool(emission_bias)
        varying = tuple(varying)
        bad = [v for v in varying if v not in PARAMETER_FUNCTIONS]
        if bad:
            raise ValueError(f"varying: unknown parameter(s) {bad}; choose from {PARAMETER_FUNCTIONS}")
        self.varying = varying
        self.basis = FourierBasis() if basis is None else basis_from_config(basis)
        bases = {k: basis_from_config(v) for k, v in dict(bases or {}).items()}
        bad = [k for k in bases if k not in PARAMETER_FUNCTIONS]
        if bad:
            raise ValueError(f"bases: unknown parameter(s) {bad}; choose from {PARAMETER_FUNCTIONS}")
        self.bases = {}
        for p in PARAMETER_FUNCTIONS:
            if p == "d" and not self.emission_bias:
                continue
            self.bases[p] = bases.get(p, self.basis if p in varying else ConstantBasis(self.constant_scale))
        self._custom_bases = bases
        for p, b in self.bases.items():
            cols = getattr(b, "columns", ())
            if cols and max(cols) >= self.input_dim:
                raise ValueError(f"bases[{p!r}]: reads condition column {max(cols)} but input_dim={self.input_dim}")
        self.fixed = self._normalise_fixed(dict(fixed or {}))

    # ----- configuration helpers ----------------------------------------------------------------
    def _normalise_fixed(self, fixed: dict) -> dict:
        out = {}
        D = self.latent_dim
        for key, value in fixed.items():
            value = np.asarray(value, dtype=float)
            if key == "C":
                if not isinstance(self.bases["C"], ConstantBasis):
                    raise ValueError("fixed: 'C' can only be fixed when C does not vary with u")
                if value.ndim != 2 or value.shape[1] != D or (self.obs_dim and value.shape[0] != self.obs_dim):
                    raise ValueError(f"fixed['C']: expected shape (obs_dim, {D}), got {value.shape}")
                out["W_C"] = value[None] / self.bases["C"].scale
            elif key in _COV_SITES:
                if key == "emission_cov" and self.emission == "poisson":
                    raise ValueError("fixed['emission_cov']: Poisson emissions have no emission covariance")
                full = key != "emission_cov" or self.emission_cov == "full"
                if key == "emission_cov" and not full:
                    if value.ndim != 1:
                        raise ValueError(f"fixed['emission_cov']: expected (obs_dim,) variances, got {value.shape}")
                    out["emission_scale"] = np.sqrt(value)
                    continue
                if value.ndim != 2 or value.shape[0] != value.shape[1] or np.any(np.linalg.eigvalsh(value) <= 0):
                    raise ValueError(f"fixed[{key!r}]: expected a positive definite square matrix, got {value.shape}")
                scale, chol = sites_from_cov(jnp.asarray(value))
                out[_COV_SITES[key][0]], out[_COV_SITES[key][1]] = np.asarray(scale), np.asarray(chol)
            else:
                out[key] = value
        return out

    def _obs_dim(self, data: Optional[SequenceData] = None) -> int:
        if data is not None:
            return data.obs_dim
        if self.obs_dim is None:
            if "W_C" in self.fixed:
                return int(self.fixed["W_C"].shape[1])
            raise ValueError("obs_dim: CLDS was built with obs_dim=None; pass obs_dim or data")
        return self.obs_dim

    def weight_shapes(self, obs_dim: int) -> dict[str, tuple]:
        """Shapes of the weight sites: W_A (L_A, D, D), W_b (L_b, D), W_C (L_C, N, D), W_d (L_d, N), W_m (L_m, D)."""
        D, N = self.latent_dim, obs_dim
        value_shapes = {"A": (D, D), "b": (D,), "C": (N, D), "d": (N,), "m": (D,)}
        return {f"W_{p}": (b.num_features,) + value_shapes[p] for p, b in self.bases.items()}

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "W_A": ("basis_A", "latent", "latent_from"),
            "W_b": ("basis_b", "latent"),
            "W_C": ("basis_C", "obs", "latent"),
            "W_d": ("basis_d", "obs"),
            "W_m": ("basis_m", "latent"),
            "dynamics_scale": ("latent",),
            "dynamics_corr_chol": ("latent", "latent_from"),
            "initial_scale": ("latent",),
            "initial_corr_chol": ("latent", "latent_from"),
            "emission_scale": ("obs",),
            "emission_corr_chol": ("obs", "obs_from"),
            "x": ("trial", "time", "latent"),
        }
        names = set(self._site_names())
        return {k: v for k, v in dims.items() if k in names and k not in self.fixed}

    def _site_names(self):
        names = [f"W_{p}" for p in self.bases]
        names += ["dynamics_scale", "dynamics_corr_chol", "initial_scale", "initial_corr_chol"]
        if self.emission == "poisson":
            return names + ["x"]
        names.append("emission_scale")
        if self.emission_cov == "full":
            names.append("emission_corr_chol")
        return names

    def config(self) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "obs_dim": self.obs_dim,
            "input_dim": self.input_dim,
            "basis": basis_to_config(self.basis),
            "varying": list(self.varying),
            "bases": {k: basis_to_config(v) for k, v in self._custom_bases.items()},
            "emission_bias": self.emission_bias,
            "emission_cov": self.emission_cov,
            "constant_scale": self.constant_scale,
            "fixed": {k: np.asarray(v).tolist() for k, v in self.fixed.items()},
            "emission": self.emission,
            "link": self.link,
            "bin_size": self.bin_size,
        }

    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        if inputs is None and not isinstance(y, SequenceData):
            raise DataError(f"inputs: CLDS needs the observed conditions u as inputs (trials, time, {self.input_dim})")
        data = super().prepare(y, mask=mask, lengths=lengths, inputs=inputs)
        if data.inputs is None:
            raise DataError(f"inputs: CLDS needs the observed conditions u as inputs (trials, time, {self.input_dim})")
        if "W_C" in self.fixed and self.fixed["W_C"].shape[1] != data.obs_dim:
            raise DataError(f"y: fixed C has {self.fixed['W_C'].shape[1]} rows but y has obs_dim {data.obs_dim}")
        return data

    # ----- parameters -> time-varying LGSSM -----------------------------------------------------
    def with_fixed(self, params: Params) -> dict:
        """Params completed with the fixed values (as arrays)."""
        out = {k: jnp.asarray(v) for k, v in self.fixed.items()}
        out.update({k: v for k, v in params.items() if k not in self.fixed})
        return out

    def covariances(self, params: Params) -> dict:
        """Q (D, D), Q_1 (D, D) and, for Gaussian emissions, R ((N,) variances for diag, (N, N) for full)."""
        p = self.with_fixed(params)
        out = {
            "dynamics_cov": cov_from_sites(p["dynamics_scale"], p["dynamics_corr_chol"]),
            "initial_cov": cov_from_sites(p["initial_scale"], p["initial_corr_chol"]),
        }
        if self.emission == "gaussian":
            out["emission_cov"] = cov_from_sites(p["emission_scale"], p.get("emission_corr_chol"))
        return out

    def parameter_functions(self, params: Params, u) -> dict:
        """Evaluate A(u) (..., D, D), b(u) (..., D), C(u) (..., N, D), d(u) (..., N), m(u) (..., D)
        at conditions u (..., input_dim). Works for one parameter draw (vmap over draws)."""
        p = self.with_fixed(params)
        return {name: evaluate(b(u), p[f"W_{name}"]) for name, b in self.bases.items()}

    def _value(self, name, p, u):
        """A parameter function along a trial: constant (no time axis) when its basis is constant."""
        basis = self.bases[name]
        if isinstance(basis, ConstantBasis):
            return evaluate(basis(u[:1])[0], p[f"W_{name}"])
        return evaluate(basis(u), p[f"W_{name}"])

    def _initial_mean(self, p, u):
        """m(u_1) (D,) of one trial with conditions u (T, input_dim)."""
        if isinstance(self.bases["m"], ConstantBasis):
            return self._value("m", p, u)
        return self._value("m", p, u[:1])[0]

    def _emission_bias(self, p, u):
        """d(u) along one trial: (T, N), or (N,) when constant (zeros without d)."""
        if "d" in self.bases:
            return self._value("d", p, u)
        return jnp.zeros((p["W_C"].shape[1],), jnp.result_type(u, float))

    def lgssm(self, params: Params, u, emission_cov_diag=None) -> LGSSMParams:
        """The time-varying LGSSM of one trial with conditions u (T, input_dim).

        ``emission_cov_diag`` (T, N) replaces R by diagonal variances: the Gaussian pseudo-observations
        of the Laplace smoother (required for Poisson emissions, which have no R)."""
        p = self.with_fixed(params)
        cov = self.covariances(p)
        if emission_cov_diag is None:
            if self.emission != "gaussian":
                raise ValueError("emission_cov_diag: a Poisson CLDS has no emission covariance; pass "
                                 "pseudo-observation variances (T, N)")
            R, full = cov["emission_cov"], self.emission_cov == "full"
        else:
            R, full = emission_cov_diag, False
        return LGSSMParams(
            initial_mean=self._initial_mean(p, u),
            initial_cov=cov["initial_cov"],
            dynamics_matrix=self._value("A", p, u[:-1]),
            dynamics_bias=self._value("b", p, u[:-1]),
            dynamics_cov=cov["dynamics_cov"],
            emission_matrix=self._value("C", p, u),
            emission_bias=self._emission_bias(p, u),
            emission_cov=R if full else None,
            emission_cov_diag=None if full else R,
        )

    # ----- the latent path as a site (Poisson emissions) ----------------------------------------
    def path_distribution(self, params: Params, data: SequenceData) -> GaussMarkovChain:
        """The CLDS prior of every trial's path as a Gauss–Markov chain, batch (trials,), event
        (time, latent)::

            x_1 ~ N(m(u_1), Q_1),   x_{t+1} ~ N(A(u_t) x_t + b(u_t), Q)

        Steps past a trial's length are N(0, I) and independent of the trial (padding adds a term that
        does not involve the trial, and the path guide gives them the same treatment)."""
        p = self.with_fixed(params)
        u = jnp.asarray(data.inputs)
        B, T = u.shape[:2]
        D = self.latent_dim
        dtype = jnp.result_type(u, float)
        m0 = jax.vmap(lambda ui: self._initial_mean(p, ui))(u)
        A = jax.vmap(lambda ui: jnp.broadcast_to(self._value("A", p, ui[:-1]), (T - 1, D, D)))(u)
        b = jax.vmap(lambda ui: jnp.broadcast_to(self._value("b", p, ui[:-1]), (T - 1, D)))(u)
        valid = jnp.asarray(data.time_mask)[:, 1:]  # transition row t -> step t+1 inside the trial
        A = jnp.where(valid[..., None, None], A, 0.0)
        b = jnp.where(valid[..., None], b, 0.0)
        L = jnp.where(valid[..., None, None], _scale_tril(p["dynamics_scale"], p["dynamics_corr_chol"]),
                      jnp.eye(D, dtype=dtype))
        L0 = jnp.broadcast_to(_scale_tril(p["initial_scale"], p["initial_corr_chol"]), (B, D, D))
        return GaussMarkovChain(m0, L0, A, b, L)

    def emission_means(self, params: Params, x, inputs) -> jax.Array:
        """eta_t = C(u_t) x_t + d(u_t), (trials, time, obs), for paths x (trials, time, latent)."""
        p = self.with_fixed(params)

        def one(xi, ui):
            C = self._value("C", p, ui)
            C = jnp.broadcast_to(C, xi.shape[:1] + C.shape[-2:])
            return jnp.einsum("tnd,td->tn", C, xi) + self._emission_bias(p, ui)

        return jax.vmap(one)(jnp.asarray(x), jnp.asarray(inputs))

    def rates(self, params: Params, x, inputs) -> jax.Array:
        """Poisson rates bin_size * link(C(u_t) x_t + d(u_t)), (trials, time, obs)."""
        return self.bin_size * inverse_link(self.link)(self.emission_means(params, x, inputs))

    @staticmethod
    def _path_of(params: Params, data: SequenceData) -> jax.Array:
        if "x" not in params:
            raise ValueError("params: with Poisson emissions the log-likelihood is conditional on the latent "
                             "path; params needs 'x' (trials, time, latent) (or use smooth() for the Laplace "
                             "posterior of x)")
        x = jnp.asarray(params["x"])
        if x.shape[:2] != tuple(data.y.shape[:2]):
            raise ValueError(f"params['x']: expected shape {tuple(data.y.shape[:2])} + (latent,) to match y, "
                             f"got {x.shape}")
        return x

    # ----- likelihoods and latent posteriors ----------------------------------------------------
    @_jit_method
    def trial_log_likelihoods(self, params: Params, data: SequenceData) -> jax.Array:
        """(trials,) log-likelihood of each trial over observed entries: Gaussian emissions, the exact
        marginal log p(y^k | params, u^k); Poisson, log p(y^k | x^k, params, u^k) given ``params["x"]``."""
        if self.emission == "poisson":
            return self.log_likelihood(params, data).sum(-1)
        return jax.vmap(lambda y, m, u: lgssm_filter(self.lgssm(params, u), y, m).log_likelihood)(
            data.y, data.mask, data.inputs
        )

    @_jit_method
    def log_likelihood(self, params: Params, data: SequenceData) -> jax.Array:
        """(trials, time) pointwise log-likelihood over observed entries (0 at unobserved steps).

        Gaussian emissions: the one-step-ahead predictive log p(y_t | y_{1:t-1}, u), which sums over
        time to the marginal likelihood. Poisson emissions: log p(y_t | x_t) given the draw's path
        ``params["x"]`` (as for the SLDS/rSLDS Poisson models)."""
        if self.emission == "poisson":
            x = self._path_of(params, data)
            return masked_poisson_log_prob(data.y, data.mask, self.rates(params, x, data.inputs))

        def one(y, m, u):
            lg = self.lgssm(params, u)
            filt = lgssm_filter(lg, y, m)
            T = y.shape[0]
            C = jnp.broadcast_to(lg.emission_matrix, (T,) + lg.emission_matrix.shape[-2:])
            d = jnp.broadcast_to(lg.emission_bias, y.shape)
            R = lg.emission_cov if lg.emission_cov is not None else jnp.diag(lg.emission_cov_diag)
            mean = jnp.einsum("tnd,td->tn", C, filt.predicted_means) + d
            S = C @ filt.predicted_covs @ _mT(C) + R
            return masked_mvn_log_prob_cov(y, m, mean, symmetrize(S))

        return jax.vmap(one)(data.y, data.mask, data.inputs)

    @_jit_method
    def smooth(self, params: Params, data: SequenceData, mask=None):
        """Latent posterior of every trial given the parameters. Returns (means (K, T, D), covs
        (K, T, D, D), cross (K, T-1, D, D), log-likelihoods (K,)); ``mask`` overrides ``data.mask``
        (e.g. to hold out neurons).

        Gaussian emissions: the exact Kalman smoother and marginal likelihood. Poisson emissions: the
        Laplace approximation (:meth:`laplace_smooth`)."""
        mask = data.mask if mask is None else mask
        if self.emission == "poisson":
            return self.laplace_smooth(params, data, mask)
        res = jax.vmap(lambda y, m, u: lgssm_smoother(self.lgssm(params, u), y, m))(data.y, mask, data.inputs)
        return res.smoothed_means, res.smoothed_covs, res.smoothed_cross_covs, res.log_likelihood

    def laplace_smooth(self, params: Params, data: SequenceData, mask=None, num_iters: int = LAPLACE_ITERS):
        """Laplace approximation of p(x | y, params, u) for Poisson emissions (log-concave in x).

        The mode is found by Newton's method (iteratively reweighted least squares). At the current
        path the Poisson log-likelihood l(eta) of each observed entry is replaced by its second-order
        expansion, a Gaussian pseudo-observation of eta = C x + d, ``z = eta + l'(eta) / w`` with
        variance ``1 / w``, w = -l''(eta) (positive: the exp and softplus links are log-concave and
        convex), and one Kalman smoother pass gives the maximiser of that quadratic model. The step is the one of 1, 1/2, 1/4, 1/8 (or none) with the
        highest log joint, so the log joint never decreases. Means, covariances and evidence are the
        smoother's at the last linearisation (after ``num_iters`` iterations). Steps past a trial's length get the
        prior's N(0, I) (mean 0, covariance I). The returned log-likelihood is the Laplace estimate
        log p(y | x^) + log p(x^) - log q(x^) of the marginal likelihood (q the Gaussian with the
        smoother's covariance, the inverse Hessian of the log joint).
        Returns (means, covs, cross, log-likelihoods) as :meth:`smooth`."""
        p = self.with_fixed(params)
        mask = jnp.asarray(data.mask if mask is None else mask)
        y, u = jnp.asarray(data.y), jnp.asarray(data.inputs)
        chain = self.path_distribution(p, data)
        inside = jnp.asarray(data.time_mask)
        rate_fn = inverse_link(self.link)
        dtype = y.dtype
        tiny = jnp.asarray(1e-6, dtype)

        def log_joint(x):  # (K,)
            return chain.log_prob(x) + masked_poisson_log_prob(y, mask, self.rates(p, x, u)).sum(-1)

        def derivatives(eta):  # f, f', f'' of the rate function, elementwise
            ones = jnp.ones_like(eta)
            (f, f1), (_, f2) = jax.jvp(lambda e: jax.jvp(rate_fn, (e,), (ones,)), (eta,), (ones,))
            return f, f1, f2

        def pseudo(x):
            # l(eta) = y log(bin f) - bin f: l' = (y / f - bin) f', -l'' = y (f'^2 - f f'') / f^2 + bin f''
            # >= 0 (f log-concave and convex), so z = eta + l' / w with w = -l'' is a Newton step
            eta = self.emission_means(p, x, u)
            f, f1, f2 = derivatives(eta)
            f = jnp.maximum(f, jnp.finfo(dtype).tiny)
            w = jnp.maximum(y * (f1**2 - f * f2) / f**2 + self.bin_size * f2, tiny)
            z = eta + (y / f - self.bin_size) * f1 / w
            return jnp.where(mask, z, 0.0), jnp.where(mask, 1.0 / w, 1.0), eta

        def kalman(z, var):
            return jax.vmap(lambda zi, vi, mi, ui: lgssm_smoother(self.lgssm(p, ui, emission_cov_diag=vi), zi, mi))(
                z, var, mask, u)

        def step(carry, _):
            x = carry[0]
            z, var, _ = pseudo(x)
            res = kalman(z, var)
            target = jnp.where(inside[..., None], res.smoothed_means, 0.0)
            cands = jnp.stack([x] + [x + a * (target - x) for a in (1.0, 0.5, 0.25, 0.125)])
            best = jnp.argmax(jax.vmap(log_joint)(cands), axis=0)  # (K,) 0 = stay
            return (jnp.take_along_axis(cands, best[None, :, None, None], 0)[0], z, var, res), None

        # The last iteration's smoother (linearised at the last-but-one path, the same at convergence)
        # is the result: one smoother in the compiled graph instead of two.
        z0, var0, _ = jax.eval_shape(pseudo, chain.mean)
        res0 = jax.eval_shape(kalman, z0, var0)
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
        init = (chain.mean, zeros(z0), zeros(var0), jax.tree.map(zeros, res0))
        (_, z, var, res), _ = jax.lax.scan(step, init, None, length=num_iters)
        means = jnp.where(inside[..., None], res.smoothed_means, 0.0)
        D = self.latent_dim
        covs = jnp.where(inside[..., None, None], res.smoothed_covs, jnp.eye(D, dtype=dtype))
        cross = jnp.where(inside[:, 1:, None, None], res.smoothed_cross_covs, 0.0)
        # log p(x^) - log q(x^) over the trial's steps = Kalman log p~(z) - log N(z | eta(x^), var)
        eta = self.emission_means(p, means, u)
        fit = masked_diag_normal_log_prob(z, mask, eta, jnp.sqrt(var)).sum(-1)
        ll = masked_poisson_log_prob(y, mask, self.rates(p, means, u)).sum(-1) + res.log_likelihood - fit
        return means, covs, cross, ll

    @_jit_method
    def predict_observations(self, params: Params, data: SequenceData, mask=None) -> jax.Array:
        """E[y_t | observed entries], (trials, time, obs). Gaussian: C(u_t) E[x_t | y] + d(u_t).
        Poisson (Laplace posterior N(mu_t, S_t)): exp link, bin_size exp(c'mu + d + c'S c / 2) (the
        log-normal mean); softplus link, the plug-in bin_size softplus(c'mu + d)."""
        means, covs, _, _ = self.smooth(params, data, mask)
        if self.emission == "gaussian":
            return self.emission_means(params, means, data.inputs)
        eta = self.emission_means(params, means, data.inputs)
        if self.link == "exp":
            p = self.with_fixed(params)

            def var_one(S, u):
                C = self._value("C", p, u)
                C = jnp.broadcast_to(C, S.shape[:1] + C.shape[-2:])
                return jnp.einsum("tni,tij,tnj->tn", C, S, C)

            return self.bin_size * jnp.exp(eta + 0.5 * jax.vmap(var_one)(covs, data.inputs))
        return self.bin_size * inverse_link(self.link)(eta)

    # ----- the NumPyro program ------------------------------------------------------------------
    def _sample(self, name, distribution):
        if name in self.fixed:
            return jnp.asarray(self.fixed[name])
        return numpyro.sample(name, distribution)

    def sample_params(self, obs_dim: int) -> dict:
        """Sample every parameter site (priors documented in the model card)."""
        D = self.latent_dim
        params = {}
        for name, shape in self.weight_shapes(obs_dim).items():
            params[name] = self._sample(name, dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
        # Covariances: no prior in the paper; HalfNormal(1) standard deviations and LKJ(2) correlations.
        params["dynamics_scale"] = self._sample("dynamics_scale", dist.HalfNormal(1.0).expand((D,)).to_event(1))
        params["dynamics_corr_chol"] = self._sample("dynamics_corr_chol", dist.LKJCholesky(D, 2.0))
        params["initial_scale"] = self._sample("initial_scale", dist.HalfNormal(1.0).expand((D,)).to_event(1))
        params["initial_corr_chol"] = self._sample("initial_corr_chol", dist.LKJCholesky(D, 2.0))
        if self.emission == "poisson":
            return params
        params["emission_scale"] = self._sample("emission_scale", dist.HalfNormal(1.0).expand((obs_dim,)).to_event(1))
        if self.emission_cov == "full":
            params["emission_corr_chol"] = self._sample("emission_corr_chol", dist.LKJCholesky(obs_dim, 2.0))
        return params

    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        params = self.sample_params(data.obs_dim)
        if self.emission == "poisson":
            with numpyro.plate("trial", data.y.shape[0]):
                x = numpyro.sample("x", self.path_distribution(params, data))
            rate = self.rates(params, x, data.inputs)
            numpyro.sample("y", dist.Poisson(rate).mask(data.mask).to_event(3), obs=data.y)
            if record_log_lik:
                numpyro.deterministic("log_lik", masked_poisson_log_prob(data.y, data.mask, rate))
            return
        ll = self.trial_log_likelihoods(params, data)
        numpyro.factor("marginal_log_lik", ll.sum())
        if record_log_lik:
            numpyro.deterministic("log_lik", self.log_likelihood(params, data))

    def default_guide(self, data=None, *, init_values=None, init_scale: Optional[float] = None):
        """Gaussian emissions: mean-field normal over weights and (unconstrained) covariance sites
        (``init_scale`` 0.01; AutoNormal's family set up by one compiled program,
        :class:`~ppl_switch.guides.mean_field.MeanFieldNormal`). Poisson: :class:`~ppl_switch.guides.path_guide.CLDSPathGuide`, a Gauss–Markov
        path guide over x plus a mean-field normal over the parameters (``init_scale`` 0.05). ``init_values``
        sets the start; ``data`` alone starts at the cheap :meth:`init_values`, no EM (Poisson: its path x only,
        the parameters at prior medians); neither, the prior medians and x = 0. ``ppl_switch.fit`` passes the EM
        start instead (:func:`ppl_switch.infer.starts.data_driven_guide`)."""
        if self.emission == "poisson":
            return CLDSPathGuide(self, data=data, init_values=init_values,
                                 init_scale=0.05 if init_scale is None else init_scale)
        scale = 0.01 if init_scale is None else init_scale
        if init_values is None and data is not None:
            init_values = self.init_values(data)
        if init_values is None:
            return MeanFieldNormal(self.program, init_scale=scale, cache_key=labelled_model_key("init_to_uniform", self))
        return MeanFieldNormal(self.program, init_loc_fn=init_to_values_then_median(dict(init_values)), init_scale=scale)

    def init_values(self, data, seed: int = 0) -> dict:
        """A cheap data-driven start (site values), no EM.

        Gaussian emissions: :meth:`start_params` (prior draws of the weights with ``seed``, PCA axes for a
        constant C, identity covariances). Poisson: the same start for the Gaussian CLDS of
        :meth:`gaussian_counterpart` on the counts moved to the log-rate scale (:meth:`log_rate_data`), without
        its emission covariance, and x = that Gaussian CLDS's Kalman-smoothed means of the moved counts at
        those parameters. (Not the Laplace mode under the Poisson model: at the prior-drawn dynamics weights
        the prior mean path can grow without bound and the Newton iterations started there overflowed, on 3
        of 4 seeds of the head-direction recipe at 20 trials x 50 steps; the Kalman means had affine R^2
        0.87-0.93 to the true latent there, PCA of the log counts 0.93.)

        ``ppl_switch.fit`` and its ``svi`` runner start from the EM-based start instead,
        :func:`ppl_switch.infer.clds_em.clds_start` (Gaussian: 50 EM iterations; Poisson: EM on the moved
        counts, then the Laplace paths), through :func:`ppl_switch.infer.starts.data_driven_guide` (which builds
        that guide for you); ``default_guide(data, init_values=clds_start(model, data))`` starts every site
        there (Poisson: the parameters too, where ``ppl_switch.fit`` starts them at prior medians)."""
        data = data if isinstance(data, SequenceData) else self.prepare(data)
        key = jax.random.PRNGKey(seed)
        if self.emission == "gaussian":
            return {k: np.asarray(v) for k, v in self.start_params(key, data).items()}
        moved = self.log_rate_data(data)
        gaussian = self.gaussian_counterpart()
        params = gaussian.start_params(key, moved)
        out = {k: np.asarray(v) for k, v in params.items() if not k.startswith("emission_")}
        out["x"] = np.asarray(gaussian.smooth(params, jax.tree.map(jnp.asarray, moved))[0])
        return out

    def start_params(self, key, data: SequenceData) -> dict:
        """Prior draws of the weights; PCA axes for a constant C; identity covariances (as in the paper).
        The start of :meth:`init_values` and of the EM (:func:`ppl_switch.infer.clds_em.initial_params`)."""
        N, D = data.obs_dim, self.latent_dim
        shapes = self.weight_shapes(N)
        keys = jax.random.split(key, len(shapes))
        params = {name: jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
        if isinstance(self.bases["C"], ConstantBasis):
            y = np.where(data.mask, data.y, np.nan).reshape(-1, N)
            y = y - np.nanmean(y, 0)
            y = np.nan_to_num(y)
            _, s, vt = np.linalg.svd(y, full_matrices=False)
            C = vt[:D].T * (s[:D] / math.sqrt(max(1, y.shape[0])))
            params["W_C"] = jnp.asarray(C[None] / self.bases["C"].scale)
        params["dynamics_scale"], params["dynamics_corr_chol"] = jnp.ones(D), jnp.eye(D)
        params["initial_scale"], params["initial_corr_chol"] = jnp.ones(D), jnp.eye(D)
        params["emission_scale"] = jnp.ones(N)
        if self.emission_cov == "full":
            params["emission_corr_chol"] = jnp.eye(N)
        return {k: v for k, v in params.items() if k not in self.fixed}

    def gaussian_counterpart(self) -> "CLDS":
        """The Gaussian-emission CLDS with this model's dimensions, bases, emission bias, constant scale and
        fixed values (diagonal R): the model a Poisson CLDS's start is fitted with on :meth:`log_rate_data`."""
        return CLDS(self.latent_dim, self.obs_dim, self.input_dim, basis=self.basis, varying=self.varying,
                    bases=self._custom_bases, emission_bias=self.emission_bias,
                    constant_scale=self.constant_scale, fixed=self.fixed)

    def log_rate_data(self, data: SequenceData) -> SequenceData:
        """Counts moved to the log-rate scale, link^{-1}((y + 0.5) / bin_size) (0 where unobserved), with the
        same mask, lengths and inputs."""
        v = np.maximum((np.asarray(data.y) + 0.5) / self.bin_size, 1e-6)
        z = np.log(v) if self.link == "exp" else np.log(np.expm1(v))
        return SequenceData(np.where(data.mask, z, 0.0), np.asarray(data.mask), np.asarray(data.lengths),
                            np.asarray(data.inputs))

    # ----- simulation ---------------------------------------------------------------------------
    def default_params(self, key, obs_dim: Optional[int] = None) -> dict:
        """Prior draws of the weights, with A rescaled so that ||A(u)||_2 <= 0.9 on conditions drawn
        uniformly on [0, 2 pi); Q = 0.04 I, Q_1 = 0.2 I, R = 0.04 I (Gaussian emissions)."""
        N = self._obs_dim() if obs_dim is None else obs_dim
        D = self.latent_dim
        keys = jax.random.split(key, 6)
        params = {}
        for k, (name, shape) in zip(keys, self.weight_shapes(N).items()):
            params[name] = jax.random.normal(k, shape)
        u = jax.random.uniform(keys[-1], (64, self.input_dim), maxval=2 * math.pi)
        norms = jnp.linalg.norm(evaluate(self.bases["A"](u), params["W_A"]), ord=2, axis=(-2, -1))
        params["W_A"] = params["W_A"] * jnp.minimum(1.0, 0.9 / norms.max())
        params["dynamics_scale"], params["dynamics_corr_chol"] = jnp.full((D,), 0.2), jnp.eye(D)
        params["initial_scale"], params["initial_corr_chol"] = jnp.full((D,), math.sqrt(0.2)), jnp.eye(D)
        if self.emission == "gaussian":
            params["emission_scale"] = jnp.full((N,), 0.2)
            if self.emission_cov == "full":
                params["emission_corr_chol"] = jnp.eye(N)
        return {k: v for k, v in params.items() if k not in self.fixed}

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params: Optional[Params] = None, inputs=None):
        """Draw data. Default conditions: angular random walks (step sd 0.4 rad) in every input column.
        Returns (SequenceData, truth) with truth = {"latents": (K, T, D), "params": params}; for Poisson
        emissions ``params`` also holds the path "x" (the latent site)."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        k_par, k_u, k_x = jax.random.split(key, 3)
        params = self.default_params(k_par) if params is None else dict(params)
        params = {k: v for k, v in params.items() if k != "x"}
        if inputs is None:
            steps = 0.4 * jax.random.normal(k_u, (num_trials, num_timesteps, self.input_dim))
            start = jax.random.uniform(k_u, (num_trials, 1, self.input_dim), maxval=2 * math.pi)
            inputs = jnp.mod(start + jnp.cumsum(steps, axis=1) - steps[:, :1], 2 * math.pi)
        inputs = jnp.asarray(inputs, dtype=float)
        if inputs.shape != (num_trials, num_timesteps, self.input_dim):
            raise DataError(f"inputs: expected shape {(num_trials, num_timesteps, self.input_dim)}, got {inputs.shape}")
        x, y = self._simulate_paths(k_x, params, inputs)
        data = self.prepare(np.asarray(y), inputs=np.asarray(inputs))
        if self.emission == "poisson":
            params = {**params, "x": x}
        return data, {"latents": x, "params": params}

    @_jit_method
    def _simulate_paths(self, key, params, inputs):
        B, T = inputs.shape[:2]
        if self.emission == "poisson":
            shell = SequenceData(jnp.zeros((B, T, 1)), jnp.ones((B, T, 1), bool), jnp.full((B,), T, jnp.int32), inputs)
            k_x, k_y = jax.random.split(key)
            x = self.path_distribution(params, shell).sample(k_x)
            return x, jax.random.poisson(k_y, self.rates(params, x, inputs)).astype(x.dtype)
        keys = jax.random.split(key, B)
        return jax.vmap(lambda k, u: lgssm_simulate(k, self.lgssm(params, u), T))(keys, inputs)

    def posterior_predictive(self, key, params: Params, data: SequenceData) -> jax.Array:
        """Replicated observations shaped like y. Gaussian: fresh latent paths and noise given the
        conditions. Poisson: counts drawn given the draw's path ``params["x"]``."""
        if self.emission == "poisson":
            rate = self.rates(params, self._path_of(params, data), data.inputs)
            return jax.random.poisson(key, rate).astype(rate.dtype)
        return self._simulate_paths(key, params, data.inputs)[1]
