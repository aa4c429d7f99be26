"""NASCAR as in the rSLDS paper (Linderman et al. 2017, §5): a 2-D latent point drives around an oval
track; the regime is decided by where it is (recurrent-only transitions with sharp logits).

    z_t | x_{t-1} ~ Cat(softmax(W x_{t-1} + r)),   W = 100 [[1, 0], [-1, 0], [0, 1], [0, -1]],
                                                 r = 100 [-2, -2, -1, -1]
    x_t = A_{z_t} x_{t-1} + b_{z_t} + N(0, q^2 I)
    y_t = C x_t + d + N(0, s^2 I),  C ~ N(0, 1)^{N x 2}, d ~ N(0, 1)^N

Regime 0 (x1 > 2) and regime 1 (x1 < -2) rotate clockwise by pi/24 per step about (2, 0) and (-2, 0)
(b_k = (I - A_k) c_k); regime 2 (top, x2 > 1) moves right by 0.1, regime 3 (bottom) left by 0.25 --
the dynamics of :func:`ppl_switch.datasets.nascar.nascar_parameters` (standard track), with discrete
states and Gaussian dynamics noise instead of relaxed states. Starts at x_0 = (0, 1), z_0 = 2.

Departure (documented): on the straights x2 is also pulled back to the lane, x2 <- 0.9 x2 + 0.1 (top)
and x2 <- 0.9 x2 - 0.1 (bottom). With pure translations the overshoot of each discrete step into a turn
(up to one step of 0.25) enlarges the turning radius lap after lap, and the noise makes it a random
walk; over 10,000 steps the track grows from radius 1 to > 30. The pull keeps the oval stationary and
leaves the rotations' fixed points (+-2, 0) unchanged.
"""

from __future__ import annotations

import numpy as np

from ppl_switch.datasets.nascar import nascar_parameters

__all__ = ["rslds_nascar_parameters", "simulate_rslds_nascar"]


def rslds_nascar_parameters(obs_dim: int = 10, rng=None, dynamics_noise: float = 0.01, emission_noise: float = 0.1) -> dict:
    """True parameters in the site names of :class:`ppl_switch.models.rslds.RSLDS` (recurrent_only)."""
    rng = np.random.default_rng(0) if rng is None else rng
    p = nascar_parameters(soft_sticky=False)
    K, D = 4, 2
    dynamics = np.asarray(p["dynamics"], float).copy()
    offsets = np.asarray(p["offsets"], float).copy()
    dynamics[2:, 1, 1] = 0.9  # straights: pull x2 back to the lane x2 = +-1
    offsets[2, 1], offsets[3, 1] = 0.1, -0.1
    return {
        "initial_probs": np.eye(K)[2],
        "transition_weights": np.asarray(p["logit_weights"], float),
        "transition_bias": np.asarray(p["logit_bias"], float),
        "dynamics_matrix": dynamics,
        "dynamics_bias": offsets,
        "dynamics_scales": np.full((K, D), dynamics_noise),
        "dynamics_corr_chol": np.broadcast_to(np.eye(D), (K, D, D)).copy(),
        "initial_mean": np.array([0.0, 1.0]),
        "initial_scales": np.full(D, dynamics_noise),
        "emission_matrix": rng.standard_normal((obs_dim, D)),
        "emission_bias": rng.standard_normal(obs_dim),
        "emission_scales": np.full(obs_dim, emission_noise),
        "fixed_points": np.asarray(p["fixed_points"], float),
    }


def simulate_rslds_nascar(seed: int = 0, num_timesteps: int = 10000, obs_dim: int = 10,
                          dynamics_noise: float = 0.01, emission_noise: float = 0.1) -> dict:
    """One trial: ``y`` (1, T, N), ``states`` (1, T), ``latents`` (1, T, 2), ``params`` (true values; the
    rotation regimes' ``fixed_points`` (4, 2), NaN for the straights)."""
    T, N = int(num_timesteps), int(obs_dim)
    if T < 1:
        raise ValueError(f"num_timesteps: expected an integer >= 1, got {num_timesteps}")
    if N < 1:
        raise ValueError(f"obs_dim: expected an integer >= 1, got {obs_dim}")
    if dynamics_noise < 0 or emission_noise < 0:
        raise ValueError("dynamics_noise, emission_noise: expected non-negative numbers")
    rng = np.random.default_rng(seed)
    p = rslds_nascar_parameters(N, rng, dynamics_noise, emission_noise)
    W, r = p["transition_weights"], p["transition_bias"]
    A, b = p["dynamics_matrix"], p["dynamics_bias"]
    z = np.empty(T, int)
    x = np.empty((T, 2))
    z_prev, x_prev = 2, p["initial_mean"]
    for t in range(T):
        logits = W @ x_prev + r
        prob = np.exp(logits - logits.max())
        z_t = rng.choice(4, p=prob / prob.sum())
        x_t = A[z_t] @ x_prev + b[z_t] + dynamics_noise * rng.standard_normal(2)
        z[t], x[t] = z_t, x_t
        z_prev, x_prev = z_t, x_t
    y = x @ p["emission_matrix"].T + p["emission_bias"] + emission_noise * rng.standard_normal((T, N))
    return {"y": y[None], "states": z[None], "latents": x[None], "params": p}
