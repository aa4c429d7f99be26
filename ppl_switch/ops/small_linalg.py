"""Cholesky factorisation and triangular solves for small matrices, written out element by element.

On CPU every ``jnp.linalg.cholesky`` / ``solve_triangular`` is a LAPACK custom call: XLA cannot fuse it
with the arithmetic around it, and for a 2 x 2 or 4 x 4 matrix the call overhead dominates a Kalman scan
step. Unrolled over the (static) matrix size, the same algorithms become a handful of elementwise
operations that XLA fuses into the step. Use only for small sizes (see :data:`UNROLL_MAX`): the traced
program grows as n^3.

All functions broadcast over leading batch axes and are differentiable (plain jnp arithmetic).
A matrix that is not positive definite gives NaN entries, as the LAPACK path does. The ``small_*``
functions choose: unrolled up to :data:`UNROLL_MAX`, LAPACK above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

Array = jax.Array

#: largest matrix size for which the Kalman kernels use the unrolled versions
UNROLL_MAX = 4


def cholesky_unrolled(S: Array) -> Array:
    """Lower Cholesky factor L of S = L L' (..., n, n), reading only the lower triangle of S."""
    n = S.shape[-1]
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        pivot = S[..., j, j] - sum((L[j][k] ** 2 for k in range(j)), jnp.zeros_like(S[..., j, j]))
        L[j][j] = jnp.sqrt(pivot)
        for i in range(j + 1, n):
            off = S[..., i, j] - sum((L[i][k] * L[j][k] for k in range(j)), jnp.zeros_like(S[..., i, j]))
            L[i][j] = off / L[j][j]
    zero = jnp.zeros_like(S[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(n)], -1) for i in range(n)]
    return jnp.stack(rows, -2)


def solve_lower_unrolled(L: Array, B: Array) -> Array:
    """X with L X = B by forward substitution; L (..., n, n) lower triangular, B (..., n, m)."""
    n = L.shape[-1]
    rows = []
    for i in range(n):
        acc = B[..., i, :]
        for k in range(i):
            acc = acc - L[..., i, k, None] * rows[k]
        rows.append(acc / L[..., i, i, None])
    return jnp.stack(rows, -2)


def solve_lower_transpose_unrolled(L: Array, B: Array) -> Array:
    """X with L' X = B by back substitution; L (..., n, n) lower triangular, B (..., n, m)."""
    n = L.shape[-1]
    rows = [None] * n
    for i in reversed(range(n)):
        acc = B[..., i, :]
        for k in range(i + 1, n):
            acc = acc - L[..., k, i, None] * rows[k]
        rows[i] = acc / L[..., i, i, None]
    return jnp.stack(rows, -2)


def solve_unrolled(A: Array, B: Array) -> Array:
    """X with A X = B by Gauss–Jordan elimination with partial pivoting; A (..., n, n), B (..., n, m).

    The same pivoting rule as LAPACK's LU (largest magnitude in the column), so it is as robust for
    general non-singular A; the row swaps are selects, so everything stays elementwise and fusable.
    """
    n = A.shape[-1]
    rows = jnp.arange(n)[:, None]
    Ab = jnp.concatenate([A, B], -1)
    for k in range(n):
        p = k + jnp.argmax(jnp.abs(Ab[..., k:, k]), axis=-1)  # (...,) pivot row
        row_k = Ab[..., k, :]
        row_p = jnp.take_along_axis(Ab, p[..., None, None], axis=-2)[..., 0, :]
        Ab = jnp.where(rows == k, row_p[..., None, :], jnp.where(rows == p[..., None, None], row_k[..., None, :], Ab))
        pivot_row = Ab[..., k, :] / Ab[..., k, k, None]
        factors = jnp.where(rows[:, 0] == k, 0.0, Ab[..., :, k])
        Ab = Ab - factors[..., :, None] * pivot_row[..., None, :]
        Ab = jnp.where(rows == k, pivot_row[..., None, :], Ab)
    return Ab[..., n:]


def small_cholesky(S: Array) -> Array:
    """Lower Cholesky factor (..., n, n); written out for n <= UNROLL_MAX so XLA fuses it with its neighbours."""
    return cholesky_unrolled(S) if S.shape[-1] <= UNROLL_MAX else jnp.linalg.cholesky(S)


def small_solve_lower(L: Array, B: Array) -> Array:
    """L^-1 B for lower-triangular L (..., n, n) and B (..., n, m)."""
    return solve_lower_unrolled(L, B) if L.shape[-1] <= UNROLL_MAX else solve_triangular(L, B, lower=True)


def small_solve_lower_transpose(L: Array, B: Array) -> Array:
    """L'^-1 B for lower-triangular L (..., n, n) and B (..., n, m)."""
    if L.shape[-1] <= UNROLL_MAX:
        return solve_lower_transpose_unrolled(L, B)
    return solve_triangular(jnp.swapaxes(L, -1, -2), B, lower=False)


def small_cho_solve(L: Array, B: Array) -> Array:
    """(L L')^-1 B for lower-triangular L (..., n, n) and B (..., n, m)."""
    if L.shape[-1] <= UNROLL_MAX:
        return solve_lower_transpose_unrolled(L, solve_lower_unrolled(L, B))
    return cho_solve((L, True), B)


def small_solve(A: Array, B: Array) -> Array:
    """A^-1 B for general A (..., n, n) and B (..., n, m) (partial pivoting either way)."""
    return solve_unrolled(A, B) if A.shape[-1] <= UNROLL_MAX else jnp.linalg.solve(A, B)
