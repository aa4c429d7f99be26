"""Conditionally linear dynamical system (CLDS; Geadah, Nejatbakhsh, Lipshutz, Pillow & Williams).

Given an observed condition u_t (e.g. head direction), the latent state evolves linearly with
parameters that are smooth functions of u::

    x_1     ~ N(m(u_1), Q_1)
    x_{t+1} = A(u_t) x_t + b(u_t) + N(0, Q)          (A, b at the condition of step t)
    y_t     = C(u_t) x_t + d(u_t) + N(0, R)          (d = 0 unless ``emission_bias=True``)

Every entry of A, b, C, d, m is a weight-space GP: ``M(u)[i, j] = sum_l phi_l(u) W_M[l, i, j]`` with
``W_M ~ N(0, 1)`` iid and the basis ``phi`` from :mod:`ppl_switch.ops.basis` (Fourier features on the
circle/torus for angles, HSGP for non-periodic conditions, a linear basis for additive inputs, a
constant basis for parameters that do not vary with u). Conditioned on u the model is a time-varying
linear-Gaussian state space model, so x is marginalised exactly by the Kalman filter
(:mod:`ppl_switch.ops.kalman`): NUTS and SVI run over the basis weights and the covariances only.

:meth:`CLDS.em` is the exact MAP-EM of the paper (ECM): Kalman-smoother E-step, then closed-form
conditional maximisers -- joint [A b] weights by the Sylvester equation ``G W + W Q = H`` (with the
corrected ``+Phi'Phi`` block of the paper's Eq. 20), Q, then C/d weights (one ridge solve per neuron
for diagonal R, a Sylvester equation for full R), R, then m weights (Sylvester with Q_1) and Q_1. Its
objective ``J = sum_k log p(y^k | W, Theta, u^k) - ||W||^2 / 2`` (weights MAP, covariances ML) is
non-decreasing. Notes: /work/shared/reference/models/clds.md.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoNormal

from ppl_switch.data import DataError, SequenceData, check_positive_int
from ppl_switch.models._emissions import masked_mvn_log_prob_cov
from ppl_switch.models.base import Model, Params
from ppl_switch.ops.basis import ConstantBasis, FourierBasis, basis_from_config, basis_to_config, evaluate
from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter, lgssm_simulate, lgssm_smoother

PARAMETER_FUNCTIONS = ("A", "b", "C", "d", "m")
_COV_SITES = {
    "dynamics_cov": ("dynamics_scale", "dynamics_corr_chol"),
    "initial_cov": ("initial_scale", "initial_corr_chol"),
    "emission_cov": ("emission_scale", "emission_corr_chol"),
}


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _sym(x):
    return 0.5 * (x + _mT(x))


def cov_from_sites(scale, corr_chol=None):
    """Covariance from standard deviations (..., D) and a correlation Cholesky factor (..., D, D)."""
    if corr_chol is None:
        return scale**2
    L = scale[..., :, None] * corr_chol
    return L @ _mT(L)


def sites_from_cov(cov, full: bool = True):
    """Inverse of :func:`cov_from_sites`: (scale, corr_chol) of a covariance (corr_chol None if not full)."""
    scale = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1)) if cov.ndim >= 2 else jnp.sqrt(cov)
    if not full:
        return scale, None
    corr = cov / (scale[..., :, None] * scale[..., None, :])
    return scale, jnp.linalg.cholesky(_sym(corr))


def _jit_method(fn):
    """jit a method with ``self`` static (models hash by identity), so that repeated eager calls
    (analyses, tests, runners) compile once per shape instead of dispatching op by op."""
    jitted = jax.jit(fn, static_argnums=0)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return jitted(self, *args, **kwargs)

    return wrapper


def solve_sylvester_psd(G, S, H):
    """Solve ``G W + W S = H`` for symmetric positive semi-definite G (P, P) and positive definite
    S (D, D) by two eigendecompositions: W = U [(U'HV) / (g_i + s_j)] V'. H (P, D) -> W (P, D)."""
    g, U = jnp.linalg.eigh(_sym(G))
    s, V = jnp.linalg.eigh(_sym(S))
    return U @ ((_mT(U) @ H @ V) / (g[:, None] + s[None, :])) @ _mT(V)


def _kron_select(num_mat: int, num_bias: int, dim: int) -> np.ndarray:
    """Indices into phi_all (x) [x; 1] (phi_all = [phi_mat, phi_bias], a-major) of the regressor
    z = [phi_mat (x) x ; phi_bias]: the x entries of the matrix block and the 1 entry of the bias block."""
    idx = [l * (dim + 1) + j for l in range(num_mat) for j in range(dim)]
    idx += [(num_mat + l) * (dim + 1) + dim for l in range(num_bias)]
    return np.asarray(idx)


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
        emission_bias: include d(u) (default False: d = 0 as in all the paper's experiments).
        emission_cov: "diag" (default) or "full" R.
        constant_scale: prior sd of the entries of parameters that do not vary with u.
        fixed: values held fixed (not sampled, not updated by EM): "C" (N, D) constant emission matrix
            (needs C constant), "dynamics_cov", "initial_cov" (D, D), "emission_cov" ((N,) variances for
            diag or (N, N)), or any site name with its value.
        emission: "gaussian" (the only family implemented).
    """

    name = "clds"
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
        emission_bias: bool = False,
        emission_cov: str = "diag",
        constant_scale: float = 1.0,
        fixed: Optional[Mapping[str, Any]] = None,
        emission: str = "gaussian",
    ):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = None if obs_dim is None else check_positive_int(obs_dim, "obs_dim")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        if emission != "gaussian":
            raise ValueError(f"emission: only 'gaussian' is implemented for CLDS, got {emission!r}")
        self.emission = emission
        if emission_cov not in ("diag", "full"):
            raise ValueError(f"emission_cov: expected 'diag' or 'full', got {emission_cov!r}")
        self.emission_cov = emission_cov
        if not constant_scale > 0:
            raise ValueError(f"constant_scale: expected a positive number, got {constant_scale!r}")
        self.constant_scale = float(constant_scale)
        self.emission_bias = bool(emission_bias)
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
        }
        names = set(self._site_names())
        return {k: v for k, v in dims.items() if k in names and k not in self.fixed}

    def _site_names(self):
        names = [f"W_{p}" for p in self.bases]
        names += ["dynamics_scale", "dynamics_corr_chol", "initial_scale", "initial_corr_chol", "emission_scale"]
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
        """Q (D, D), Q_1 (D, D) and R ((N,) variances for diag, (N, N) for full)."""
        p = self.with_fixed(params)
        return {
            "dynamics_cov": cov_from_sites(p["dynamics_scale"], p["dynamics_corr_chol"]),
            "initial_cov": cov_from_sites(p["initial_scale"], p["initial_corr_chol"]),
            "emission_cov": cov_from_sites(p["emission_scale"], p.get("emission_corr_chol")),
        }

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

    def lgssm(self, params: Params, u) -> LGSSMParams:
        """The time-varying LGSSM of one trial with conditions u (T, input_dim)."""
        p = self.with_fixed(params)
        cov = self.covariances(p)
        N = p["W_C"].shape[1]
        dtype = jnp.result_type(u, float)
        R = cov["emission_cov"]
        return LGSSMParams(
            initial_mean=self._value("m", p, u[:1])[0] if not isinstance(self.bases["m"], ConstantBasis)
            else self._value("m", p, u),
            initial_cov=cov["initial_cov"],
            dynamics_matrix=self._value("A", p, u[:-1]),
            dynamics_bias=self._value("b", p, u[:-1]),
            dynamics_cov=cov["dynamics_cov"],
            emission_matrix=self._value("C", p, u),
            emission_bias=self._value("d", p, u) if "d" in self.bases else jnp.zeros((N,), dtype),
            emission_cov=None if self.emission_cov == "diag" else R,
            emission_cov_diag=R if self.emission_cov == "diag" else None,
        )

    # ----- likelihoods and latent posteriors ----------------------------------------------------
    @_jit_method
    def trial_log_likelihoods(self, params: Params, data: SequenceData) -> jax.Array:
        """(trials,) exact marginal log p(y^k | params, u^k) over observed entries."""
        return jax.vmap(lambda y, m, u: lgssm_filter(self.lgssm(params, u), y, m).log_likelihood)(
            data.y, data.mask, data.inputs
        )

    @_jit_method
    def log_likelihood(self, params: Params, data: SequenceData) -> jax.Array:
        """(trials, time) one-step-ahead predictive log p(y_t | y_{1:t-1}, u) over observed entries
        (sums over time to the marginal likelihood; 0 at unobserved steps)."""

        def one(y, m, u):
            lg = self.lgssm(params, u)
            filt = lgssm_filter(lg, y, m)
            T = y.shape[0]
            C = jnp.broadcast_to(lg.emission_matrix, (T,) + lg.emission_matrix.shape[-2:])
            d = jnp.broadcast_to(lg.emission_bias, y.shape)
            R = lg.emission_cov if lg.emission_cov is not None else jnp.diag(lg.emission_cov_diag)
            mean = jnp.einsum("tnd,td->tn", C, filt.predicted_means) + d
            S = C @ filt.predicted_covs @ _mT(C) + R
            return masked_mvn_log_prob_cov(y, m, mean, _sym(S))

        return jax.vmap(one)(data.y, data.mask, data.inputs)

    @_jit_method
    def smooth(self, params: Params, data: SequenceData, mask=None):
        """Kalman smoother of every trial. Returns (means (K, T, D), covs (K, T, D, D), cross (K, T-1, D, D),
        log-likelihoods (K,)); ``mask`` overrides ``data.mask`` (e.g. to hold out neurons)."""
        mask = data.mask if mask is None else mask
        res = jax.vmap(lambda y, m, u: lgssm_smoother(self.lgssm(params, u), y, m))(data.y, mask, data.inputs)
        return res.smoothed_means, res.smoothed_covs, res.smoothed_cross_covs, res.log_likelihood

    @_jit_method
    def predict_observations(self, params: Params, data: SequenceData, mask=None) -> jax.Array:
        """E[y_t | observed entries] = C(u_t) E[x_t | y] + d(u_t), (trials, time, obs)."""
        means = self.smooth(params, data, mask)[0]

        def one(x, u):
            lg = self.lgssm(params, u)
            C = jnp.broadcast_to(lg.emission_matrix, (x.shape[0],) + lg.emission_matrix.shape[-2:])
            return jnp.einsum("tnd,td->tn", C, x) + lg.emission_bias

        return jax.vmap(one)(means, data.inputs)

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
        params["emission_scale"] = self._sample("emission_scale", dist.HalfNormal(1.0).expand((obs_dim,)).to_event(1))
        if self.emission_cov == "full":
            params["emission_corr_chol"] = self._sample("emission_corr_chol", dist.LKJCholesky(obs_dim, 2.0))
        return params

    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        params = self.sample_params(data.obs_dim)
        ll = self.trial_log_likelihoods(params, data)
        numpyro.factor("marginal_log_lik", ll.sum())
        if record_log_lik:
            numpyro.deterministic("log_lik", self.log_likelihood(params, data))

    def default_guide(self):
        """Mean-field normal over weights and (unconstrained) covariance sites."""
        return AutoNormal(self.program, init_scale=0.01)

    # ----- simulation ---------------------------------------------------------------------------
    def default_params(self, key, obs_dim: Optional[int] = None) -> dict:
        """Prior draws of the weights, with A rescaled so that ||A(u)||_2 <= 0.9 on conditions drawn
        uniformly on [0, 2 pi); Q = 0.04 I, Q_1 = 0.2 I, R = 0.04 I."""
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
        params["emission_scale"] = jnp.full((N,), 0.2)
        if self.emission_cov == "full":
            params["emission_corr_chol"] = jnp.eye(N)
        return {k: v for k, v in params.items() if k not in self.fixed}

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params: Optional[Params] = None, inputs=None):
        """Draw data. Default conditions: angular random walks (step sd 0.4 rad) in every input column.
        Returns (SequenceData, truth) with truth = {"latents": (K, T, D), "params": params}."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        k_par, k_u, k_x = jax.random.split(key, 3)
        params = self.default_params(k_par) if params is None else dict(params)
        if inputs is None:
            steps = 0.4 * jax.random.normal(k_u, (num_trials, num_timesteps, self.input_dim))
            start = jax.random.uniform(k_u, (num_trials, 1, self.input_dim), maxval=2 * math.pi)
            inputs = jnp.mod(start + jnp.cumsum(steps, axis=1) - steps[:, :1], 2 * math.pi)
        inputs = jnp.asarray(inputs, dtype=float)
        if inputs.shape != (num_trials, num_timesteps, self.input_dim):
            raise DataError(f"inputs: expected shape {(num_trials, num_timesteps, self.input_dim)}, got {inputs.shape}")
        x, y = self._simulate_paths(k_x, params, inputs)
        data = self.prepare(np.asarray(y), inputs=np.asarray(inputs))
        return data, {"latents": x, "params": params}

    @_jit_method
    def _simulate_paths(self, key, params, inputs):
        keys = jax.random.split(key, inputs.shape[0])
        T = inputs.shape[1]
        return jax.vmap(lambda k, u: lgssm_simulate(k, self.lgssm(params, u), T))(keys, inputs)

    def posterior_predictive(self, key, params: Params, data: SequenceData) -> jax.Array:
        """Replicated observations: fresh latent paths and noise given the conditions, shaped like y."""
        return self._simulate_paths(key, params, data.inputs)[1]

    # ----- exact MAP-EM -------------------------------------------------------------------------
    def em(self, data: SequenceData, *, num_iters: int = 200, key=None, init_params: Optional[Params] = None,
           tol: Optional[float] = None, verbose: bool = False):
        """Exact MAP-EM for :func:`ppl_switch.infer.fit_em`: returns ``(params, history)`` with history
        {"log_likelihoods", "objective" (per iteration), "seconds", "compile_seconds"}. Arguments as
        :meth:`em_params` (``key`` replaces ``seed``)."""
        seed = 0 if key is None else int(jax.random.randint(key, (), 0, 2**31 - 1))
        out = self.em_params(data, num_iters=num_iters, seed=seed, init_params=init_params, tol=tol, verbose=verbose)
        history = {
            "log_likelihoods": out["log_likelihood"],
            "objective": out["objective"],
            "seconds": out["seconds"],
            "compile_seconds": out["compile_seconds"],
        }
        return out["params"], history

    def em_params(self, data, *, num_iters: int = 200, seed: int = 0, init_params: Optional[Params] = None,
                  tol: Optional[float] = None, verbose: bool = False, inputs=None, mask=None, lengths=None) -> dict:
        """Run exact MAP-EM.

        Args:
            data: a SequenceData or y (with ``inputs``, ``mask``, ``lengths``).
            num_iters: EM iterations (default 200, as in the authors' notebooks).
            seed: initialisation seed (prior draws of the weights; PCA for a constant C).
            init_params: start from these instead.
            tol: stop when the objective improves by less than ``tol * |J|``.
        Returns:
            {"params", "objective" (iterations,) J before each M-step, "log_likelihood" (iterations,),
             "seconds" (wall time after compilation), "compile_seconds", "data"}.
        Stops (keeping the last finite parameters) if the objective becomes NaN.
        """
        if not isinstance(data, SequenceData):
            data = self.prepare(data, inputs=inputs, mask=mask, lengths=lengths)
        num_iters = check_positive_int(num_iters, "num_iters")
        if self.emission_cov == "full":
            partial = data.mask.any(-1) & ~data.mask.all(-1)
            if np.any(partial):
                raise DataError("mask: EM with emission_cov='full' needs whole time steps observed or missing")
        params = self._init_params(jax.random.PRNGKey(seed), data) if init_params is None else dict(init_params)
        params = {k: jnp.asarray(v) for k, v in params.items() if k not in self.fixed}
        data = jax.tree.map(jnp.asarray, data)  # on device once, not at every iteration
        step = self._em_step
        t0 = time.perf_counter()
        new_params, stats = step(params, data)
        jax.block_until_ready(new_params)
        compile_s = time.perf_counter() - t0
        objective, loglik = [float(stats["objective"])], [float(stats["log_likelihood"])]
        params = new_params
        t0 = time.perf_counter()
        for i in range(1, num_iters):
            new_params, stats = step(params, data)
            J = float(stats["objective"])
            if not np.isfinite(J):
                if verbose:
                    print(f"EM: objective not finite at iteration {i}; keeping the previous parameters")
                break
            objective.append(J)
            loglik.append(float(stats["log_likelihood"]))
            params = new_params
            if verbose and (i % 20 == 0 or i == num_iters - 1):
                print(f"EM iter {i}: J = {J:.3f}")
            if tol is not None and abs(objective[-1] - objective[-2]) < tol * abs(objective[-1]):
                break
        jax.block_until_ready(params)
        return {
            "params": params,
            "objective": np.asarray(objective),
            "log_likelihood": np.asarray(loglik),
            "seconds": time.perf_counter() - t0,
            "compile_seconds": compile_s,
            "data": data,
        }

    @_jit_method
    def objective(self, params: Params, data: SequenceData) -> jax.Array:
        """EM objective J = sum_k log p(y^k | W, Theta, u^k) - ||W||^2 / 2 (prior counted once)."""
        p = self.with_fixed(params)
        prior = sum(0.5 * jnp.sum(p[f"W_{n}"] ** 2) for n in self.bases if f"W_{n}" not in self.fixed)
        return self.trial_log_likelihoods(params, data).sum() - prior

    def _init_params(self, key, data: SequenceData) -> dict:
        """Prior draws of the weights; PCA axes for a constant C; identity covariances (as in the paper)."""
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

    def _features(self, names, u):
        """phi_all = [phi_mat(u), phi_bias(u)] (..., L_mat + L_bias) and the regressor selection
        (see :func:`_kron_select`): z_t = select(phi_all(u_t) (x) [x_t; 1])."""
        mat, bias = names
        phi = [self.bases[mat](u)]
        num_bias = 0
        if bias in self.bases:
            phi.append(self.bases[bias](u))
            num_bias = self.bases[bias].num_features
        sel = _kron_select(self.bases[mat].num_features, num_bias, self.latent_dim)
        return jnp.concatenate(phi, -1), sel

    def _split_weights(self, W, names, out_dim):
        mat, bias = names
        L = self.bases[mat].num_features
        D = self.latent_dim
        res = {f"W_{mat}": jnp.transpose(W[: L * D].reshape(L, D, out_dim), (0, 2, 1))}
        if bias in self.bases:
            res[f"W_{bias}"] = W[L * D:]
        return res

    def _stack_weights(self, p, names):
        mat, bias = names
        Wm = p[f"W_{mat}"]  # (L, out, D)
        L, out, D = Wm.shape
        W = jnp.transpose(Wm, (0, 2, 1)).reshape(L * D, out)
        if bias in self.bases:
            W = jnp.concatenate([W, p[f"W_{bias}"]], 0)
        return W

    @_jit_method
    def _em_step(self, params, data: SequenceData):
        """One ECM iteration. Returns (new params, {"objective", "log_likelihood"} at the old params)."""
        p = self.with_fixed(params)
        D = self.latent_dim
        N = data.obs_dim
        means, covs, cross, ll = self.smooth(p, data)
        K, T, _ = means.shape
        dtype = means.dtype
        # ---- expected sufficient statistics of [x; 1]
        ones = jnp.ones((K, T, 1), dtype)
        xt = jnp.concatenate([means, ones], -1)  # (K, T, D+1)
        Exx = covs + means[..., :, None] * means[..., None, :]
        Sxx = jnp.zeros((K, T, D + 1, D + 1), dtype).at[..., :D, :D].set(Exx)
        Sxx = Sxx.at[..., :D, D].set(means).at[..., D, :D].set(means).at[..., D, D].set(1.0)
        # E[x~_t x_{t+1}'] (K, T-1, D+1, D)
        Exnext = _mT(cross) + means[:, :-1, :, None] * means[:, 1:, None, :]
        Scross = jnp.concatenate([Exnext, means[:, 1:, None, :]], -2)
        in_len = jnp.arange(T)[None, :] < data.lengths[:, None]  # (K, T)
        trans = (in_len[:, 1:]).astype(dtype)  # transition t -> t+1 valid

        new = dict(params)
        # ---- [A b] jointly given Q (Sylvester), then Q. Regressor z_t = [phi_A (x) x_t; phi_b]; the
        # Gram sum_t E[z z'] is a selection of sum_t (phi phi') (x) E[x~ x~'], one matrix product.
        D1 = D + 1
        phi, sel = jax.vmap(lambda u: self._features(("A", "b"), u[:-1]))(data.inputs)
        sel = sel[0]
        n = K * (T - 1)
        phi = (phi * trans[..., None]).reshape(n, -1)  # zero rows for transitions past the length
        La = phi.shape[-1]
        outer = (phi[:, :, None] * phi[:, None, :]).reshape(n, La * La)
        G = (outer.T @ Sxx[:, :-1].reshape(n, D1 * D1)).reshape(La, La, D1, D1)
        G = jnp.transpose(G, (0, 2, 1, 3)).reshape(La * D1, La * D1)[sel][:, sel]
        H = (phi.T @ Scross.reshape(n, D1 * D)).reshape(La * D1, D)[sel]
        Q_old = cov_from_sites(p["dynamics_scale"], p["dynamics_corr_chol"])
        W = solve_sylvester_psd(G, Q_old, H)
        new.update(self._split_weights(W, ("A", "b"), D))
        n_trans = trans.sum()
        Sxnxn = jnp.einsum("kt,ktij->ij", trans, Exx[:, 1:])
        Q = _sym(Sxnxn - _mT(W) @ H - _mT(H) @ W + _mT(W) @ G @ W) / n_trans
        new["dynamics_scale"], new["dynamics_corr_chol"] = sites_from_cov(Q)

        # ---- C (and d) given R, then R
        phie, sele = jax.vmap(lambda u: self._features(("C", "d"), u))(data.inputs)
        sele = sele[0]
        n = K * T
        Le = phie.shape[-1]
        phie = phie.reshape(n, Le)
        obs = data.mask.astype(dtype).reshape(n, N)
        y = data.y.reshape(n, N)
        fixed_C = "W_C" in self.fixed
        zx = (phie[:, :, None] * xt.reshape(n, 1, D1)).reshape(n, Le * D1)[:, sele]  # E[z_t]
        # sum_t w_t E[z z'] for a (n, M) set of weights w -> (M, P, P)
        phiphi = (phie[:, :, None] * phie[:, None, :]).reshape(n, Le * Le)

        def weighted_gram(w):
            full = jnp.einsum("nm,na,nb->mab", w, phiphi, Sxx.reshape(n, D1 * D1))
            full = full.reshape(-1, Le, Le, D1, D1).transpose(0, 1, 3, 2, 4).reshape(-1, Le * D1, Le * D1)
            return full[:, sele][:, :, sele]

        if self.emission_cov == "diag":
            Gn = weighted_gram(obs)  # (N, P, P)
            hn = (obs * y).T @ zx  # (N, P)
            R_old = p["emission_scale"] ** 2
            P = Gn.shape[-1]
            if fixed_C:
                Wn = _mT(self._stack_weights(p, ("C", "d")))  # (N, P)
            else:
                Wn = jnp.linalg.solve(Gn + R_old[:, None, None] * jnp.eye(P), hn[..., None])[..., 0]
                new.update(self._split_weights(_mT(Wn), ("C", "d"), N))
            n_obs = obs.sum(0)
            sq = (obs * y**2).sum(0) - 2 * jnp.einsum("np,np->n", Wn, hn) + jnp.einsum("np,npq,nq->n", Wn, Gn, Wn)
            new["emission_scale"] = jnp.sqrt(jnp.maximum(sq / n_obs, 1e-12))
        else:
            step_obs = obs[:, :1]  # whole steps observed or missing (checked)
            Ge = weighted_gram(step_obs)[0]
            He = zx.T @ (step_obs * y)
            R_old = cov_from_sites(p["emission_scale"], p["emission_corr_chol"])
            if fixed_C:
                We = self._stack_weights(p, ("C", "d"))
            else:
                We = solve_sylvester_psd(Ge, R_old, He)
                new.update(self._split_weights(We, ("C", "d"), N))
            Syy = (step_obs * y).T @ y
            R = _sym(Syy - _mT(We) @ He - _mT(He) @ We + _mT(We) @ Ge @ We) / step_obs.sum()
            new["emission_scale"], new["emission_corr_chol"] = sites_from_cov(R)

        # ---- m given Q_1 (Sylvester), then Q_1
        phim = jax.vmap(lambda u: self.bases["m"](u[:1])[0])(data.inputs)  # (K, L_m)
        Q1_old = cov_from_sites(p["initial_scale"], p["initial_corr_chol"])
        Gm = phim.T @ phim
        Hm = phim.T @ means[:, 0]
        Wm = solve_sylvester_psd(Gm, Q1_old, Hm)
        new["W_m"] = Wm
        r = means[:, 0] - phim @ Wm
        Q1 = _sym(covs[:, 0].sum(0) + r.T @ r) / K
        new["initial_scale"], new["initial_corr_chol"] = sites_from_cov(Q1)

        new = {k: v for k, v in new.items() if k not in self.fixed}
        prior = sum(0.5 * jnp.sum(p[f"W_{n}"] ** 2) for n in self.bases if f"W_{n}" not in self.fixed)
        return new, {"objective": ll.sum() - prior, "log_likelihood": ll.sum()}
