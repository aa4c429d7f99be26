"""The gpSLDS paper's synthetic benchmarks (Hu et al. 2024): two rotations and a limit cycle.

``simulate_gpslds_synthetic`` reproduces the recipe of the authors' ``data/generate_synthetic_data.py``
(Sec. 4.1 of "Modeling Latent Neural Dynamics with Gaussian Process Switching Linear Dynamical Systems") with
JAX random numbers (so the draws differ from the paper's pickles):

* drift: two linear systems built from discrete-time rotations (bin 0.01 s, rot_scale 1.003,
  theta = -+pi/100), fixed points (-3, 0) (clockwise, x1 < 0) and (+3, 0) (counter-clockwise, x1 > 0),
  blended by pi_right(x) = sigmoid(x1 / 0.4); true equilibria of the blend (+-3.003252, 0.000521);
* latents: Euler–Maruyama, dt = 1 ms, Sigma = I, 2500 steps; the first half of the trials start at
  (-7, 0), the second half at (+7, 0);
* observations: C_ij = U(0, 5) * random sign, d_i ~ N(6, 1), counts ~ Poisson(softplus(C x + d) dt)
  per 1 ms bin, kept as binary events (counts > 0): the point-process data of the paper.

``simulate_gpslds_limit_cycle`` is the App. D limit cycle, whose parameters the paper does not give;
the reconstruction of the notes (§4.3) is used: an unstable spiral inside and a stable spiral outside
the circle of radius 2, both centred at 0, omega = pi rad/s, boundary features [1, x1^2, x2^2] with
w = (4, -1, -1), tau = 0.4, T = 2 s, Sigma = I, and growth / decay rate alpha = 4 /s. The notes guessed
alpha = 0.25-1; at alpha = 1 the Sigma = I noise hides the cycle: on the *true* path the true drift beats
the best single linear drift by only 60 nats over 60,000 Euler steps (562 nats at alpha = 4; computed by
``benchmarks/gpslds.py --limit-cycle``), so no fit can be expected to find the boundary there.

Both return ``{"y": (trials, T, N), "latents": (trials, T, 2), "truth": {...}}`` where ``truth`` holds
the generator's parameters in the gpSLDS model's own parameterisation (regime 0 = the first softmax
class, regime J-1 = the reference class with w = 0), ``dt``, the true ``fixed_points`` and the feature
map name.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.datasets._float32_draws import float32_draws
from ppl_switch.ops.sde import euler_maruyama_simulate

__all__ = ["simulate_gpslds_synthetic", "simulate_gpslds_limit_cycle", "two_rotation_drift", "limit_cycle_drift",
           "TRUE_FIXED_POINTS"]

#: equilibria of the blended two-rotation field inside the data region (notes §4.1)
TRUE_FIXED_POINTS = np.array([[3.003252, 0.000521], [-3.003252, 0.000521]])


def _rotation(theta):
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def two_rotation_parameters() -> dict:
    """The Sec. 4.1 field in gpSLDS form: regime 0 = right (x1 > 0), regime 1 = left (reference)."""
    mats, centres = [], []
    for theta, fp in ((math.pi / 100, (3.0, 0.0)), (-math.pi / 100, (-3.0, 0.0))):
        A = (1.003 * _rotation(theta) - np.eye(2)) / 0.01
        mats.append(A)
        centres.append(fp)
    return {
        "regime_matrix": np.stack(mats),  # (J, K, K) Jacobian of each regime
        "regime_offset": np.zeros((2, 2)),  # f_j(c_j) = 0: c_j is regime j's own fixed point
        "fixed_points": np.array(centres),  # (J, K) centres c_j
        "partition_weights": np.array([[0.0], [1.0], [0.0]]),  # (features, J-1) on [1, x1, x2]
        "temperature": 0.4,
    }


def limit_cycle_parameters(alpha: float = 4.0, omega: float = math.pi) -> dict:
    """App. D reconstruction: regime 0 = inside (unstable), regime 1 = outside (stable, reference)."""
    inner = np.array([[alpha, -omega], [omega, alpha]])
    outer = np.array([[-alpha, -omega], [omega, -alpha]])
    return {
        "regime_matrix": np.stack([inner, outer]),
        "regime_offset": np.zeros((2, 2)),
        "fixed_points": np.zeros((2, 2)),
        "partition_weights": np.array([[4.0], [-1.0], [-1.0]]),  # on [1, x1^2, x2^2]
        "temperature": 0.4,
    }


def _ssl_drift(params, features):
    """f(x) = sum_j pi_j(x) (A_j (x - c_j) + e_j), pi = softmax-centred(W' phi(x) / tau)."""
    A = jnp.asarray(params["regime_matrix"])
    e = jnp.asarray(params["regime_offset"])
    c = jnp.asarray(params["fixed_points"])
    W = jnp.asarray(params["partition_weights"])
    tau = params["temperature"]

    def f(x):
        logits = features(x) @ W / tau
        pi = jax.nn.softmax(jnp.concatenate([logits, jnp.zeros(logits.shape[:-1] + (1,))], -1), -1)
        lin = jnp.einsum("jkl,...jl->...jk", A, x[..., None, :] - c) + e
        return jnp.einsum("...j,...jk->...k", pi, lin)

    return f


def _linear_features(x):
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x], -1)


def _quadratic_features(x):
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x**2], -1)


def two_rotation_drift(x):
    """The true Sec. 4.1 drift f(x), x (..., 2) -> (..., 2)."""
    return _ssl_drift(two_rotation_parameters(), _linear_features)(jnp.asarray(x, float))


def limit_cycle_drift(x, alpha: float = 4.0, omega: float = math.pi):
    """The reconstructed App. D drift f(x), x (..., 2) -> (..., 2)."""
    return _ssl_drift(limit_cycle_parameters(alpha, omega), _quadratic_features)(jnp.asarray(x, float))


def _emit(key, x, num_neurons, dt, binary):
    k_c, k_s, k_d, k_y = jax.random.split(key, 4)
    C = jax.random.uniform(k_c, (num_neurons, 2), maxval=5.0) * jnp.where(jax.random.bernoulli(k_s, 0.5, (num_neurons, 2)), 1.0, -1.0)
    d = 6.0 + jax.random.normal(k_d, (num_neurons,))
    rate = jax.nn.softplus(x @ C.T + d)
    counts = jax.random.poisson(k_y, rate * dt).astype(float)
    y = (counts > 0).astype(float) if binary else counts
    return y, C, d, rate


@float32_draws
def _simulate(seed, num_trials, num_timesteps, dt, num_neurons, x0, drift, params, features, binary):
    key = jax.random.PRNGKey(seed)
    k_x, k_y = jax.random.split(key)
    keys = jax.random.split(k_x, num_trials)
    sim = jax.jit(jax.vmap(lambda k, s: euler_maruyama_simulate(k, s, lambda x, u: drift(x), dt, num_timesteps)))
    x = sim(keys, jnp.asarray(x0, float))
    y, C, d, rate = _emit(k_y, x, num_neurons, dt, binary)
    truth = {k: np.asarray(v) for k, v in params.items()}
    truth.update({"emission_matrix": np.asarray(C), "emission_bias": np.asarray(d), "dt": dt, "features": features,
                  "mean_rate_hz": float(jnp.mean(rate))})
    return {"y": np.asarray(y), "latents": np.asarray(x), "truth": truth}


def simulate_gpslds_synthetic(seed: int = 0, num_trials: int = 30, num_timesteps: int = 2500, dt: float = 0.001,
                              num_neurons: int = 50, binary: bool = True) -> dict:
    """Sec. 4.1 two-rotation data. Half the trials start at (-7, 0), half at (+7, 0).

    Returns {"y" (trials, T, N) events (binary) or counts, "latents" (trials, T, 2), "truth" {...,
    "fixed_points_true" (2, 2) the blended field's equilibria (+-3.003252, 0.000521)}}.
    """
    if num_trials < 1 or num_timesteps < 2:
        raise ValueError(f"num_trials, num_timesteps: expected >= 1 and >= 2, got {num_trials}, {num_timesteps}")
    half = num_trials // 2
    x0 = np.array([[-7.0, 0.0]] * half + [[7.0, 0.0]] * (num_trials - half))
    out = _simulate(seed, num_trials, num_timesteps, dt, num_neurons, x0, two_rotation_drift,
                    two_rotation_parameters(), "linear", binary)
    out["truth"]["fixed_points_true"] = TRUE_FIXED_POINTS.copy()
    return out


def simulate_gpslds_limit_cycle(seed: int = 0, num_trials: int = 30, num_timesteps: int = 2000, dt: float = 0.001,
                                num_neurons: int = 50, binary: bool = True, alpha: float = 4.0,
                                omega: float = math.pi) -> dict:
    """App. D limit cycle (reconstructed generator, see the module docstring). Starts: radius
    U(0.5, 4), uniform angle. ``truth["radius"]`` = 2 is the true boundary x1^2 + x2^2 = 4."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.5, 4.0, num_trials)
    a = rng.uniform(0, 2 * math.pi, num_trials)
    x0 = np.stack([r * np.cos(a), r * np.sin(a)], -1)
    out = _simulate(seed, num_trials, num_timesteps, dt, num_neurons, x0,
                    lambda x: limit_cycle_drift(x, alpha, omega), limit_cycle_parameters(alpha, omega), "quadratic", binary)
    out["truth"]["fixed_points_true"] = np.zeros((1, 2))
    out["truth"]["radius"] = 2.0
    return out
