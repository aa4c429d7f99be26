"""Linear dynamical system (linear-Gaussian state space model), Kalman-marginalised.

Generative program (trial n, step t = 0..T-1, latent dim H, obs dim D, input dim U)::

    m0 ~ N(0, I_H)                                       initial_mean       (H,)
    A  ~ N(0.9 I, 0.5^2) elementwise                     dynamics_matrix    (H, H)
    b  ~ N(0, 1)                                         dynamics_bias      (H,)
    B  ~ N(0, 1)                                         dynamics_input_weights (H, U), if U > 0
    C  ~ N(0, 1)                                         emission_matrix    (D, H)
    d  ~ N(0, 5^2)                                       emission_bias      (D,)
    F  ~ N(0, 1)                                         emission_input_weights (D, U), if U > 0
    r  ~ HalfNormal(2)                                   emission_scales    (D,)
    x_0 ~ N(m0, I),   x_{t+1} = A x_t + b + B u_{t+1} + N(0, I)
    y_t = C x_t + d + F u_t + N(0, diag(r^2))

Options. ``fixed`` holds known values of any of initial_mean, dynamics_matrix, dynamics_bias,
emission_matrix, emission_bias (they are then constants, not sites). ``dynamics_cov="diagonal"``
learns Q = diag(q^2) (site dynamics_scales ~ HalfNormal(1)) instead of Q = I -- identified once the
emission matrix is fixed. ``initial_cov="learned"`` learns S0 = diag(s0^2) (site initial_scales ~
HalfNormal(5)); ``initial_cov="diffuse"`` puts a flat prior on x_0: the likelihood is then the
diffuse one, log p(y_{1:T-1} | y_0), with x_0 | y_0 ~ N((C'R^-1 C)^-1 C'R^-1 (y_0 - d), (C'R^-1 C)^-1)
(needs y_0 fully observed and D >= H; the local-level model is LDS(1, 1, fixed={A: 1, C: 1, b: 0,
d: 0}, dynamics_cov="diagonal", initial_cov="diffuse")).

Identifiability. The latent scale is fixed by Q = I and S0 = I (any other full-rank Q is absorbed into
C); what remains is an orthogonal change of latent basis x -> O x (A -> O A O', b -> O b, C -> C O'),
under which the likelihood and these priors are invariant. Raw A, C, b, m0 are therefore not
identified when H > 1 (a sign flip when H = 1); :meth:`LDS.invariants` returns quantities that are.

The latent path is integrated out with the Kalman filter (``ppl_switch.ops.kalman``), so NUTS and SVI
sample only the parameters; :meth:`LDS.latent_posterior` gives the smoothed path afterwards.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl_switch.compile_cache import labelled_model_key
from ppl_switch.data import DataError, SequenceData, as_sequence_data, check_positive_int
from ppl_switch.guides.init import init_to_sample_then_median
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.models._common import check_nonneg_int, check_optional_dim, require_obs_dim
from ppl_switch.models._emissions import masked_mvn_log_prob_cov
from ppl_switch.models.base import Model
from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter, lgssm_sample, lgssm_simulate, lgssm_smoother

DYNAMICS_PRIOR_CENTER = 0.9
DYNAMICS_PRIOR_SCALE = 0.5
EMISSION_BIAS_PRIOR_SCALE = 5.0
EMISSION_SCALE_PRIOR_SCALE = 2.0
DYNAMICS_SCALE_PRIOR_SCALE = 1.0
INITIAL_SCALE_PRIOR_SCALE = 5.0
FIXABLE = ("initial_mean", "dynamics_matrix", "dynamics_bias", "emission_matrix", "emission_bias")
INITIAL_COVS = ("identity", "learned", "diffuse")
DYNAMICS_COVS = ("identity", "diagonal")


class LDS(Model):
    """Gaussian linear dynamical system with optional known inputs.

    Args:
        latent_dim: H >= 1.
        obs_dim: D, or None to take it from the data.
        input_dim: U >= 0; inputs enter the dynamics (B u) and the emissions (F u).
        fixed: optional dict of known parameter values (names in ``FIXABLE``); they are not learned.
        dynamics_cov: "identity" (Q = I) or "diagonal" (learned diag(q^2)).
        initial_cov: "identity" (S0 = I), "learned" (diag(s0^2)) or "diffuse" (flat prior on x_0).
    """

    name = "lds"
    example_config = dict(latent_dim=2, obs_dim=3, input_dim=1)
    num_states = 0
    recommended_runner = ("em", {})
    fixed_point_kind = "affine"  # x* = (I - A)^-1 b per draw

    def __init__(self, latent_dim: int, obs_dim: Optional[int] = None, input_dim: int = 0, *, fixed=None,
                 dynamics_cov: str = "identity", initial_cov: str = "identity"):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = check_optional_dim(obs_dim, "obs_dim")
        self.input_dim = check_nonneg_int(input_dim, "input_dim")
        self.emission = "gaussian"
        if dynamics_cov not in DYNAMICS_COVS:
            raise ValueError(f"dynamics_cov: expected one of {DYNAMICS_COVS}, got {dynamics_cov!r}")
        if initial_cov not in INITIAL_COVS:
            raise ValueError(f"initial_cov: expected one of {INITIAL_COVS}, got {initial_cov!r}")
        self.dynamics_cov, self.initial_cov = dynamics_cov, initial_cov
        self.fixed = self._check_fixed(fixed or {})
        if initial_cov == "diffuse":
            if "initial_mean" in self.fixed:
                raise ValueError("fixed: initial_mean has no meaning with initial_cov='diffuse' (x_0 has a flat prior)")
            if self.obs_dim is not None and self.obs_dim < self.latent_dim:
                raise ValueError(
                    f"initial_cov='diffuse' needs obs_dim >= latent_dim (y_0 must determine x_0), got obs_dim="
                    f"{self.obs_dim} < latent_dim={self.latent_dim}"
                )

    def _check_fixed(self, fixed) -> dict[str, np.ndarray]:
        H, D = self.latent_dim, self.obs_dim
        shapes = {"initial_mean": (H,), "dynamics_matrix": (H, H), "dynamics_bias": (H,),
                  "emission_matrix": (D, H), "emission_bias": (D,)}
        out = {}
        for name, value in dict(fixed).items():
            if name not in FIXABLE:
                raise ValueError(f"fixed: unknown parameter {name!r}; fixable parameters are {list(FIXABLE)}")
            arr = np.asarray(value, dtype=float)
            if D is None and name.startswith("emission"):
                raise ValueError(f"fixed: give obs_dim when fixing {name}")
            if arr.shape != shapes[name] or not np.all(np.isfinite(arr)):
                raise ValueError(f"fixed: {name} must be a finite array of shape {shapes[name]}, got shape {arr.shape}")
            out[name] = arr
        return out

    def config(self) -> dict[str, Any]:
        cfg = {"latent_dim": self.latent_dim, "obs_dim": self.obs_dim, "input_dim": self.input_dim}
        if self.fixed:
            cfg["fixed"] = {k: v.tolist() for k, v in self.fixed.items()}
        if self.dynamics_cov != "identity":
            cfg["dynamics_cov"] = self.dynamics_cov
        if self.initial_cov != "identity":
            cfg["initial_cov"] = self.initial_cov
        return cfg

    def prepare(self, y, *, mask=None, lengths=None, inputs=None) -> SequenceData:
        data = super().prepare(y, mask=mask, lengths=lengths, inputs=inputs)
        if self.initial_cov == "diffuse":
            if data.obs_dim < self.latent_dim:
                raise DataError(f"y: initial_cov='diffuse' needs obs_dim >= latent_dim={self.latent_dim}, got {data.obs_dim}")
            if not np.asarray(data.mask)[:, 0].all():
                raise DataError("mask: initial_cov='diffuse' needs the first step of every trial fully observed")
        return data

    def full_params(self, params) -> dict[str, Any]:
        """``params`` with the fixed values added (what the likelihood reads)."""
        out = dict(params)
        for name, value in self.fixed.items():
            out[name] = jnp.asarray(value, jnp.result_type(float))
        return out

    def affine_dynamics(self, samples, obs_dim: int):
        """x -> A x + b per draw (zero input): see :meth:`Model.affine_dynamics`."""
        get = lambda name: np.asarray(samples[name], float)  # noqa: E731
        return get("dynamics_matrix"), get("dynamics_bias"), ("chain", "draw"), "latent", None

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "initial_mean": ("latent",),
            "dynamics_matrix": ("latent", "latent_prev"),
            "dynamics_bias": ("latent",),
            "emission_matrix": ("obs", "latent"),
            "emission_bias": ("obs",),
            "emission_scales": ("obs",),
        }
        for name in self.fixed:
            dims.pop(name)
        if self.initial_cov == "diffuse":
            dims.pop("initial_mean")
        if self.dynamics_cov == "diagonal":
            dims["dynamics_scales"] = ("latent",)
        if self.initial_cov == "learned":
            dims["initial_scales"] = ("latent",)
        if self.input_dim:
            dims["dynamics_input_weights"] = ("latent", "input")
            dims["emission_input_weights"] = ("obs", "input")
        return dims

    # ----- program ------------------------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        H, D, U = self.latent_dim, data.obs_dim, self.input_dim

        def normal(loc, scale, shape):
            return dist.Normal(loc, scale).expand(shape).to_event(len(shape))

        priors = {
            "initial_mean": normal(0.0, 1.0, [H]),
            "dynamics_matrix": dist.Normal(DYNAMICS_PRIOR_CENTER * jnp.eye(H), DYNAMICS_PRIOR_SCALE).to_event(2),
            "dynamics_bias": normal(0.0, 1.0, [H]),
            "emission_matrix": normal(0.0, 1.0, [D, H]),
            "emission_bias": normal(0.0, EMISSION_BIAS_PRIOR_SCALE, [D]),
            "emission_scales": dist.HalfNormal(EMISSION_SCALE_PRIOR_SCALE).expand([D]).to_event(1),
        }
        if self.initial_cov == "diffuse":
            priors.pop("initial_mean")
        # fixed parameters are constants (full_params adds them), the rest are sites
        params = self.full_params({name: numpyro.sample(name, prior) for name, prior in priors.items() if name not in self.fixed})
        if self.dynamics_cov == "diagonal":
            params["dynamics_scales"] = numpyro.sample(
                "dynamics_scales", dist.HalfNormal(DYNAMICS_SCALE_PRIOR_SCALE).expand([H]).to_event(1)
            )
        if self.initial_cov == "learned":
            params["initial_scales"] = numpyro.sample(
                "initial_scales", dist.HalfNormal(INITIAL_SCALE_PRIOR_SCALE).expand([H]).to_event(1)
            )
        if U:
            params["dynamics_input_weights"] = numpyro.sample("dynamics_input_weights", normal(0.0, 1.0, [H, U]))
            params["emission_input_weights"] = numpyro.sample("emission_input_weights", normal(0.0, 1.0, [D, U]))
        # the latent path is integrated out by the Kalman filter, trial by trial
        with numpyro.plate("trial", data.num_trials):
            numpyro.factor("y", self.marginal_log_likelihood(params, data))
        if record_log_lik:
            numpyro.deterministic("log_lik", self.log_likelihood(params, data))

    def default_guide(self):
        """A mean-field normal over all parameters (AutoNormal's family, compiled set-up:
        :class:`~ppl_switch.guides.mean_field.MeanFieldNormal`), started at the prior median (A = 0.9 I, stable dynamics)
        except the emission matrix, started from a prior draw: C = 0 is a stationary point of the
        marginal likelihood (it is quadratic in C there), so starting exactly at it stalls."""
        return MeanFieldNormal(self.program, init_loc_fn=init_to_sample_then_median(["emission_matrix"]), init_scale=0.1,
                               cache_key=labelled_model_key("init_to_sample_then_median(emission_matrix)", self))

    # ----- the state space model of one parameter draw -----------------------------------------
    def lgssm_params(self, params, data: SequenceData, *, simulate: bool = False) -> LGSSMParams:
        """Batched :class:`LGSSMParams` for every trial: leading axis trials; inputs folded into
        time-varying biases ((trials, T-1, H) dynamics, (trials, T, D) emissions) when U > 0.

        With ``initial_cov="diffuse"`` the initial moments are those of x_0 | y_0 under the flat prior
        (filter with :meth:`filter_mask`, which drops step 0); ``simulate=True`` uses N(0, I) instead."""
        params = self.full_params(params)
        H = self.latent_dim
        N = data.num_trials
        A = jnp.asarray(params["dynamics_matrix"])
        C = jnp.asarray(params["emission_matrix"])
        b = jnp.asarray(params["dynamics_bias"])
        d = jnp.asarray(params["emission_bias"])
        dtype = jnp.result_type(A, C, float)
        if self.input_dim:
            u = jnp.asarray(data.inputs, dtype)
            b = b + u[:, 1:] @ jnp.asarray(params["dynamics_input_weights"]).T  # (N, T-1, H)
            d = d + u @ jnp.asarray(params["emission_input_weights"]).T  # (N, T, D)
        else:
            b = jnp.broadcast_to(b, (N,) + b.shape)
            d = jnp.broadcast_to(d, (N,) + d.shape)
        eye = jnp.eye(H, dtype=dtype)
        r2 = jnp.asarray(params["emission_scales"]) ** 2

        def batch(x):
            return jnp.broadcast_to(x, (N,) + jnp.shape(x))

        Q = jnp.diag(jnp.asarray(params["dynamics_scales"], dtype) ** 2) if self.dynamics_cov == "diagonal" else eye
        if self.initial_cov == "diffuse" and simulate:
            m0, S0 = batch(jnp.zeros(H, dtype)), batch(eye)
        elif self.initial_cov == "diffuse":  # x_0 | y_0 with a flat prior on x_0
            y0 = jnp.asarray(data.y, dtype)[:, 0]
            d0 = d[:, 0] if d.ndim == 3 else d
            CtRinv = C.T / r2  # (H, D)
            S0 = batch(jnp.linalg.inv(CtRinv @ C))
            S0 = 0.5 * (S0 + jnp.swapaxes(S0, -1, -2))
            m0 = jnp.einsum("nhk,kd,nd->nh", S0, CtRinv, y0 - d0)
        else:
            m0 = batch(jnp.asarray(params["initial_mean"], dtype))
            S0 = batch(jnp.diag(jnp.asarray(params["initial_scales"], dtype) ** 2) if self.initial_cov == "learned" else eye)

        return LGSSMParams(
            initial_mean=m0,
            initial_cov=S0,
            dynamics_matrix=batch(A),
            dynamics_bias=b,
            dynamics_cov=batch(Q),
            emission_matrix=batch(C),
            emission_bias=d,
            emission_cov=None,
            emission_cov_diag=batch(r2),
        )

    def filter_mask(self, data: SequenceData) -> jax.Array:
        """(trials, T, D) mask the Kalman filter conditions on: ``data.mask``, without step 0 when the
        initial state is diffuse (y_0 is already in the initial moments)."""
        mask = jnp.asarray(data.mask)
        if self.initial_cov == "diffuse":
            mask = mask.at[:, 0].set(False)
        return mask

    # ----- quantities from one draw -------------------------------------------------------------
    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, T) one-step predictive log p(y_t | y_{<t}) over the observed entries (0 where none);
        sums to the Kalman marginal likelihood."""
        lg = self.lgssm_params(params, data)
        y, mask = jnp.asarray(data.y), self.filter_mask(data)

        def one(p, y_n, m_n):
            filt = lgssm_filter(p, y_n, m_n)
            mean = filt.predicted_means @ p.emission_matrix.T + p.emission_bias
            cov = p.emission_matrix @ filt.predicted_covs @ p.emission_matrix.T + jnp.diag(p.emission_cov_diag)
            return masked_mvn_log_prob_cov(y_n, m_n, mean, cov)

        return jax.vmap(one)(lg, y, mask)

    def marginal_log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials,) Kalman-filter log p(y_n) of each trial."""
        lg = self.lgssm_params(params, data)
        return jax.vmap(lambda p, y, m: lgssm_filter(p, y, m).log_likelihood)(lg, jnp.asarray(data.y), self.filter_mask(data))

    def latent_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        """Smoothed p(x_t | y): ``{"means": (trials, T, H), "covs": (trials, T, H, H)}`` (past a
        trial's length these are predictions)."""
        lg = self.lgssm_params(params, data)
        out = jax.vmap(lambda p, y, m: lgssm_smoother(p, y, m))(lg, jnp.asarray(data.y), self.filter_mask(data))
        return {"means": out.smoothed_means, "covs": out.smoothed_covs}

    def sample_latents(self, key, params, data: SequenceData) -> jax.Array:
        """One posterior path x ~ p(x | y), (trials, T, H)."""
        lg = self.lgssm_params(params, data)
        keys = jax.random.split(key, data.num_trials)
        return jax.vmap(lambda k, p, y, m: lgssm_sample(k, p, y, m))(keys, lg, jnp.asarray(data.y), self.filter_mask(data))

    def state_posterior(self, params, data):
        raise NotImplementedError("the LDS has no discrete states (num_states=0); use latent_posterior")

    def sample_states(self, key, params, data):
        raise NotImplementedError("the LDS has no discrete states (num_states=0); use sample_latents")

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """y_rep = C x + d + F u + noise with x a posterior latent path, shaped like ``data.y``."""
        key_x, key_y = jax.random.split(key)
        params = self.full_params(params)
        x = self.sample_latents(key_x, params, data)
        lg = self.lgssm_params(params, data)
        bias = lg.emission_bias if lg.emission_bias.ndim == 3 else lg.emission_bias[:, None, :]
        mean = jnp.einsum("dh,nth->ntd", jnp.asarray(params["emission_matrix"]), x) + bias
        return mean + jnp.asarray(params["emission_scales"]) * jax.random.normal(key_y, mean.shape, mean.dtype)

    # ----- simulation ---------------------------------------------------------------------------
    def simulate(self, key, num_trials: int, num_timesteps: int, *, params=None, inputs=None):
        """Draw data. Without ``inputs`` and with input_dim > 0, inputs are standard-normal draws."""
        num_trials = check_positive_int(num_trials, "num_trials")
        num_timesteps = check_positive_int(num_timesteps, "num_timesteps")
        key_params, key_sim, key_u = jax.random.split(key, 3)
        params = self.default_params(key_params) if params is None else dict(params)
        if inputs is None and self.input_dim:
            inputs = np.asarray(jax.random.normal(key_u, (num_trials, num_timesteps, self.input_dim)))
        if inputs is not None:
            inputs = np.asarray(inputs, dtype=float)
            if inputs.shape != (num_trials, num_timesteps, self.input_dim):
                raise DataError(
                    f"inputs: expected shape ({num_trials}, {num_timesteps}, {self.input_dim}), got {inputs.shape}"
                )
        params = self.full_params(params)
        D = jnp.asarray(params["emission_bias"]).shape[-1]
        shell = SequenceData(
            np.zeros((num_trials, num_timesteps, D)),
            np.ones((num_trials, num_timesteps, D), bool),
            np.full(num_trials, num_timesteps, np.int32),
            inputs,
        )

        @jax.jit  # one compilation instead of op-by-op dispatch
        def draw(key, params, shell):
            keys = jax.random.split(key, num_trials)
            return jax.vmap(lambda k, p: lgssm_simulate(k, p, num_timesteps))(keys, self.lgssm_params(params, shell, simulate=True))

        x, y = draw(key_sim, {k: jnp.asarray(v) for k, v in params.items()}, shell)
        data = as_sequence_data(np.asarray(y), inputs=inputs, input_dim=self.input_dim, obs_dim=D)
        return data, {"params": params, "latents": np.asarray(x)}

    def default_params(self, key) -> dict[str, Any]:
        """A slowly decaying rotation (A = 0.95 R(pi/10) in the first two latent dims, 0.95 elsewhere),
        random emission matrix N(0, 0.5^2), emission bias N(0, 1), noise scale 0.5, m0 = 0."""
        H, D = self.latent_dim, require_obs_dim(self)
        k_c, k_d, k_b, k_f = jax.random.split(key, 4)
        A = 0.95 * np.eye(H)
        if H >= 2:
            th = np.pi / 10
            A[:2, :2] = 0.95 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        params: dict[str, Any] = {
            "initial_mean": jnp.zeros(H),
            "dynamics_matrix": jnp.asarray(A),
            "dynamics_bias": jnp.zeros(H),
            "emission_matrix": 0.5 * jax.random.normal(k_c, (D, H)),
            "emission_bias": jax.random.normal(k_d, (D,)),
            "emission_scales": jnp.full(D, 0.5),
        }
        if self.input_dim:
            params["dynamics_input_weights"] = 0.5 * jax.random.normal(k_b, (H, self.input_dim))
            params["emission_input_weights"] = 0.5 * jax.random.normal(k_f, (D, self.input_dim))
        if self.dynamics_cov == "diagonal":
            params["dynamics_scales"] = jnp.full(H, 0.5)
        if self.initial_cov == "learned":
            params["initial_scales"] = jnp.ones(H)
        if self.initial_cov == "diffuse":
            params.pop("initial_mean")
        return self.full_params(params)

    def invariants(self, params) -> dict[str, jax.Array]:
        """Quantities unchanged by an orthogonal change of latent basis (the identified part).

        Works on one draw or with leading batch axes. Returns trace and determinant of A, the
        emission Gram matrix C C' (D, D), C A C' (D, D), C b (D,), and the emission bias and scales.
        """
        params = self.full_params(params)
        A = jnp.asarray(params["dynamics_matrix"])
        C = jnp.asarray(params["emission_matrix"])
        b = jnp.asarray(params["dynamics_bias"])
        Ct = jnp.swapaxes(C, -1, -2)
        out = {
            "dynamics_trace": jnp.trace(A, axis1=-2, axis2=-1),
            "dynamics_det": jnp.linalg.det(A),
            "emission_gram": C @ Ct,
            "emission_dynamics": C @ A @ Ct,
            "emission_drift": (C @ b[..., None])[..., 0],
            "emission_bias": jnp.asarray(params["emission_bias"]),
            "emission_scales": jnp.asarray(params["emission_scales"]),
        }
        if self.input_dim:
            out["emission_input_response"] = C @ jnp.asarray(params["dynamics_input_weights"])
            out["emission_input_weights"] = jnp.asarray(params["emission_input_weights"])
        return out
