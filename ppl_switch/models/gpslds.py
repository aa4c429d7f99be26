"""gpSLDS (Hu et al. 2024): a latent SDE whose drift has the smoothly switching linear GP prior, and the
GP-SDE baseline with an RBF kernel (Duncker et al. 2019).

Generative program (trial n, Euler step t of width dt, K latent dims, J regimes, N observed dims)::

    W                ~ N(0, 1)                       partition_weights   (F, J-1)   (J > 1)
    tau              ~ LogNormal(log 0.5, 0.5)        temperature         ()         (J > 1)
    c_j              ~ N(0, s_c^2)                    fixed_points        (J, K)
    m_k              ~ LogNormal(0, 1)                slope_scales        (K,)       kernel="full_linear"
    sigma0           ~ LogNormal(0, 1)                offset_scale        ()         kernel="full_linear"
    A_j[k, l]        ~ N(0, m_l^2)                    regime_matrix       (J, K, K)
    e_j[k]           ~ N(0, sigma0^2)                 regime_offset       (J, K)
    B                ~ N(0, 1)                        input_matrix        (K, I)     (I > 0)
    pi(x)            = softmax([W' phi(x) / tau, 0])  (SoftmaxCentered: regime J-1 is the reference)
    f(x)             = sum_j pi_j(x) (A_j (x - c_j) + e_j)
    x_0              ~ N(0, s_0^2 I)
    x_{t+1} | x_t    ~ N(x_t + dt (f(x_t) + B v_t), dt I)          (Euler–Maruyama, Sigma = I)
    y_t | x_t        ~ N(C x_t + d, diag(r^2))                       emission="gaussian"
                     | Poisson(g(C x_t + d) dt) counts per bin       emission="poisson"
                     | point process: sum y log g - g dt              emission="point_process"
    C ~ N(0, 1) (N, K), d ~ N(0, 5^2) (N,), r ~ HalfNormal(2) (N,);  g = softplus or exp.

The drift prior is the *exact* weight-space form of the SSL kernel (notes §1.3): with a_jk ~ N(0, M),
e_jk ~ N(0, sigma0^2), Cov[f_k(x), f_k(x')] = sum_j pi_j(x) pi_j(x') ((x - c_j)' M (x' - c_j) + sigma0^2),
M = diag(m^2) -- the paper's kernel, eq. 5 (with kernel="linear": M = I, sigma0 = 1, the authors' demo).
c_j is the point where regime j's linear function is least uncertain (its prior fixed point); each
regime's own fixed point is c_j - A_j^{-1} e_j. Unlike the paper (ML-II point estimates), every kernel
parameter has a prior, so its uncertainty reaches the fixed points.

GPSDE replaces f by an HSGP approximation of a GP with the RBF kernel s^2 exp(-|x - x'|^2 / (2 l^2))
on the box [-L, L]^K: f_k(x) = sum_i phi_i(x) sqrt(S(lambda_i)) w_ik, w ~ N(0, 1).

Inference: NUTS on the program (small data, coarse dt); SVI with :class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`: a joint
multivariate normal over all parameters (the fixed point c - A^{-1} e needs the correlations of c, A and
e) and, per trial, the paper's Gauss–Markov family for q(x) -- the Euler discretisation of the linear
SDE dx = (-A_t x + b_t) dt + L_t dW, i.e. x_{t+1} = (I - dt A_t) x_t + dt b_t + sqrt(dt) L_t eps --
sampled by a parallel (associative) scan. ``GPSLDS.default_guide(weights="conjugate")`` instead draws the
linear weights (A, e) from their exact Gaussian conditional given the sampled path and the other parameters
(:mod:`ppl_switch.guides.conjugate_weights`): the weights are integrated out of the ELBO in closed form.
Paper: Hu, Zoltowski, Nair, Anderson, Duncker & Linderman, "Modeling Latent Neural Dynamics with Gaussian
Process Switching Linear Dynamical Systems".
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.hsgp.laplacian import eigenfunctions
from numpyro.contrib.hsgp.spectral_densities import diag_spectral_density_squared_exponential

from ppl_switch.data import SequenceData, as_sequence_data, check_positive_int
from ppl_switch.distributions.euler_maruyama import EulerMaruyamaPath
from ppl_switch.guides.latent_sde import LatentSDEGuide
from ppl_switch.models._common import require_obs_dim
from ppl_switch.models._emissions import masked_diag_normal_log_prob, masked_mvn_log_prob_cov
from ppl_switch.models.base import Model
from ppl_switch.ops.sde import (
    check_dt,
    inverse_link,
    point_process_log_prob,
    poisson_bin_log_prob,
)

EMISSIONS = ("gaussian", "poisson", "point_process")
FEATURE_MAPS = ("linear", "quadratic")
KERNELS = ("full_linear", "linear")
EMISSION_BIAS_PRIOR_SCALE = 5.0
EMISSION_SCALE_PRIOR_SCALE = 2.0

__all__ = ["GPSLDS", "GPSDE", "feature_map", "ssl_kernel"]


# --------------------------------------------------------------------------------------------------
# Feature maps and the SSL kernel


def feature_map(name: str):
    """phi for the partition: "linear" [1, x] or "quadratic" [1, x^2] (x (..., K) -> (..., K+1))."""
    if name == "linear":
        return lambda x: jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x], -1)
    if name == "quadratic":
        return lambda x: jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x**2], -1)
    raise ValueError(f"features: expected one of {FEATURE_MAPS}, got {name!r}")


def partition(W, tau, phi):
    """pi (..., J) = SoftmaxCentered(phi W / tau): the reference (logit 0) class is last."""
    logits = phi @ W / tau
    return jax.nn.softmax(jnp.concatenate([logits, jnp.zeros(logits.shape[:-1] + (1,), logits.dtype)], -1), -1)


def ssl_kernel(x1, x2, W, tau, centres, slope_var, offset_var, features: str = "linear"):
    """The smoothly switching linear kernel (paper eq. 5), closed form.

    k(x, x') = sum_j pi_j(x) pi_j(x') ((x - c_j)' M (x' - c_j) + sigma0^2).
    Args: x1 (n, K), x2 (m, K), W (F, J-1), tau (), centres (J, K), slope_var (K,) = diag M, offset_var ().
    Returns (n, m).
    """
    phi = feature_map(features)
    p1, p2 = partition(W, tau, phi(x1)), partition(W, tau, phi(x2))
    d1 = x1[:, None, :] - centres[None]  # (n, J, K)
    d2 = x2[:, None, :] - centres[None]
    lin = jnp.einsum("njk,mjk->nmj", d1 * slope_var, d2) + offset_var
    return jnp.einsum("nj,mj,nmj->nm", p1, p2, lin)


# --------------------------------------------------------------------------------------------------
# Shared model code


class _LatentSDEModel(Model):
    """Everything but the drift prior: path, emissions, runner hooks. Subclasses define the drift."""

    num_states = 0
    fixed_point_kind = "drift_roots"  # roots of f(x), Newton from a grid of starts

    def _init_common(self, latent_dim, obs_dim, input_dim, dt, emission, link, initial_scale, fixed_emission):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = None if obs_dim is None else check_positive_int(obs_dim, "obs_dim")
        self.input_dim = check_positive_int(input_dim, "input_dim", minimum=0)
        self.dt = check_dt(dt)
        if emission not in EMISSIONS:
            raise ValueError(f"emission: expected one of {EMISSIONS}, got {emission!r}")
        self.emission = emission
        inverse_link(link)  # validates
        self.link = link
        if not (float(initial_scale) > 0):
            raise ValueError(f"initial_scale: expected a positive number, got {initial_scale!r}")
        self.initial_scale = float(initial_scale)
        self.fixed_emission = None
        if fixed_emission is not None:
            C = np.asarray(fixed_emission["emission_matrix"], float)
            d = np.asarray(fixed_emission["emission_bias"], float)
            if C.ndim != 2 or C.shape[1] != self.latent_dim or d.shape != (C.shape[0],):
                raise ValueError(f"fixed_emission: expected emission_matrix (N, {self.latent_dim}) and emission_bias (N,), "
                                 f"got {C.shape} and {d.shape}")
            if self.obs_dim is not None and C.shape[0] != self.obs_dim:
                raise ValueError(f"fixed_emission: emission_matrix has {C.shape[0]} rows but obs_dim={self.obs_dim}")
            self.obs_dim = C.shape[0]
            self.fixed_emission = {"emission_matrix": C, "emission_bias": d}

    def _common_config(self) -> dict[str, Any]:
        fixed = None
        if self.fixed_emission is not None:
            fixed = {k: v.tolist() for k, v in self.fixed_emission.items()}
        return {"latent_dim": self.latent_dim, "obs_dim": self.obs_dim, "input_dim": self.input_dim, "dt": self.dt,
                "emission": self.emission, "link": self.link, "initial_scale": self.initial_scale,
                "fixed_emission": fixed}

    # ----- data
    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        """Validate data: counts (non-negative integers) for "poisson" and "point_process" emissions."""
        return as_sequence_data(y, mask=mask, lengths=lengths, inputs=inputs, input_dim=self.input_dim,
                                obs_dim=self.obs_dim, counts=self.emission != "gaussian")

    # ----- drift (subclasses)
    def _sample_drift_params(self) -> dict:
        raise NotImplementedError

    def drift(self, params, x) -> jax.Array:
        """Autonomous drift f(x), x (..., K) -> (..., K) (inputs not included)."""
        raise NotImplementedError

    def drift_site_dims(self) -> dict[str, tuple[str, ...]]:
        """Named dims of the drift's parameter sites (a subset of :meth:`site_dims`), e.g. the gpSLDS's
        ``{"fixed_points": ("state", "latent"), ...}``; the path samplers read which sites the drift has here."""
        raise NotImplementedError

    # ----- parameters
    def _emission_params(self, params):
        if self.fixed_emission is not None:
            return jnp.asarray(self.fixed_emission["emission_matrix"]), jnp.asarray(self.fixed_emission["emission_bias"])
        return jnp.asarray(params["emission_matrix"]), jnp.asarray(params["emission_bias"])

    def _sample_params(self, N):
        p = self._sample_drift_params()
        K, I = self.latent_dim, self.input_dim
        if I:
            p["input_matrix"] = numpyro.sample("input_matrix", dist.Normal(0.0, 1.0).expand([K, I]).to_event(2))
        if self.fixed_emission is None:
            p["emission_matrix"] = numpyro.sample("emission_matrix", dist.Normal(0.0, 1.0).expand([N, K]).to_event(2))
            p["emission_bias"] = numpyro.sample("emission_bias", dist.Normal(0.0, EMISSION_BIAS_PRIOR_SCALE).expand([N]).to_event(1))
        if self.emission == "gaussian":
            p["emission_scales"] = numpyro.sample("emission_scales", dist.HalfNormal(EMISSION_SCALE_PRIOR_SCALE).expand([N]).to_event(1))
        return p

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = dict(self.drift_site_dims())
        dims["x"] = ("trial", "time", "latent")
        if self.input_dim:
            dims["input_matrix"] = ("latent", "input")
        if self.fixed_emission is None:
            dims["emission_matrix"] = ("obs", "latent")
            dims["emission_bias"] = ("obs",)
        if self.emission == "gaussian":
            dims["emission_scales"] = ("obs",)
        return dims

    def input_drift(self, params, data: SequenceData):
        """(B, T, K) additive input term B v_t, or None without inputs."""
        if not self.input_dim:
            return None
        return jnp.asarray(data.inputs) @ jnp.asarray(params["input_matrix"]).T

    def path_distribution(self, params, data: SequenceData) -> EulerMaruyamaPath:
        return EulerMaruyamaPath(lambda x: self.drift(params, x), self.input_drift(params, data), self.dt,
                                 self.initial_scale, jnp.asarray(data.time_mask), self.latent_dim)

    def rates(self, params, x):
        """Emission mean (Gaussian) or rate in events per unit time (Poisson / point process), (..., N)."""
        C, d = self._emission_params(params)
        a = x @ C.T + d
        return a if self.emission == "gaussian" else inverse_link(self.link)(a)

    def emission_log_prob(self, params, x, data: SequenceData):
        """(B, T) log p(y_t | x_t) summed over the observed entries."""
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)
        r = self.rates(params, x)
        if self.emission == "gaussian":
            return masked_diag_normal_log_prob(jnp.where(mask, y, 0.0), mask, r, jnp.asarray(params["emission_scales"]))
        fn = poisson_bin_log_prob if self.emission == "poisson" else point_process_log_prob
        return jnp.sum(fn(y, r, self.dt, mask), -1)

    # ----- program
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        params = self._sample_params(data.obs_dim)
        with numpyro.plate("trial", data.num_trials):
            x = numpyro.sample("x", self.path_distribution(params, data))
        numpyro.factor("y", jnp.sum(self.emission_log_prob(params, x, data)))
        if record_log_lik:
            numpyro.deterministic("log_lik", self.emission_log_prob(params, x, data))

    def default_guide(self, data=None, *, init_values=None, init_scale: float = 0.05, latent_scale: float = 3.0,
                      global_affine: bool = False):
        """:class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`: joint normal over parameters, SDE-form Gauss–Markov chain over x
        (``latent_scale``: sd of the data-driven start path, see :meth:`init_values`; ``global_affine``:
        see :class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`)."""
        return LatentSDEGuide(self, data=data, init_values=init_values, init_scale=init_scale, latent_scale=latent_scale,
                              global_affine=global_affine)

    # ----- quantities from one draw
    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, T) pointwise log-likelihood of a draw.

        Gaussian emissions: log p(y_t | y_{<t}, theta) by an extended Kalman filter on the Euler chain
        (x integrated out, drift linearised at the filtered mean; exact for a linear drift) -- a
        predictive quantity independent of the sampled path. Poisson / point process: log p(y_t | x_t)
        given the draw's path ``x``."""
        if self.emission == "gaussian":
            return self.extended_kalman_log_likelihood(params, data)
        return self.emission_log_prob(params, jnp.asarray(params["x"]), data)

    def extended_kalman_log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(B, T) one-step predictive log-likelihoods of Gaussian data by the EKF (masks honoured)."""
        C, d = self._emission_params(params)
        R = jnp.asarray(params["emission_scales"]) ** 2
        K, dt = self.latent_dim, self.dt
        eye = jnp.eye(K)
        Bv = None if not self.input_dim else jnp.asarray(data.inputs) @ jnp.asarray(params["input_matrix"]).T

        def one(y, mask, tm, bv):
            def step(carry, inp):
                m, P = carry
                yt, mt, inside, bt = inp
                S = C @ P @ C.T + jnp.diag(R)
                ll = masked_mvn_log_prob_cov(yt, mt, C @ m + d, S)
                w = mt / R  # information of the observed entries
                prec = jnp.linalg.inv(P) + (C.T * w) @ C
                Pf = jnp.linalg.inv(prec)
                Pf = 0.5 * (Pf + Pf.T)
                mf = m + Pf @ (C.T @ (w * jnp.where(mt, yt - C @ m - d, 0.0)))
                f = self.drift(params, mf)
                J = jax.jacfwd(lambda z: self.drift(params, z))(mf)
                F = eye + dt * J
                m_next = mf + dt * (f + bt)
                P_next = F @ Pf @ F.T + dt * eye
                return (m_next, 0.5 * (P_next + P_next.T)), jnp.where(inside, ll, 0.0)

            init = (jnp.zeros(K), self.initial_scale**2 * eye)
            _, lls = jax.lax.scan(step, init, (y, mask, tm, bv))
            return lls

        B, T = data.y.shape[:2]
        bv = jnp.zeros((B, T, K)) if Bv is None else Bv
        return jax.vmap(one)(jnp.asarray(data.y), jnp.asarray(data.mask), jnp.asarray(data.time_mask), bv)

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """y ~ p(y | x) given the draw's path, shaped like data.y."""
        return self._emit(key, params, jnp.asarray(params["x"]))

    def _emit(self, key, params, x):
        r = self.rates(params, x)
        if self.emission == "gaussian":
            return r + jax.random.normal(key, r.shape, r.dtype) * jnp.asarray(params["emission_scales"])
        counts = jax.random.poisson(key, r * self.dt).astype(r.dtype)
        return jnp.minimum(counts, 1.0) if self.emission == "point_process" else counts

    # ----- simulation
    def _default_drift_params(self, key) -> dict:
        raise NotImplementedError

    def default_params(self, key, obs_dim: Optional[int] = None) -> dict[str, Any]:
        N = require_obs_dim(self) if obs_dim is None else obs_dim
        k_f, k_c, k_d, k_b = jax.random.split(key, 4)
        p = self._default_drift_params(k_f)
        K = self.latent_dim
        if self.fixed_emission is None:
            p["emission_matrix"] = jax.random.normal(k_c, (N, K))
            p["emission_bias"] = (2.0 if self.emission != "gaussian" else 0.0) + 0.5 * jax.random.normal(k_d, (N,))
        if self.input_dim:
            p["input_matrix"] = jax.random.normal(k_b, (K, self.input_dim))
        if self.emission == "gaussian":
            p["emission_scales"] = jnp.full((N,), 0.5)
        return p

    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        """Draw data from the program. Returns (SequenceData, {"latents", "params" (incl. "x")})."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps", minimum=2)
        k_p, k_u, k_x, k_y = jax.random.split(key, 4)
        params = self.default_params(k_p) if params is None else dict(params)
        if self.input_dim and inputs is None:
            inputs = jax.random.normal(k_u, (num_trials, num_timesteps, self.input_dim))
        shell = SequenceData(jnp.zeros((num_trials, num_timesteps, require_obs_dim(self))),
                             jnp.ones((num_trials, num_timesteps, self.obs_dim), bool),
                             jnp.full((num_trials,), num_timesteps), None if inputs is None else jnp.asarray(inputs, float))
        x = self.path_distribution(params, shell).sample(k_x)
        y = self._emit(k_y, params, x)
        data = self.prepare(np.asarray(y), inputs=None if inputs is None else np.asarray(inputs))
        params = {k: jnp.asarray(v) for k, v in params.items()}
        params["x"] = x
        return data, {"latents": x, "params": params}

    # ----- initialisation from data
    def init_values(self, data: SequenceData, *, bin_steps: Optional[int] = None, smooth_bins: float = 2.0,
                    latent_scale: float = 3.0) -> dict[str, np.ndarray]:
        """A data-driven start: x from PCA of smoothed, binned activity (inverse-link transformed),
        rescaled to standard deviation ``latent_scale`` and interpolated to the Euler grid; C, d by least
        squares of the transformed activity on x. ``bin_steps`` Euler steps per bin (default ~20 ms)."""
        y = np.where(data.mask, np.asarray(data.y, float), np.nan)
        B, T, N = y.shape
        K = self.latent_dim
        b = int(bin_steps or max(1, round(0.02 / self.dt)))
        Tc = max(1, T // b)
        yb = np.nanmean(y[:, : Tc * b].reshape(B, Tc, b, N), 2)
        yb = np.where(np.isnan(yb), np.nanmean(yb, (0, 1)), yb)
        if smooth_bins > 0 and Tc > 1:
            w = np.exp(-0.5 * (np.arange(-3 * smooth_bins, 3 * smooth_bins + 1) / smooth_bins) ** 2)
            w /= w.sum()
            pad = len(w) // 2
            yp = np.pad(yb, ((0, 0), (pad, pad), (0, 0)), mode="edge")
            yb = np.stack([sum(w[i] * yp[:, i : i + Tc, n] for i in range(len(w))) for n in range(N)], -1)
        if self.emission != "gaussian":
            rate = np.maximum(yb / self.dt, 1e-2)
            z = np.log(rate) if self.link == "exp" else np.log(np.expm1(np.minimum(rate, 50.0))) * (rate < 50) + rate * (rate >= 50)
        else:
            z = yb
        flat = z.reshape(-1, N)
        mean = flat.mean(0)
        _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
        lat = (flat - mean) @ vt[:K].T
        lat = lat / (lat.std(0) + 1e-9) * latent_scale
        X = np.concatenate([lat, np.ones((len(lat), 1))], 1)
        coef, *_ = np.linalg.lstsq(X, flat, rcond=None)
        lat = lat.reshape(B, Tc, K)
        tc = (np.arange(Tc) + 0.5) * b
        x = np.stack([np.stack([np.interp(np.arange(T), tc, lat[i, :, k]) for k in range(K)], -1) for i in range(B)])
        out = {"x": x}
        if self.fixed_emission is None:
            out["emission_matrix"] = coef[:K].T
            out["emission_bias"] = coef[K]
        if self.emission == "gaussian":
            resid = flat - X @ coef
            out["emission_scales"] = np.maximum(resid.std(0), 1e-2)
        out.update(self._init_drift_values(x, data))
        return out

    def _init_drift_values(self, x, data) -> dict:
        return {}

    def path_start_parameters(self, x) -> dict[str, np.ndarray]:
        """Parameter start values derived from a start path x (B, T, K) that the data-only guide start
        uses (everything else starts at its prior median). None by default."""
        return {}


# --------------------------------------------------------------------------------------------------
# gpSLDS


class GPSLDS(_LatentSDEModel):
    """gpSLDS: latent SDE with the smoothly switching linear (SSL) kernel prior on the drift.

    Args:
        num_states: J, the number of linear regimes (>= 1).
        latent_dim: K.
        obs_dim: N (None = from the data).
        input_dim: I, additive inputs B v(t) (0 = none).
        dt: the Euler step (time units of the rates, e.g. seconds).
        emission: "point_process" (default; events on the grid), "poisson" (counts per bin) or "gaussian".
        link: "softplus" (default) or "exp" for the Poisson families.
        features: partition feature map phi: "linear" [1, x] or "quadratic" [1, x^2].
        kernel: "full_linear" (M = diag(slope_scales^2), sigma0 learned) or "linear" (M = I, sigma0 = 1).
        fixed_point_scale: prior sd s_c of the centres c_j.
        initial_scale: prior sd s_0 of x_0.
        fixed_emission: optional {"emission_matrix": (N, K), "emission_bias": (N,)} held fixed (anchors
            the latent coordinates, as the paper's App. C does).
    """

    name = "gpslds"
    example_config = dict(num_states=2, latent_dim=2, obs_dim=3, input_dim=1, emission="gaussian", dt=0.01)
    recommended_runner = ("svi_path_refinement", {"num_rounds": 2, "latent_scale": 2.0})  # the card's refined SVI fit

    def __init__(self, num_states: int = 2, latent_dim: int = 2, obs_dim: Optional[int] = None, input_dim: int = 0, *,
                 dt: float = 0.001, emission: str = "point_process", link: str = "softplus", features: str = "linear",
                 kernel: str = "full_linear", fixed_point_scale: float = 3.0, initial_scale: float = 10.0,
                 fixed_emission=None):
        self.num_states = check_positive_int(num_states, "num_states")
        self._init_common(latent_dim, obs_dim, input_dim, dt, emission, link, initial_scale, fixed_emission)
        feature_map(features)
        self.features = features
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        if not float(fixed_point_scale) > 0:
            raise ValueError(f"fixed_point_scale: expected a positive number, got {fixed_point_scale!r}")
        self.fixed_point_scale = float(fixed_point_scale)

    def default_guide(self, data=None, *, init_values=None, init_scale: float = 0.05, weights: str = "joint",
                      latent_scale: float = 3.0, global_affine: bool = False):
        """The SVI guide: SDE-form Gauss–Markov chain over x and, for the parameters,

        * ``weights="joint"``: :class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`, one joint normal over all parameters, A and e included;
        * ``weights="conjugate"``: :class:`~ppl_switch.guides.conjugate_weights.ConjugateWeightsGuide`, a
          joint normal over the other parameters and, for A and e, their exact Gaussian conditional given
          the sampled path and parameters (the weights integrated out in closed form).

        ``latent_scale``: sd of the data-driven start path (:meth:`init_values`). With Sigma = I the scale
        of x is identified, but SVI hardly moves a whole start path: on the limit cycle (true latent sd
        1.5) a start at 3 ended 2600 nats worse than one at 1.5. Try a few and keep the best ELBO.
        ``global_affine``: map q(x) by one learned affine x -> S x + m (:class:`~ppl_switch.guides.latent_sde.LatentSDEGuide`).
        """
        kwargs = dict(data=data, init_values=init_values, init_scale=init_scale, latent_scale=latent_scale,
                      global_affine=global_affine)
        if weights == "joint":
            return LatentSDEGuide(self, **kwargs)
        if weights == "conjugate":
            from ppl_switch.guides.conjugate_weights import ConjugateWeightsGuide

            return ConjugateWeightsGuide(self, **kwargs)
        raise ValueError(f"weights: expected 'joint' or 'conjugate', got {weights!r}")

    @property
    def num_features(self) -> int:
        return self.latent_dim + 1

    def config(self) -> dict[str, Any]:
        return {"num_states": self.num_states, **self._common_config(), "features": self.features,
                "kernel": self.kernel, "fixed_point_scale": self.fixed_point_scale}

    def drift_site_dims(self):
        dims = {"fixed_points": ("state", "latent"), "regime_matrix": ("state", "latent", "latent_in"),
                "regime_offset": ("state", "latent")}
        if self.num_states > 1:
            dims["partition_weights"] = ("feature", "boundary")
            dims["temperature"] = ()
        if self.kernel == "full_linear":
            dims["slope_scales"] = ("latent_in",)
            dims["offset_scale"] = ()
        return dims

    def _sample_drift_params(self):
        J, K, F = self.num_states, self.latent_dim, self.num_features
        p = {}
        if J > 1:
            p["partition_weights"] = numpyro.sample("partition_weights", dist.Normal(0.0, 1.0).expand([F, J - 1]).to_event(2))
            p["temperature"] = numpyro.sample("temperature", dist.LogNormal(math.log(0.5), 0.5))
        p["fixed_points"] = numpyro.sample("fixed_points", dist.Normal(0.0, self.fixed_point_scale).expand([J, K]).to_event(2))
        if self.kernel == "full_linear":
            m = numpyro.sample("slope_scales", dist.LogNormal(0.0, 1.0).expand([K]).to_event(1))
            s0 = numpyro.sample("offset_scale", dist.LogNormal(0.0, 1.0))
        else:
            m, s0 = jnp.ones(K), 1.0
        p["regime_matrix"] = numpyro.sample("regime_matrix", dist.Normal(0.0, jnp.broadcast_to(m, (J, K, K))).to_event(3))
        p["regime_offset"] = numpyro.sample("regime_offset", dist.Normal(0.0, s0 * jnp.ones((J, K))).to_event(2))
        return p

    def partition(self, params, x):
        """pi(x) (..., J); all ones for J = 1."""
        if self.num_states == 1:
            return jnp.ones(x.shape[:-1] + (1,), x.dtype)
        return partition(jnp.asarray(params["partition_weights"]), params["temperature"], feature_map(self.features)(x))

    def regime_drifts(self, params, x):
        """(..., J, K) each regime's linear function A_j (x - c_j) + e_j."""
        A, c, e = (jnp.asarray(params[k]) for k in ("regime_matrix", "fixed_points", "regime_offset"))
        return jnp.einsum("jkl,...jl->...jk", A, x[..., None, :] - c) + e

    def drift(self, params, x):
        return jnp.einsum("...j,...jk->...k", self.partition(params, x), self.regime_drifts(params, x))

    def weight_features(self, params, x):
        """Phi(x) (..., J, K+1) = pi_j(x) [x - c_j, 1]: f_k(x) = sum_j Phi_j(x) . [A_j[k], e_j[k]]."""
        pi = self.partition(params, x)
        d = x[..., None, :] - jnp.asarray(params["fixed_points"])
        return pi[..., None] * jnp.concatenate([d, jnp.ones(d.shape[:-1] + (1,), d.dtype)], -1)

    # ----- the weights (A_j, e_j) are linear-Gaussian given the path (conjugate form)
    @property
    def num_weights(self) -> int:
        """D = J (K+1): the drift weights per latent output dimension."""
        return self.num_states * (self.latent_dim + 1)

    def weight_prior_precision(self, params):
        """(D,) prior precision of one output dimension's weights [A_j[k, :], e_j[k]]_j (regime-major)."""
        K = self.latent_dim
        if self.kernel == "full_linear":
            m, s0 = jnp.asarray(params["slope_scales"]), jnp.asarray(params["offset_scale"])
        else:
            m, s0 = jnp.ones(K), jnp.asarray(1.0)
        one = jnp.concatenate([1.0 / m**2, (1.0 / s0**2)[None]])
        return jnp.tile(one, self.num_states)

    def weight_regression_stats(self, params, x, data: SequenceData):
        """:class:`~ppl_switch.ops.conjugate_drift.RegressionStats` of the path x (B, T, K): the Euler
        increments minus the input term, regressed on Phi(x_t) flattened to (D,); padded steps excluded."""
        from ppl_switch.ops.conjugate_drift import regression_stats

        phi = self.weight_features(params, x[:, :-1])
        phi = phi.reshape(phi.shape[:-2] + (self.num_weights,))
        r = x[:, 1:] - x[:, :-1]
        u = self.input_drift(params, data)
        if u is not None:
            r = r - self.dt * u[:, :-1]
        return regression_stats(phi, r, jnp.asarray(data.time_mask)[:, 1:])

    def weights_to_sites(self, weights):
        """(..., K, D) weights, column k = output dimension k, -> {"regime_matrix": (..., J, K, K),
        "regime_offset": (..., J, K)}."""
        J, K = self.num_states, self.latent_dim
        w = jnp.swapaxes(weights.reshape(weights.shape[:-1] + (J, K + 1)), -2, -3)  # (..., J, K, K+1)
        return {"regime_matrix": w[..., :K], "regime_offset": w[..., K]}

    def _default_drift_params(self, key):
        """Regime j: a slowly decaying rotation (rate 2 /s, decay 0.5 /s) around a centre on a circle of
        radius 3; boundaries on a random direction (linear features) or the circle of radius 2 (quadratic)."""
        J, K, F = self.num_states, self.latent_dim, self.num_features
        k_w, k_c = jax.random.split(key)
        mats, centres = [], []
        for j in range(J):
            A = -0.5 * np.eye(K)
            if K > 1:
                sign = 1.0 if j % 2 == 0 else -1.0
                A[0, 1], A[1, 0] = -2.0 * sign, 2.0 * sign
            mats.append(A)
            angle = 2 * math.pi * j / J
            c = np.zeros(K)
            c[0] = 3 * math.cos(angle)
            if K > 1:
                c[1] = 3 * math.sin(angle)
            centres.append(c if J > 1 else np.zeros(K))
        p = {"fixed_points": jnp.asarray(np.stack(centres)), "regime_matrix": jnp.asarray(np.stack(mats)),
             "regime_offset": jnp.zeros((J, K))}
        if J > 1:
            p["partition_weights"] = jax.random.normal(k_w, (F, J - 1))
            if self.features == "quadratic":
                p["partition_weights"] = jnp.asarray(np.tile(np.r_[4.0, -np.ones(K)][:, None], (1, J - 1)))
            p["temperature"] = jnp.asarray(0.5)
        if self.kernel == "full_linear":
            p["slope_scales"] = jnp.ones(K)
            p["offset_scale"] = jnp.asarray(1.0)
        return p

    def _init_drift_values(self, x, data):
        """Centres at k-means-like quantiles of the initial path, small rotations, tau = 0.5."""
        J, K = self.num_states, self.latent_dim
        flat = x.reshape(-1, K)
        rng = np.random.default_rng(0)
        centres = flat[rng.choice(len(flat), J, replace=False)] if J > 1 else flat.mean(0, keepdims=True)
        out = {"fixed_points": centres, "regime_matrix": np.zeros((J, K, K)), "regime_offset": np.zeros((J, K))}
        if J > 1:
            out["partition_weights"] = 0.1 * rng.standard_normal((self.num_features, J - 1))
            out["temperature"] = np.asarray(0.5)
        return out

    def path_start_parameters(self, x) -> dict[str, np.ndarray]:
        """Quadratic features: the partition starts at the circle through the start path's median radius,
        w = (median r^2, -1, ..., -1) / sd(r^2), tau = 0.5 (regime 0 inside). At the prior median (w = 0,
        pi = 1/2 everywhere) the regimes are exchangeable and, when they share a centre (a limit cycle),
        gradient SVI does not break the tie: the limit-cycle fit collapsed to one regime from there and
        reached a 113-nat worse ELBO (benchmarks/results.md, gpSLDS history). Linear features keep the prior median."""
        if self.features != "quadratic" or self.num_states < 2:
            return {}
        r2 = np.sum(np.reshape(np.asarray(x, float), (-1, self.latent_dim)) ** 2, -1)
        w = np.r_[np.median(r2), -np.ones(self.latent_dim)] / (np.std(r2) + 1e-9)
        return {"partition_weights": np.tile(w[:, None], (1, self.num_states - 1)), "temperature": np.asarray(0.5)}

    # ----- regimes as "states"
    def state_posterior(self, params, data: SequenceData):
        """Regime probabilities along the draw's path: pi(x_t) (B, T, J) and the most likely regime."""
        pi = self.partition(params, jnp.asarray(params["x"]))
        return {"state_probs": pi, "viterbi": jnp.argmax(pi, -1).astype(jnp.int32)}

    def sample_states(self, key, params, data: SequenceData):
        """One regime label per step, z_t ~ Categorical(pi(x_t)) (the soft partition has no chain)."""
        pi = self.partition(params, jnp.asarray(params["x"]))
        return jax.random.categorical(key, jnp.log(pi)).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# GP-SDE with an RBF kernel (HSGP approximation)


class GPSDE(_LatentSDEModel):
    """GP-SDE baseline: f_k ~ GP(0, s^2 exp(-|x - x'|^2 / 2 l^2)) through a Hilbert-space (HSGP) basis of
    ``num_basis`` eigenfunctions per latent dimension on the box [-box, box]^K.

    Args as :class:`GPSLDS` (no regimes), plus ``num_basis`` (per dimension), ``box`` (half-width; take
    1.5-2 times the latent range), ``lengthscale_prior`` and ``amplitude_prior`` (medians of LogNormal
    priors with sd 0.5 and 1 on the log scale).
    """

    name = "gpsde"
    example_config = dict(latent_dim=2, obs_dim=3, input_dim=1, emission="gaussian", dt=0.01, num_basis=4)

    def __init__(self, latent_dim: int = 2, obs_dim: Optional[int] = None, input_dim: int = 0, *, dt: float = 0.001,
                 emission: str = "point_process", link: str = "softplus", num_basis: int = 10, box: float = 15.0,
                 lengthscale_prior: float = 3.0, amplitude_prior: float = 10.0, initial_scale: float = 10.0,
                 fixed_emission=None):
        self._init_common(latent_dim, obs_dim, input_dim, dt, emission, link, initial_scale, fixed_emission)
        self.num_basis = check_positive_int(num_basis, "num_basis")
        if not (float(box) > 0 and float(lengthscale_prior) > 0 and float(amplitude_prior) > 0):
            raise ValueError(f"box, lengthscale_prior, amplitude_prior: expected positive numbers, got {box}, "
                             f"{lengthscale_prior}, {amplitude_prior}")
        self.box, self.lengthscale_prior, self.amplitude_prior = float(box), float(lengthscale_prior), float(amplitude_prior)

    @property
    def num_features(self) -> int:
        return self.num_basis**self.latent_dim

    def config(self):
        return {**self._common_config(), "num_basis": self.num_basis, "box": self.box,
                "lengthscale_prior": self.lengthscale_prior, "amplitude_prior": self.amplitude_prior}

    def drift_site_dims(self):
        return {"rbf_lengthscale": (), "rbf_amplitude": (), "rbf_weights": ("basis", "latent")}

    def _sample_drift_params(self):
        return {
            "rbf_lengthscale": numpyro.sample("rbf_lengthscale", dist.LogNormal(math.log(self.lengthscale_prior), 0.5)),
            "rbf_amplitude": numpyro.sample("rbf_amplitude", dist.LogNormal(math.log(self.amplitude_prior), 1.0)),
            "rbf_weights": numpyro.sample("rbf_weights", dist.Normal(0.0, 1.0).expand([self.num_features, self.latent_dim]).to_event(2)),
        }

    def basis(self, params, x):
        """(..., L) HSGP features scaled by the square root of the SE spectral density."""
        K = self.latent_dim
        batch = x.shape[:-1]
        phi = eigenfunctions(x.reshape(-1, K), ell=self.box, m=self.num_basis)
        spd = diag_spectral_density_squared_exponential(alpha=params["rbf_amplitude"] ** 2, length=params["rbf_lengthscale"],
                                                        ell=self.box, m=self.num_basis, dim=K)
        return (phi * jnp.sqrt(spd)).reshape(batch + (-1,))

    def drift(self, params, x):
        return self.basis(params, x) @ jnp.asarray(params["rbf_weights"])

    def _default_drift_params(self, key):
        return {"rbf_lengthscale": jnp.asarray(self.lengthscale_prior), "rbf_amplitude": jnp.asarray(1.0),
                "rbf_weights": jax.random.normal(key, (self.num_features, self.latent_dim))}

    def _init_drift_values(self, x, data):
        return {"rbf_weights": np.zeros((self.num_features, self.latent_dim)),
                "rbf_lengthscale": np.asarray(self.lengthscale_prior), "rbf_amplitude": np.asarray(self.amplitude_prior)}
