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
from numpyro.infer.autoguide import AutoNormal

from ppl_switch.data import DataError, SequenceData, as_sequence_data, check_positive_int
from ppl_switch.guides.init import init_to_sample_then_median
from ppl_switch.models._common import check_nonneg_int, check_optional_dim, require_obs_dim
from ppl_switch.models._emissions import masked_mvn_log_prob_cov
from ppl_switch.models.base import Model
from ppl_switch.ops.kalman import LGSSMParams, lgssm_filter, lgssm_sample, lgssm_simulate, lgssm_smoother

DYNAMICS_PRIOR_CENTER = 0.9
DYNAMICS_PRIOR_SCALE = 0.5
EMISSION_BIAS_PRIOR_SCALE = 5.0
EMISSION_SCALE_PRIOR_SCALE = 2.0


class LDS(Model):
    """Gaussian linear dynamical system with optional known inputs.

    Args:
        latent_dim: H >= 1.
        obs_dim: D, or None to take it from the data.
        input_dim: U >= 0; inputs enter the dynamics (B u) and the emissions (F u).
    """

    name = "lds"
    num_states = 0

    def __init__(self, latent_dim: int, obs_dim: Optional[int] = None, input_dim: int = 0):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.obs_dim = check_optional_dim(obs_dim, "obs_dim")
        self.input_dim = check_nonneg_int(input_dim, "input_dim")
        self.emission = "gaussian"

    def config(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "obs_dim": self.obs_dim, "input_dim": self.input_dim}

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        dims = {
            "initial_mean": ("latent",),
            "dynamics_matrix": ("latent", "latent_prev"),
            "dynamics_bias": ("latent",),
            "emission_matrix": ("obs", "latent"),
            "emission_bias": ("obs",),
            "emission_scales": ("obs",),
        }
        if self.input_dim:
            dims["dynamics_input_weights"] = ("latent", "input")
            dims["emission_input_weights"] = ("obs", "input")
        return dims

    # ----- program ------------------------------------------------------------------------------
    def program(self, data: SequenceData, *, record_log_lik: bool = False) -> None:
        H, D, U = self.latent_dim, data.obs_dim, self.input_dim

        def normal(loc, scale, shape):
            return dist.Normal(loc, scale).expand(shape).to_event(len(shape))

        params = {
            "initial_mean": numpyro.sample("initial_mean", normal(0.0, 1.0, [H])),
            "dynamics_matrix": numpyro.sample(
                "dynamics_matrix", dist.Normal(DYNAMICS_PRIOR_CENTER * jnp.eye(H), DYNAMICS_PRIOR_SCALE).to_event(2)
            ),
            "dynamics_bias": numpyro.sample("dynamics_bias", normal(0.0, 1.0, [H])),
            "emission_matrix": numpyro.sample("emission_matrix", normal(0.0, 1.0, [D, H])),
            "emission_bias": numpyro.sample("emission_bias", normal(0.0, EMISSION_BIAS_PRIOR_SCALE, [D])),
            "emission_scales": numpyro.sample(
                "emission_scales", dist.HalfNormal(EMISSION_SCALE_PRIOR_SCALE).expand([D]).to_event(1)
            ),
        }
        if U:
            params["dynamics_input_weights"] = numpyro.sample("dynamics_input_weights", normal(0.0, 1.0, [H, U]))
            params["emission_input_weights"] = numpyro.sample("emission_input_weights", normal(0.0, 1.0, [D, U]))
        # the latent path is integrated out by the Kalman filter, trial by trial
        with numpyro.plate("trial", data.num_trials):
            numpyro.factor("y", self.marginal_log_likelihood(params, data))
        if record_log_lik:
            numpyro.deterministic("log_lik", self.log_likelihood(params, data))

    def default_guide(self):
        """AutoNormal over all parameters, started at the prior median (A = 0.9 I, stable dynamics)
        except the emission matrix, started from a prior draw: C = 0 is a stationary point of the
        marginal likelihood (it is quadratic in C there), so starting exactly at it stalls."""
        return AutoNormal(self.program, init_loc_fn=init_to_sample_then_median(["emission_matrix"]), init_scale=0.1)

    # ----- the state space model of one parameter draw -----------------------------------------
    def lgssm_params(self, params, data: SequenceData) -> LGSSMParams:
        """Batched :class:`LGSSMParams` for every trial: leading axis trials; inputs folded into
        time-varying biases ((trials, T-1, H) dynamics, (trials, T, D) emissions) when U > 0."""
        H = self.latent_dim
        N, T = data.num_trials, data.num_timesteps
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

        return LGSSMParams(
            initial_mean=batch(jnp.asarray(params["initial_mean"], dtype)),
            initial_cov=batch(eye),
            dynamics_matrix=batch(A),
            dynamics_bias=b,
            dynamics_cov=batch(eye),
            emission_matrix=batch(C),
            emission_bias=d,
            emission_cov=None,
            emission_cov_diag=batch(r2),
        )

    # ----- quantities from one draw -------------------------------------------------------------
    def log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials, T) one-step predictive log p(y_t | y_{<t}) over the observed entries (0 where none);
        sums to the Kalman marginal likelihood."""
        lg = self.lgssm_params(params, data)
        y, mask = jnp.asarray(data.y), jnp.asarray(data.mask)

        def one(p, y_n, m_n):
            filt = lgssm_filter(p, y_n, m_n)
            mean = filt.predicted_means @ p.emission_matrix.T + p.emission_bias
            cov = p.emission_matrix @ filt.predicted_covs @ p.emission_matrix.T + jnp.diag(p.emission_cov_diag)
            return masked_mvn_log_prob_cov(y_n, m_n, mean, cov)

        return jax.vmap(one)(lg, y, mask)

    def marginal_log_likelihood(self, params, data: SequenceData) -> jax.Array:
        """(trials,) Kalman-filter log p(y_n) of each trial."""
        lg = self.lgssm_params(params, data)
        return jax.vmap(lambda p, y, m: lgssm_filter(p, y, m).log_likelihood)(lg, jnp.asarray(data.y), jnp.asarray(data.mask))

    def latent_posterior(self, params, data: SequenceData) -> dict[str, jax.Array]:
        """Smoothed p(x_t | y): ``{"means": (trials, T, H), "covs": (trials, T, H, H)}`` (past a
        trial's length these are predictions)."""
        lg = self.lgssm_params(params, data)
        out = jax.vmap(lambda p, y, m: lgssm_smoother(p, y, m))(lg, jnp.asarray(data.y), jnp.asarray(data.mask))
        return {"means": out.smoothed_means, "covs": out.smoothed_covs}

    def sample_latents(self, key, params, data: SequenceData) -> jax.Array:
        """One posterior path x ~ p(x | y), (trials, T, H)."""
        lg = self.lgssm_params(params, data)
        keys = jax.random.split(key, data.num_trials)
        return jax.vmap(lambda k, p, y, m: lgssm_sample(k, p, y, m))(keys, lg, jnp.asarray(data.y), jnp.asarray(data.mask))

    def state_posterior(self, params, data):
        raise NotImplementedError("the LDS has no discrete states (num_states=0); use latent_posterior")

    def sample_states(self, key, params, data):
        raise NotImplementedError("the LDS has no discrete states (num_states=0); use sample_latents")

    def posterior_predictive(self, key, params, data: SequenceData) -> jax.Array:
        """y_rep = C x + d + F u + noise with x a posterior latent path, shaped like ``data.y``."""
        key_x, key_y = jax.random.split(key)
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
            return jax.vmap(lambda k, p: lgssm_simulate(k, p, num_timesteps))(keys, self.lgssm_params(params, shell))

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
        return params

    def invariants(self, params) -> dict[str, jax.Array]:
        """Quantities unchanged by an orthogonal change of latent basis (the identified part).

        Works on one draw or with leading batch axes. Returns trace and determinant of A, the
        emission Gram matrix C C' (D, D), C A C' (D, D), C b (D,), and the emission bias and scales.
        """
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
