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

:func:`simulate_reference_nascar` is the recipe of the recurrent-SLDS NASCAR example of the rSLDS
authors' software (no lane pull; simulated here with our own code from the recipe):

    logits = [100 (x1 - 2), 100 (-x1 - 2), 10 x2, -10 x2]           (recurrent-only, softer straights)
    regime 0: clockwise rotation by pi/24 about (2, 0);  regime 1: clockwise by pi/48 about (-2, 0)
    regime 2: x <- x + (0.1, 0);  regime 3: x <- x + (-0.25, 0)
    x_t = A_z x_{t-1} + b_z + N(0, 1e-4 I);  x_0 ~ N((0, 1), 1e-4 I),  z_0 ~ uniform
    y_t = C x_t + d + N(0, 1e-2 I),  C (N, 2) with orthonormal columns (QR of a N(0, 1) matrix), d ~ N(0, 1)
"""

from __future__ import annotations

import numpy as np

from ppl_switch.datasets.nascar import nascar_parameters

__all__ = ["rslds_nascar_parameters", "simulate_rslds_nascar", "reference_nascar_parameters", "simulate_reference_nascar"]


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
    x_prev = p["initial_mean"]
    for t in range(T):
        logits = W @ x_prev + r
        prob = np.exp(logits - logits.max())
        z_t = rng.choice(4, p=prob / prob.sum())
        x_t = A[z_t] @ x_prev + b[z_t] + dynamics_noise * rng.standard_normal(2)
        z[t], x[t] = z_t, x_t
        x_prev = x_t
    y = x @ p["emission_matrix"].T + p["emission_bias"] + emission_noise * rng.standard_normal((T, N))
    return {"y": y[None], "states": z[None], "latents": x[None], "params": p}


def _clockwise(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])


def reference_nascar_parameters(obs_dim: int = 10, rng=None, dynamics_noise: float = 0.01, emission_noise: float = 0.1) -> dict:
    """True parameters of the reference recipe (module docstring) in the site names of
    :class:`ppl_switch.models.rslds.RSLDS` (recurrent_only); C, d drawn from ``rng``."""
    rng = np.random.default_rng(0) if rng is None else rng
    K, D = 4, 2
    A = np.stack([_clockwise(np.pi / 24), _clockwise(np.pi / 48), np.eye(D), np.eye(D)])
    centres = np.array([[2.0, 0.0], [-2.0, 0.0]])
    b = np.array([(np.eye(D) - A[0]) @ centres[0], (np.eye(D) - A[1]) @ centres[1], [0.1, 0.0], [-0.25, 0.0]])
    C = np.linalg.qr(rng.standard_normal((obs_dim, D)))[0]
    return {
        "initial_probs": np.full(K, 1.0 / K),
        "transition_weights": np.array([[100.0, 0.0], [-100.0, 0.0], [0.0, 10.0], [0.0, -10.0]]),
        "transition_bias": np.array([-200.0, -200.0, 0.0, 0.0]),
        "dynamics_matrix": A,
        "dynamics_bias": b,
        "dynamics_scales": np.full((K, D), dynamics_noise),
        "dynamics_corr_chol": np.broadcast_to(np.eye(D), (K, D, D)).copy(),
        "initial_mean": np.array([0.0, 1.0]),
        "initial_scales": np.full(D, dynamics_noise),
        "emission_matrix": C,
        "emission_bias": rng.standard_normal(obs_dim),
        "emission_scales": np.full(obs_dim, emission_noise),
        "fixed_points": np.concatenate([centres, np.full((2, 2), np.nan)]),
    }


def simulate_reference_nascar(seed: int = 0, num_timesteps: int = 10000, obs_dim: int = 10,
                              dynamics_noise: float = 0.01, emission_noise: float = 0.1) -> dict:
    """One trial of the reference recipe: ``y`` (1, T, N), ``states`` (1, T), ``latents`` (1, T, 2),
    ``params`` (true values, as :func:`reference_nascar_parameters`)."""
    T, N = int(num_timesteps), int(obs_dim)
    if T < 1:
        raise ValueError(f"num_timesteps: expected an integer >= 1, got {num_timesteps}")
    if N < 2:
        raise ValueError(f"obs_dim: expected an integer >= 2 (C has orthonormal columns), got {obs_dim}")
    if dynamics_noise < 0 or emission_noise < 0:
        raise ValueError("dynamics_noise, emission_noise: expected non-negative numbers")
    rng = np.random.default_rng(seed)
    p = reference_nascar_parameters(N, rng, dynamics_noise, emission_noise)
    W, r, A, b = p["transition_weights"], p["transition_bias"], p["dynamics_matrix"], p["dynamics_bias"]
    z = np.empty(T, int)
    x = np.empty((T, 2))
    z[0] = rng.integers(4)
    x[0] = p["initial_mean"] + dynamics_noise * rng.standard_normal(2)
    for t in range(1, T):
        logits = W @ x[t - 1] + r
        prob = np.exp(logits - logits.max())
        z[t] = rng.choice(4, p=prob / prob.sum())
        x[t] = A[z[t]] @ x[t - 1] + b[z[t]] + dynamics_noise * rng.standard_normal(2)
    y = x @ p["emission_matrix"].T + p["emission_bias"] + emission_noise * rng.standard_normal((T, N))
    return {"y": y[None], "states": z[None], "latents": x[None], "params": p}
