"""Lorenz attractor read out by Bernoulli neurons (the rSLDS paper's Lorenz example, Linderman et al. 2017).

    dx/dt = sigma (x2 - x1),  dx2/dt = x1 (rho - x3) - x2,  dx3/dt = x1 x2 - beta x3
    (sigma, rho, beta) = (10, 28, 8/3), integrated with RK4 at dt = 0.01 after a 1,000-step burn-in,
    each coordinate standardised (zero mean, unit variance) -> latents x_t (T, 3)
    y_tn ~ Bernoulli(sigmoid(c_n . x_t + d_n)),  c_n ~ N(0, I_3),  d_n ~ N(-1, 0.5^2)

The "states" are the lobes (0: x1 < 0, 1: x1 > 0), the natural two-regime segmentation of the
attractor; a mask hides every neuron at t in [750, 850) for the reconstruction test.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lorenz_path", "simulate_lorenz_bernoulli"]

MASKED_BLOCK = (750, 850)


def lorenz_path(num_timesteps: int, dt: float = 0.01, x0=(1.0, 1.0, 1.0), burn_in: int = 1000,
                sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0) -> np.ndarray:
    """(T, 3) raw Lorenz path (RK4)."""

    def f(x):
        return np.array([sigma * (x[1] - x[0]), x[0] * (rho - x[2]) - x[1], x[0] * x[1] - beta * x[2]])

    x = np.asarray(x0, float)
    out = np.empty((int(num_timesteps), 3))
    for t in range(int(burn_in) + int(num_timesteps)):
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        if t >= burn_in:
            out[t - burn_in] = x
    return out


def simulate_lorenz_bernoulli(seed: int = 0, num_timesteps: int = 10000, num_neurons: int = 100) -> dict:
    """One trial: ``y`` (1, T, N) in {0, 1}, ``mask`` (1, T, N) (False at t in [750, 850) where T
    reaches it), ``states`` (1, T) lobe labels, ``latents`` (1, T, 3) standardised Lorenz path,
    ``params`` {emission_matrix (N, 3), emission_bias (N,), firing_probs (T, N), latent_mean,
    latent_scale, masked_block}."""
    T, N = int(num_timesteps), int(num_neurons)
    if T < 2:
        raise ValueError(f"num_timesteps: expected an integer >= 2, got {num_timesteps}")
    if N < 1:
        raise ValueError(f"num_neurons: expected an integer >= 1, got {num_neurons}")
    rng = np.random.default_rng(seed)
    raw = lorenz_path(T, x0=(1.0, 1.0, 1.0) + 0.1 * rng.standard_normal(3))
    mean, scale = raw.mean(0), raw.std(0)
    x = (raw - mean) / scale
    C = rng.standard_normal((N, 3))
    d = -1.0 + 0.5 * rng.standard_normal(N)
    prob = 1.0 / (1.0 + np.exp(-(x @ C.T + d)))
    y = (rng.random((T, N)) < prob).astype(float)
    mask = np.ones((T, N), bool)
    lo, hi = MASKED_BLOCK
    mask[lo:hi] = False
    return {
        "y": y[None], "mask": mask[None], "states": (raw[:, 0] > 0).astype(int)[None], "latents": x[None],
        "params": {"emission_matrix": C, "emission_bias": d, "firing_probs": prob, "latent_mean": mean,
                   "latent_scale": scale, "masked_block": np.array(MASKED_BLOCK)},
    }
