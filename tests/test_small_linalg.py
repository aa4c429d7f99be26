"""The unrolled small-matrix Cholesky and triangular solve against LAPACK (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import solve_triangular

from ppl_switch.ops.small_linalg import (
    cholesky_unrolled,
    solve_lower_transpose_unrolled,
    solve_lower_unrolled,
    solve_unrolled,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _spd_batch(seed, batch, n):
    X = np.random.default_rng(seed).normal(size=batch + (n, n))
    return X @ np.swapaxes(X, -1, -2) / n + 0.3 * np.eye(n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_cholesky_and_solve_match_lapack(n):
    S = _spd_batch(n, (5,), n)
    B = np.random.default_rng(10 + n).normal(size=(5, n, 3))
    L = cholesky_unrolled(jnp.asarray(S))
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-12, atol=1e-12)
    X = solve_lower_unrolled(L, jnp.asarray(B))
    np.testing.assert_allclose(X, solve_triangular(L, B, lower=True), rtol=1e-10, atol=1e-12)
    Xt = solve_lower_transpose_unrolled(L, jnp.asarray(B))
    np.testing.assert_allclose(Xt, solve_triangular(L, B, lower=True, trans="T"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_general_solve_matches_lapack_and_pivots(n):
    rng = np.random.default_rng(n)
    A, B = rng.normal(size=(6, n, n)), rng.normal(size=(6, n, 2))
    A[0] = np.eye(n)[::-1]  # zero on the diagonal: fails without row exchanges
    A[1] = np.diag(np.full(n, 1e-9)) + np.eye(n)[::-1]  # tiny diagonal pivots: inaccurate without them
    np.testing.assert_allclose(solve_unrolled(jnp.asarray(A), jnp.asarray(B)), np.linalg.solve(A, B), rtol=1e-9, atol=1e-9)


def test_reads_only_the_lower_triangle():
    S = _spd_batch(0, (), 3)
    garbage_upper = S + np.triu(np.full((3, 3), 7.0), 1)
    np.testing.assert_allclose(cholesky_unrolled(jnp.asarray(garbage_upper)), np.linalg.cholesky(S), atol=1e-12)


def test_gradients_match_lapack():
    S = jnp.asarray(_spd_batch(1, (), 3))
    B = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2)))

    def loss(solve, chol, S):
        S = (S + S.T) / 2  # the two factorisations read different triangles; symmetrise for a common gradient
        return jnp.sum(solve(chol(S), B) ** 2) + jnp.sum(jnp.log(jnp.diagonal(chol(S))))

    lapack = jax.grad(lambda S: loss(lambda L, B: solve_triangular(L, B, lower=True), jnp.linalg.cholesky, S))(S)
    unrolled = jax.grad(lambda S: loss(solve_lower_unrolled, cholesky_unrolled, S))(S)
    np.testing.assert_allclose(unrolled, lapack, rtol=1e-8, atol=1e-10)
    A = S + jnp.asarray(np.random.default_rng(3).normal(size=(3, 3)))  # non-symmetric
    np.testing.assert_allclose(jax.grad(lambda A: jnp.sum(solve_unrolled(A, B) ** 2))(A),
                               jax.grad(lambda A: jnp.sum(jnp.linalg.solve(A, B) ** 2))(A), rtol=1e-8, atol=1e-10)


def test_not_positive_definite_gives_nan():
    assert np.isnan(np.asarray(cholesky_unrolled(jnp.array([[1.0, 2.0], [2.0, 1.0]])))).any()
