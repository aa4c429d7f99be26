"""The distinct patterns of observed entries in an observation mask.

A Gaussian quantity of a partly observed step (its marginal density, the conditional moments of its missing
entries) needs a factorisation of the observed block of its covariance. When the covariance is the same at
every step (per state), that factorisation depends on the step only through which entries it observes, and
a D-dimensional mask has at most 2^D such patterns: factorising once per pattern instead of once per step
turns T LAPACK calls per state into at most 2^D (1024 for D = 10, however long the series), and each step
applies its pattern's factor with a gather and plain arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MAX_PATTERN_DIM", "mask_patterns", "observed_block", "worth_deduplicating"]

#: largest observed dimension whose patterns are coded as integers (2^D codes) and deduplicated
MAX_PATTERN_DIM = 20


def worth_deduplicating(num_steps: int, dim: int) -> bool:
    """Whether ``num_steps`` steps of ``dim`` entries can have fewer distinct patterns than steps."""
    return dim <= MAX_PATTERN_DIM and num_steps > 2**dim


def mask_patterns(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(patterns (U, D) 0/1 floats, index (...,) ints)`` for a (..., D) boolean mask, with
    ``patterns[index[i]]`` the pattern of step i. U = min(steps, 2^D) is static, so shapes do not depend
    on the data; unused rows repeat a pattern. Without a gain (:func:`worth_deduplicating` False) each
    step is its own pattern."""
    lead, D = mask.shape[:-1], mask.shape[-1]
    flat = mask.reshape(-1, D)
    n = flat.shape[0]
    if not worth_deduplicating(n, D):
        return flat.astype(jnp.result_type(float)), jnp.arange(n).reshape(lead)
    codes = jnp.sum(flat.astype(jnp.int32) << jnp.arange(D, dtype=jnp.int32), -1)
    unique, index = jnp.unique(codes, size=2**D, fill_value=2**D - 1, return_inverse=True)
    patterns = (unique[:, None] >> jnp.arange(D, dtype=jnp.int32)) & 1
    return patterns.astype(jnp.result_type(float)), index.reshape(lead)


def observed_block(pattern: jax.Array, cov: jax.Array) -> jax.Array:
    """M S M + (I - M) for M = diag(pattern): the covariance ``cov`` (..., D, D) on the observed rows and
    columns of ``pattern`` (..., D) (bool or 0/1), the identity on the others. Its factor is that of the
    observed block S_oo padded with ones, so shapes stay static whatever the pattern."""
    m = pattern.astype(bool)
    both = m[..., :, None] & m[..., None, :]
    return jnp.where(both, cov, jnp.eye(cov.shape[-1], dtype=cov.dtype))
