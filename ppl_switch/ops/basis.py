"""Basis functions for weight-space GP priors over parameter functions of an observed condition u.

A parameter function M(u) (a matrix-valued function of the condition) is written in weight space as

    M(u)[i, j] = sum_l phi_l(u) W[l, i, j],      W[l, i, j] ~ N(0, 1) iid,

so ``Cov(M_ij(u), M_ij(u')) = phi(u) . phi(u')``: the basis fixes the kernel, all randomness is in W.
Every basis here is a frozen dataclass (hashable, so it can sit in a jit-static model config) with

* ``num_features`` -- L, the number of features;
* ``__call__(u)`` -- features ``(..., L)`` of conditions ``u`` ``(..., input_dim)``;
* ``kernel(u1, u2)`` -- the implied kernel ``phi(u1) phi(u2)^T``.

Bases (pure JAX):

* :class:`FourierBasis` -- regular Fourier features of the squared-exponential kernel on the circle
  (one angular column) or the torus (several angular columns, tensor product of circles). Length-scale
  ``kappa`` is a *fraction of the period* (length-scale = kappa * period). ``reference_scaling=True``
  reproduces the CLDS authors' released code (sin/cos features scaled by sqrt(S(n)) instead of
  sqrt(2 S(n)), and on the torus their non-negative multi-index set), whose prior variance is below sigma^2.
* :class:`HSGPBasis` -- Hilbert-space GP features (numpyro.contrib.hsgp) of the SE kernel for
  non-periodic conditions on ``[center - ell, center + ell]``.
* :class:`LinearBasis` -- ``[bias_scale, scale * u]``: the linear kernel, i.e. additive inputs.
* :class:`ConstantBasis` -- one constant feature: a parameter that does not vary with u.
* :class:`ProductBasis` -- tensor product of bases acting on (usually different) condition columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import jax.numpy as jnp
import numpy as np
from numpyro.contrib.hsgp.laplacian import eigenfunctions
from numpyro.contrib.hsgp.spectral_densities import diag_spectral_density_squared_exponential

__all__ = [
    "ConstantBasis",
    "FourierBasis",
    "HSGPBasis",
    "LinearBasis",
    "ProductBasis",
    "circle_se_spectrum",
    "evaluate",
    "wrapped_se_kernel",
]


def _check_columns(columns, name: str) -> tuple[int, ...]:
    cols = tuple(int(c) for c in np.atleast_1d(columns))
    if len(cols) == 0 or min(cols) < 0:
        raise ValueError(f"{name}: expected one or more non-negative column indices, got {columns!r}")
    return cols


def _select(u, columns: tuple[int, ...]):
    """u (..., input_dim) -> (..., len(columns)); raises if a column is missing (shape is static)."""
    u = jnp.asarray(u)
    if u.ndim == 0:
        u = u[None]
    if max(columns) >= u.shape[-1]:
        raise ValueError(
            f"u: the basis reads condition columns {columns} but u has last dimension {u.shape[-1]}"
        )
    return u[..., list(columns)]


def circle_se_spectrum(num_frequencies: int, sigma: float, kappa: float) -> np.ndarray:
    """Spectral weights S(n), n = 0..num_frequencies-1, of the SE kernel on a circle.

    ``S(n) = sigma^2 q^(n^2) / theta_3(q)`` with ``q = exp(-2 pi^2 kappa^2)`` and the Jacobi theta
    ``theta_3(q) = sum_{n in Z} q^(n^2)``, so that ``S(0) + 2 sum_{n>=1} S(n) = sigma^2`` (the full
    kernel's variance). ``kappa`` is the length-scale as a fraction of the period.
    """
    if num_frequencies < 1:
        raise ValueError(f"num_frequencies: expected an integer >= 1, got {num_frequencies}")
    if not (sigma > 0 and kappa > 0):
        raise ValueError(f"sigma, kappa: expected positive numbers, got sigma={sigma}, kappa={kappa}")
    q_log = -2.0 * math.pi**2 * kappa**2
    # theta_3 converges like q^(n^2); 60 terms are exact to double precision for kappa >= 0.005.
    n_all = np.arange(-max(60, 4 * num_frequencies), max(60, 4 * num_frequencies) + 1)
    theta3 = np.exp(q_log * n_all.astype(float) ** 2).sum()
    n = np.arange(num_frequencies, dtype=float)
    return sigma**2 * np.exp(q_log * n**2) / theta3


def wrapped_se_kernel(u1, u2, *, sigma: float, kappa: float, period: float = 2 * math.pi, terms: int = 60):
    """The exact (untruncated) SE kernel on the circle, ``sum_n S(n) cos(2 pi n (u1 - u2) / P)`` over
    all integers n: the limit the Fourier features approximate. u1 (n1,), u2 (n2,) -> (n1, n2)."""
    s = circle_se_spectrum(terms, sigma, kappa)
    d = jnp.asarray(u1)[:, None] - jnp.asarray(u2)[None, :]
    n = jnp.arange(1, terms)
    return s[0] + 2 * jnp.sum(s[1:] * jnp.cos(2 * jnp.pi * n * d[..., None] / period), axis=-1)


@dataclass(frozen=True)
class FourierBasis:
    """Regular Fourier features of the SE kernel on the circle / torus.

    Args:
        num_frequencies: N; frequencies 0..N-1 per angular column (the authors' "N = 5").
            One column gives L = 2N - 1 features ordered [const, sin 1, cos 1, sin 2, cos 2, ...].
        sigma: prior standard deviation of the parameter function (kernel variance sigma^2).
        kappa: length-scale as a fraction of the period (length-scale = kappa * period).
        period: period of each angular column (same for all), 2 pi for angles in radians.
        columns: which columns of u are angles (one -> circle, several -> torus).
        reference_scaling: reproduce the released CLDS code: sin/cos scaled by sqrt(S(n)) (no sqrt 2),
            torus over non-negative multi-indices with S(||n||). Default False (correct SE scaling;
            the torus is the tensor product of circles, L = (2N - 1)^M).
    """

    num_frequencies: int = 5
    sigma: float = 0.5
    kappa: float = 0.1
    period: float = 2 * math.pi
    columns: tuple = (0,)
    reference_scaling: bool = False

    def __post_init__(self):
        object.__setattr__(self, "columns", _check_columns(self.columns, "columns"))
        if not self.period > 0:
            raise ValueError(f"period: expected a positive number, got {self.period}")
        circle_se_spectrum(self.num_frequencies, self.sigma, self.kappa)  # validates

    @property
    def num_features(self) -> int:
        n, m = self.num_frequencies, len(self.columns)
        if self.reference_scaling:
            return 2 * (n**m - 1) + 1
        return (2 * n - 1) ** m

    def _circle(self, angle):
        """angle (...) -> (..., 2N-1) correct-scaled circle features."""
        s = circle_se_spectrum(self.num_frequencies, self.sigma, self.kappa)
        n = jnp.arange(1, self.num_frequencies)
        arg = 2 * jnp.pi * n * angle[..., None] / self.period
        amp = jnp.sqrt(2 * s[1:])
        sin, cos = amp * jnp.sin(arg), amp * jnp.cos(arg)
        const = jnp.full(angle.shape + (1,), math.sqrt(s[0]), dtype=sin.dtype)
        return jnp.concatenate([const, jnp.stack([sin, cos], -1).reshape(angle.shape + (-1,))], -1)

    def _reference(self, u):
        """The released code's T1/Tm basis: multi-indices in {0..N-1}^M, weights sqrt(S(||n||))."""
        m = u.shape[-1]
        grids = np.stack(np.meshgrid(*[np.arange(self.num_frequencies)] * m, indexing="ij"), -1).reshape(-1, m)
        grids = grids[1:]  # drop n = 0 (the constant is added once)
        q_log = -2.0 * math.pi**2 * self.kappa**2
        inv_theta3 = circle_se_spectrum(1, self.sigma, self.kappa)[0] / self.sigma**2
        amp = jnp.sqrt(self.sigma**2 * inv_theta3 * np.exp(q_log * (grids**2).sum(-1)))
        arg = 2 * jnp.pi * (u / self.period) @ grids.T.astype(float)
        const = jnp.full(u.shape[:-1] + (1,), math.sqrt(self.sigma**2 * inv_theta3), dtype=arg.dtype)
        sin, cos = amp * jnp.sin(arg), amp * jnp.cos(arg)
        return jnp.concatenate([const, jnp.stack([sin, cos], -1).reshape(u.shape[:-1] + (-1,))], -1)

    def __call__(self, u):
        u = _select(u, self.columns)
        if self.reference_scaling:
            return self._reference(u)
        feats = self._circle(u[..., 0])
        for k in range(1, u.shape[-1]):
            feats = _outer(feats, self._circle(u[..., k]))
        return feats

    def kernel(self, u1, u2):
        return self(u1) @ jnp.swapaxes(self(u2), -1, -2)


@dataclass(frozen=True)
class HSGPBasis:
    """Hilbert-space approximate GP features of the SE kernel (numpyro.contrib.hsgp) for non-periodic
    conditions: Laplacian eigenfunctions on the box ``center +- ell`` weighted by sqrt of the spectral
    density. Choose ``ell`` about 1.5-2 times the half-range of the data for an accurate kernel.

    Args:
        num_basis: eigenfunctions per column (L = num_basis ** len(columns)).
        sigma: prior standard deviation (kernel variance sigma^2).
        lengthscale: SE length-scale in the units of u.
        ell: half-width of the approximation box (scalar or one per column).
        center: centre of the box (scalar or one per column).
        columns: which condition columns the basis reads.
    """

    num_basis: int = 10
    sigma: float = 1.0
    lengthscale: float = 1.0
    ell: float = 2.0
    center: float = 0.0
    columns: tuple = (0,)

    def __post_init__(self):
        object.__setattr__(self, "columns", _check_columns(self.columns, "columns"))
        if self.num_basis < 1:
            raise ValueError(f"num_basis: expected an integer >= 1, got {self.num_basis}")
        if not (self.sigma > 0 and self.lengthscale > 0 and np.all(np.asarray(self.ell) > 0)):
            raise ValueError("sigma, lengthscale, ell: expected positive numbers, got "
                             f"{self.sigma}, {self.lengthscale}, {self.ell}")

    @property
    def num_features(self) -> int:
        return self.num_basis ** len(self.columns)

    def __call__(self, u):
        x = _select(u, self.columns) - jnp.asarray(self.center)
        dim = len(self.columns)
        ell = float(self.ell) if np.ndim(self.ell) == 0 else [float(e) for e in self.ell]
        batch = x.shape[:-1]
        phi = eigenfunctions(x.reshape(-1, dim), ell=ell, m=self.num_basis)  # (n, L)
        spd = diag_spectral_density_squared_exponential(
            alpha=self.sigma**2, length=self.lengthscale, ell=ell, m=self.num_basis, dim=dim
        )
        return (phi * jnp.sqrt(spd)).reshape(batch + (-1,))

    def kernel(self, u1, u2):
        return self(u1) @ jnp.swapaxes(self(u2), -1, -2)


@dataclass(frozen=True)
class LinearBasis:
    """Linear-kernel features ``[bias_scale, scale * u_c for c in columns]``: with this basis for b(u)
    and constant A, a CLDS is the LDS with additive inputs ``x_{t+1} = A x_t + B u_t + b``."""

    columns: tuple = (0,)
    scale: float = 1.0
    bias_scale: Optional[float] = 1.0

    def __post_init__(self):
        object.__setattr__(self, "columns", _check_columns(self.columns, "columns"))

    @property
    def num_features(self) -> int:
        return len(self.columns) + (self.bias_scale is not None)

    def __call__(self, u):
        x = self.scale * _select(u, self.columns)
        if self.bias_scale is None:
            return x
        return jnp.concatenate([jnp.full(x.shape[:-1] + (1,), self.bias_scale, dtype=x.dtype), x], -1)

    def kernel(self, u1, u2):
        return self(u1) @ jnp.swapaxes(self(u2), -1, -2)


@dataclass(frozen=True)
class ConstantBasis:
    """One constant feature ``scale``: a parameter that does not depend on u, with prior N(0, scale^2)."""

    scale: float = 1.0

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale: expected a positive number, got {self.scale}")

    @property
    def num_features(self) -> int:
        return 1

    def __call__(self, u):
        u = jnp.asarray(u)
        return jnp.full(u.shape[:-1] + (1,), self.scale, dtype=jnp.result_type(u.dtype, float))

    def kernel(self, u1, u2):
        return self(u1) @ jnp.swapaxes(self(u2), -1, -2)


@dataclass(frozen=True)
class ProductBasis:
    """Tensor product of bases, e.g. an angle (Fourier) times a task phase (HSGP or linear): the implied
    kernel is the product of the factors' kernels; L is the product of their sizes."""

    factors: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        if len(self.factors) < 1:
            raise ValueError("factors: expected at least one basis")

    @property
    def num_features(self) -> int:
        return int(np.prod([f.num_features for f in self.factors]))

    def __call__(self, u):
        feats = self.factors[0](u)
        for f in self.factors[1:]:
            feats = _outer(feats, f(u))
        return feats

    def kernel(self, u1, u2):
        return self(u1) @ jnp.swapaxes(self(u2), -1, -2)


def _outer(a, b):
    """(..., La), (..., Lb) -> (..., La * Lb), a-major."""
    return (a[..., :, None] * b[..., None, :]).reshape(a.shape[:-1] + (-1,))


def evaluate(features, weights):
    """Parameter function values from features and weights.

    Args:
        features: (..., L) basis features phi(u).
        weights: (L, *shape) weights W.
    Returns:
        (..., *shape): ``sum_l phi_l(u) W[l]``.
    """
    return jnp.tensordot(features, weights, axes=([-1], [0]))


_BASES = {cls.__name__: cls for cls in (FourierBasis, HSGPBasis, LinearBasis, ConstantBasis, ProductBasis)}


def basis_to_config(basis) -> dict:
    """JSON-serialisable description of a basis ({"type": class name, **fields})."""
    from dataclasses import fields

    out = {"type": type(basis).__name__}
    for f in fields(basis):
        value = getattr(basis, f.name)
        if f.name == "factors":
            value = [basis_to_config(b) for b in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def basis_from_config(config):
    """Inverse of :func:`basis_to_config`; a basis object is returned unchanged."""
    if not isinstance(config, dict):
        return config
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in _BASES:
        raise ValueError(f"basis: unknown type {kind!r}; expected one of {sorted(_BASES)}")
    if kind == "ProductBasis":
        config["factors"] = tuple(basis_from_config(b) for b in config.get("factors", ()))
    for key in ("columns", "ell", "center"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    return _BASES[kind](**config)
