"""The two-regime rotation system of the tutorial "Switching Linear Dynamical Systems" (its simulation section).

K = 2 regimes, D_x = D_y = 2::

    A_1 = 0.97 R(0.15),  A_2 = 0.94 R(-0.35),  b_k = 0,  Q_k = 0.03 I
    C = I,  d = 0,  R = 0.2 I
    pi0 = (0.8, 0.2),  P = [[0.95, 0.05], [0.10, 0.90]],  x_1 ~ N((2, 0), 0.1 I)

with R(theta) the 2-D rotation by theta. The tutorial uses T = 150; any length and number of trials can be
drawn. Simulated with NumPy (seeded), independent of the model code it is used to test.
"""

from __future__ import annotations

import numpy as np


def rotation(angle: float, radius: float = 1.0) -> np.ndarray:
    """radius * [[cos, -sin], [sin, cos]]."""
    c, s = np.cos(angle), np.sin(angle)
    return radius * np.array([[c, -s], [s, c]])


def tutorial_params() -> dict:
    """The tutorial's true parameters (names as in :class:`ppl_switch.ops.switching.SwitchingParams`)."""
    return {
        "initial_probs": np.array([0.8, 0.2]),
        "transition_matrix": np.array([[0.95, 0.05], [0.10, 0.90]]),
        "initial_mean": np.array([2.0, 0.0]),
        "initial_cov": 0.1 * np.eye(2),
        "dynamics_matrices": np.stack([rotation(0.15, 0.97), rotation(-0.35, 0.94)]),
        "dynamics_biases": np.zeros((2, 2)),
        "dynamics_covs": np.stack([0.03 * np.eye(2)] * 2),
        "emission_matrix": np.eye(2),
        "emission_bias": np.zeros(2),
        "emission_cov": 0.2 * np.eye(2),
    }


def simulate_slds_tutorial(seed: int = 0, num_trials: int = 1, num_timesteps: int = 150) -> dict:
    """Draw trials from the tutorial system.

    Returns a dict with ``y`` (trials, time, 2), ``states`` (trials, time) in {0, 1}, ``latents``
    (trials, time, 2) and ``params`` (:func:`tutorial_params`).
    """
    if int(num_timesteps) < 1 or int(num_trials) < 1:
        raise ValueError(f"num_timesteps, num_trials: expected integers >= 1, got {num_timesteps}, {num_trials}")
    p = tutorial_params()
    rng = np.random.default_rng(seed)
    B, T = int(num_trials), int(num_timesteps)
    z = np.zeros((B, T), dtype=np.int32)
    x = np.zeros((B, T, 2))
    Lq = np.linalg.cholesky(p["dynamics_covs"])
    for b in range(B):
        z[b, 0] = rng.choice(2, p=p["initial_probs"])
        x[b, 0] = rng.multivariate_normal(p["initial_mean"], p["initial_cov"])
        for t in range(1, T):
            k = rng.choice(2, p=p["transition_matrix"][z[b, t - 1]])
            z[b, t] = k
            x[b, t] = p["dynamics_matrices"][k] @ x[b, t - 1] + p["dynamics_biases"][k] + Lq[k] @ rng.standard_normal(2)
    noise = rng.standard_normal((B, T, 2)) @ np.linalg.cholesky(p["emission_cov"]).T
    y = x @ p["emission_matrix"].T + p["emission_bias"] + noise
    return {"y": y, "states": z, "latents": x, "params": p}
