"""Synthetic head-direction ring attractor of the CLDS paper (Geadah et al., §3.2; notes §4.2).

The condition is the head direction theta_t (an angular random walk). With e1 = [cos, sin] (position on
the ring) and e2 = [-sin, cos] (tangent)::

    A(theta) = (1 - epsilon) e2(theta) e2(theta)'      b(theta) = e1(theta)
    x_1 ~ N(e1(theta_1), S0),   x_{t+1} = A(theta_t) x_t + b(theta_t) + N(0, noise^2 I)
    y_t = C(theta_t) x_t + N(0, noise^2 I)

so every condition has the stable fixed point x*(theta) = e1(theta) (a ring), a slow tangential
direction (eigenvalue 1 - epsilon) and a fast radial one (eigenvalue 0).

Two recipes:

* ``recipe="code"`` (the authors' notebook, default): C a random N(0, 1) constant (N x 2) matrix,
  theta step sd 0.4, S0 = 0.2 I, noise 0.2, epsilon 0.1.
* ``recipe="paper"``: bump tuning C_i(theta) = (1 + cos((theta - xi_i)/gamma)) e1(theta)' on
  |theta - xi_i| < gamma pi (wrapped difference), peaks xi_i regular on [-pi, pi), gamma = 0.5;
  theta step sd 0.5; x_1 ~ N(e1(theta_1), I).

``emission="poisson"`` keeps the latent dynamics and draws spike counts instead of Gaussian rates
(not in the paper, which fits smoothed rates): y_t ~ Poisson(baseline_rate * exp(C(theta_t) x_t)),
i.e. log-rate C x + log(baseline_rate) (exp link, unit bins), the same C as the Gaussian recipe.
"""

from __future__ import annotations

import math

import numpy as np


def ring_unit_vectors(theta):
    """e1 (..., 2) radial and e2 (..., 2) tangential unit vectors at angles theta (...)."""
    theta = np.asarray(theta, dtype=float)
    e1 = np.stack([np.cos(theta), np.sin(theta)], -1)
    e2 = np.stack([-np.sin(theta), np.cos(theta)], -1)
    return e1, e2


def ring_dynamics(theta, epsilon: float = 0.1):
    """True A(theta) (..., 2, 2) and b(theta) (..., 2) of the ring attractor."""
    e1, e2 = ring_unit_vectors(theta)
    return (1.0 - epsilon) * e2[..., :, None] * e2[..., None, :], e1


def ring_fixed_points(theta):
    """True fixed points x*(theta) = e1(theta), (..., 2)."""
    return ring_unit_vectors(theta)[0]


def bump_tuning(theta, num_neurons: int = 10, width: float = 0.5):
    """Paper's tuning C(theta) (..., N, 2): (1 + cos(z / width)) e1(theta)' with z the wrapped
    difference theta - xi_i, zero outside |z| < width pi; peaks xi_i = linspace(-pi, pi, N+1)[:-1]."""
    theta = np.asarray(theta, dtype=float)
    peaks = np.linspace(-math.pi, math.pi, num_neurons + 1)[:-1]
    z = np.angle(np.exp(1j * (theta[..., None] - peaks)))
    gain = np.where(np.abs(z) < width * math.pi, 1.0 + np.cos(z / width), 0.0)
    e1 = ring_unit_vectors(theta)[0]
    return gain[..., :, None] * e1[..., None, :]


def head_direction_paths(rng, num_trials: int, num_timesteps: int, step_sd: float = 0.4):
    """Angular random walks (trials, time) wrapped to [0, 2 pi), uniform starting angles."""
    theta0 = rng.uniform(0, 2 * math.pi, (num_trials, 1))
    steps = np.concatenate([np.zeros((num_trials, 1)), step_sd * rng.standard_normal((num_trials, num_timesteps - 1))], 1)
    return np.mod(theta0 + np.cumsum(steps, 1), 2 * math.pi)


def simulate_head_direction(
    seed: int = 0,
    num_trials: int = 100,
    num_timesteps: int = 100,
    num_neurons: int = 10,
    recipe: str = "code",
    epsilon: float = 0.1,
    noise_scale: float = 0.2,
    step_sd=None,
    width: float = 0.5,
    theta=None,
    emission_matrix=None,
    emission: str = "gaussian",
    baseline_rate: float = 2.0,
    emission_noise_scale=None,
) -> dict:
    """Simulate the ring-attractor benchmark.

    ``theta`` (trials, time) gives the head-direction paths instead of drawing random walks (e.g. the
    same path repeated over the trials of one condition); ``emission_matrix`` (N, 2) replaces the random
    C of the "code" recipe (to share it between a training and a test set).

    ``emission_noise_scale`` sets the observation noise sd separately (default ``noise_scale``, which
    always sets the latent noise). ``emission="poisson"`` draws counts y ~ Poisson(baseline_rate * exp(C x)) instead of C x + noise
    (``noise_scale`` then only sets the latent noise).

    Returns a dict with ``y`` (trials, time, neurons), ``inputs`` (trials, time, 1) head direction wrapped
    to [0, 2 pi), ``latents`` (trials, time, 2), and ``truth`` = {"emission_matrix" ((N, 2) for
    recipe "code"), "epsilon", "dynamics_cov", "emission_cov" (None for Poisson), "initial_cov",
    "recipe", "emission", "emission_bias" ((N,) log baseline rate for Poisson, else None)}.
    """
    if recipe not in ("code", "paper"):
        raise ValueError(f"recipe: expected 'code' or 'paper', got {recipe!r}")
    if emission not in ("gaussian", "poisson"):
        raise ValueError(f"emission: expected 'gaussian' or 'poisson', got {emission!r}")
    if not (np.isfinite(baseline_rate) and baseline_rate > 0):
        raise ValueError(f"baseline_rate: expected a positive number, got {baseline_rate!r}")
    for name, value in (("num_trials", num_trials), ("num_timesteps", num_timesteps), ("num_neurons", num_neurons)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon: expected a number in (0, 1), got {epsilon!r}")
    if not noise_scale > 0:
        raise ValueError(f"noise_scale: expected a positive number, got {noise_scale!r}")
    emission_noise_scale = noise_scale if emission_noise_scale is None else emission_noise_scale
    if not emission_noise_scale > 0:
        raise ValueError(f"emission_noise_scale: expected a positive number, got {emission_noise_scale!r}")
    rng = np.random.default_rng(seed)
    step_sd = (0.4 if recipe == "code" else 0.5) if step_sd is None else float(step_sd)
    K, T, N = int(num_trials), int(num_timesteps), int(num_neurons)
    if theta is None:
        theta = head_direction_paths(rng, K, T, step_sd)
    else:
        theta = np.mod(np.asarray(theta, dtype=float), 2 * math.pi)
        if theta.shape != (K, T):
            raise ValueError(f"theta: expected shape ({K}, {T}) (num_trials, num_timesteps), got {theta.shape}")
    A, b = ring_dynamics(theta, epsilon)
    s0 = 0.2 if recipe == "code" else 1.0
    x = np.zeros((K, T, 2))
    x[:, 0] = ring_fixed_points(theta[:, 0]) + math.sqrt(s0) * rng.standard_normal((K, 2))
    for t in range(T - 1):
        x[:, t + 1] = np.einsum("kij,kj->ki", A[:, t], x[:, t]) + b[:, t] + noise_scale * rng.standard_normal((K, 2))
    if recipe == "code":
        C = rng.standard_normal((N, 2)) if emission_matrix is None else np.asarray(emission_matrix, dtype=float)
        if C.shape != (N, 2):
            raise ValueError(f"emission_matrix: expected shape ({N}, 2), got {C.shape}")
        mean = x @ C.T
    else:
        C = None
        mean = np.einsum("ktnd,ktd->ktn", bump_tuning(theta, N, width), x)
    if emission == "poisson":
        bias = np.full(N, math.log(baseline_rate))
        y = rng.poisson(np.exp(mean + bias)).astype(float)
    else:
        bias = None
        y = mean + emission_noise_scale * rng.standard_normal((K, T, N))
    truth = {
        "emission_matrix": C,
        "epsilon": epsilon,
        "dynamics_cov": noise_scale**2 * np.eye(2),
        "emission_cov": emission_noise_scale**2 * np.ones(N) if emission == "gaussian" else None,
        "initial_cov": s0 * np.eye(2),
        "recipe": recipe,
        "width": width,
        "emission": emission,
        "emission_bias": bias,
    }
    return {"y": y, "inputs": theta[..., None], "latents": x, "truth": truth}
