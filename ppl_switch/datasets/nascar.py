"""Synthetic NASCAR tracks (Linderman et al. 2017; GDM paper §4.1 and App. D).

A 2-D latent point x_t drives around a track; four soft states z_t (Gumbel-softmax draws whose logits
depend on x_{t-1} and, in the soft-sticky version, on z_{t-1}) mix four affine dynamics:

    pi_t = (1 - gamma) * scale * (100 w x_{t-1} + 100 b) + gamma * z_{t-1}
    z_t  = softmax((pi_t + g_t) / tau),   g_t ~ Gumbel(0, 1)
    x_t  = sum_k z_tk A_k x_{t-1} + speed * sum_k z_tk c_k
    y_t  = C x_t + noise_std * eps_t,     C ~ N(0, 1)^{obs_dim x 2}

with w = [[1, 0], [-1, 0], [0, 1], [0, -1]] and b = [-2, -2, -1, -1] (state 1 right of x1 = 2, state 2 left
of x1 = -2, state 3 above x2 = 1, state 4 below x2 = -1). The chain starts from z_0 = e_3, x_0 = (0, 1),
which are dropped.

* standard (``soft_sticky=False``): oval track, tau = 0.01, scale = 1, gamma = 0. States 1 and 2 rotate by
  pi/24 per step about the fixed points (2, 0) and (-2, 0); states 3 and 4 translate by (0.1, 0) and
  (-0.25, 0).
* soft-sticky (``soft_sticky=True``): the released code's rectangular track (all A_k = I, translations
  (0, -0.05), (0, 0.05), (0.05, 0), (-0.05, 0)) with tau = 0.99, scale = 0.02, gamma = 0.25.

Optionally the speed factor s ~ U[speed_min, 1] is redrawn whenever argmax z_t changes.

Random streams: ``stream="generator"`` (default) draws from ``numpy.random.Generator`` seeded by ``key``;
``stream="reference"`` reproduces the draw order of the paper's released generator on numpy's legacy
``RandomState(seed)`` (a speed draw before the loop, four uniforms per step turned into Gumbel noise as
-log(-log(U + 1e-8) + 1e-8), a speed draw after every argmax switch, then C, then the observation noise),
so that integer seeds give the paper's trials: soft-sticky seed 0 has 435 argmax switches and mean
max_k z_t = 0.73, and the standard test trial of seed 0 shares the training path with fresh noise.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from scipy.linalg import expm

__all__ = ["NascarData", "nascar", "nascar_parameters"]

_W = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
_B = np.array([-2.0, -2.0, -1.0, -1.0])


class NascarData(NamedTuple):
    """One NASCAR trial.

    Attributes:
        y: (T, obs_dim) observations.
        states: (T,) int, argmax of the true soft states (the labels used for state accuracy).
        soft_states: (T, 4) true relaxed states z_t.
        latents: (T, 2) true latent positions x_t.
        params: dict with ``dynamics`` A (4, 2, 2), ``offsets`` c (4, 2), ``emission_matrix`` C (obs_dim, 2),
            ``fixed_points`` (4, 2) (NaN for states with A_k = I), and the generator settings.
    """

    y: np.ndarray
    states: np.ndarray
    soft_states: np.ndarray
    latents: np.ndarray
    params: dict


def nascar_parameters(soft_sticky: bool = False) -> dict[str, Any]:
    """Track dynamics and state logits of the standard (oval) or soft-sticky (rectangle) generator."""
    if soft_sticky:
        dynamics = np.stack([np.eye(2)] * 4)
        offsets = np.array([[0.0, -0.05], [0.0, 0.05], [0.05, 0.0], [-0.05, 0.0]])
        fixed_points = np.full((4, 2), np.nan)
        settings = dict(temperature=0.99, scale=0.02, gamma=0.25)
    else:
        theta = np.pi / 24
        rotation = expm(np.array([[0.0, theta], [-theta, 0.0]]))
        dynamics = np.stack([rotation, rotation, np.eye(2), np.eye(2)])
        centres = np.array([[2.0, 0.0], [-2.0, 0.0]])
        offsets = np.array(
            [-(rotation - np.eye(2)) @ centres[0], -(rotation - np.eye(2)) @ centres[1], [0.1, 0.0], [-0.25, 0.0]]
        )
        fixed_points = np.concatenate([centres, np.full((2, 2), np.nan)])
        settings = dict(temperature=0.01, scale=1.0, gamma=0.0)
    return dict(
        dynamics=dynamics,
        offsets=offsets,
        fixed_points=fixed_points,
        logit_weights=100.0 * _W,
        logit_bias=100.0 * _B,
        **settings,
    )


def _rng(key_or_seed) -> np.random.Generator:
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    try:
        data = np.asarray(jax.random.key_data(key_or_seed)).ravel()
    except Exception as err:  # noqa: BLE001 - report the argument, not JAX internals
        raise ValueError(f"key: expected an int seed or a JAX PRNG key, got {key_or_seed!r}") from err
    return np.random.default_rng([int(v) for v in data])


def nascar(
    key,
    num_timesteps: int = 1000,
    obs_dim: int = 10,
    soft_sticky: bool = False,
    *,
    emission_matrix: Optional[np.ndarray] = None,
    noise_std: float = 0.01,
    temperature: Optional[float] = None,
    scale: Optional[float] = None,
    gamma: Optional[float] = None,
    speed_min: float = 1.0,
    noise_seed: Optional[int] = None,
    stream: str = "generator",
) -> NascarData:
    """Simulate one NASCAR trial.

    Args:
        key: int seed or JAX PRNG key (drives C when not given, the Gumbel noise, speeds and noise).
        num_timesteps: T >= 1.
        obs_dim: N >= 1 (ignored in favour of ``emission_matrix.shape[0]`` when that is given).
        soft_sticky: the soft-sticky rectangle (True) or the standard oval (False).
        emission_matrix: (N, 2) C to reuse, e.g. the training trial's ``params["emission_matrix"]``
            for a test trial.
        noise_std: observation noise standard deviation (default 0.01).
        temperature, scale, gamma: override the variant's Gumbel-softmax temperature, logit scale and
            stickiness.
        speed_min: s ~ U[speed_min, 1] redrawn at every switch of argmax z (1 = constant speed).
        noise_seed: if given, the observation noise comes from this seed instead of ``key``; with the same
            ``key`` this gives the released code's standard-NASCAR test trial (same latent path, new noise).
        stream: ``"generator"`` (numpy Generator from ``key``) or ``"reference"`` (the released code's
            legacy ``RandomState(key)`` draw order; ``key`` must be an int; the speed is then redrawn after
            the step that switches, as there).
    """
    if stream not in ("generator", "reference"):
        raise ValueError(f"stream: expected 'generator' or 'reference', got {stream!r}")
    if stream == "reference" and not isinstance(key, (int, np.integer)):
        raise ValueError(f"key: stream='reference' needs an int seed, got {key!r}")
    if int(num_timesteps) < 1:
        raise ValueError(f"num_timesteps: expected an integer >= 1, got {num_timesteps}")
    if emission_matrix is None and int(obs_dim) < 1:
        raise ValueError(f"obs_dim: expected an integer >= 1, got {obs_dim}")
    if not 0.0 < speed_min <= 1.0:
        raise ValueError(f"speed_min: expected a number in (0, 1], got {speed_min}")
    if noise_std < 0:
        raise ValueError(f"noise_std: expected a non-negative number, got {noise_std}")
    rng = np.random.RandomState(int(key)) if stream == "reference" else _rng(key)
    p = nascar_parameters(soft_sticky)
    tau = p["temperature"] if temperature is None else float(temperature)
    scale = p["scale"] if scale is None else float(scale)
    gamma = p["gamma"] if gamma is None else float(gamma)
    if not tau > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    reference = stream == "reference"
    if emission_matrix is not None:
        emission_matrix = np.asarray(emission_matrix, dtype=float)
        if emission_matrix.ndim != 2 or emission_matrix.shape[1] != 2:
            raise ValueError(f"emission_matrix: expected shape (obs_dim, 2), got {emission_matrix.shape}")
    elif not reference:  # the reference stream draws C after the path
        emission_matrix = rng.standard_normal((int(obs_dim), 2))

    A, c = p["dynamics"], p["offsets"]
    num_timesteps = int(num_timesteps)
    z_prev, x_prev = np.eye(4)[2], np.array([0.0, 1.0])
    speed = speed_min + (1.0 - speed_min) * rng.uniform() if reference else 1.0
    zs, xs = np.empty((num_timesteps, 4)), np.empty((num_timesteps, 2))
    for t in range(num_timesteps):
        logits = (1 - gamma) * scale * (p["logit_weights"] @ x_prev + p["logit_bias"]) + gamma * z_prev
        gumbel = -np.log(-np.log(rng.uniform(size=4) + 1e-8) + 1e-8) if reference else rng.gumbel(size=4)
        scores = (logits + gumbel) / tau
        z = np.exp(scores - scores.max())
        z /= z.sum()
        switched = np.argmax(z) != np.argmax(z_prev)
        if not reference and speed_min < 1.0 and switched:
            speed = rng.uniform(speed_min, 1.0)
        x = np.einsum("k,kij,j->i", z, A, x_prev) + speed * (z @ c)
        if reference and switched:  # drawn even at speed_min = 1, which keeps the stream aligned
            speed = speed_min + (1.0 - speed_min) * rng.uniform()
        zs[t], xs[t] = z, x
        z_prev, x_prev = z, x
    if emission_matrix is None:
        emission_matrix = rng.standard_normal((int(obs_dim), 2))
    noise_rng = rng if noise_seed is None else np.random.default_rng(int(noise_seed))
    y = xs @ emission_matrix.T + noise_std * noise_rng.standard_normal((num_timesteps, emission_matrix.shape[0]))
    params = dict(p, emission_matrix=emission_matrix, noise_std=noise_std, temperature=tau, scale=scale, gamma=gamma)
    return NascarData(y=y, states=np.argmax(zs, -1), soft_states=zs, latents=xs, params=params)


def simulate_nascar(seed: int = 0, num_timesteps: int = 1000, obs_dim: int = 10, soft_sticky: bool = False) -> dict:
    """One NASCAR trial in the registry's layout: ``y`` (1, T, N), ``states`` (1, T), ``latents`` (1, T, 2)."""
    trial = nascar(seed, num_timesteps=num_timesteps, obs_dim=obs_dim, soft_sticky=soft_sticky)
    return {"y": trial.y[None], "states": trial.states[None], "latents": trial.latents[None]}
