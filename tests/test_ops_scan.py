"""The seeded prefix scan against a sequential loop, for every length 0 to 33 (odd and even splits at
every recursion level) and a non-commutative operation (affine maps of the line and of the plane)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.ops.scan import seeded_prefix_scan

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _compose(a, b):  # x -> b(a(x)) for affine maps x -> x @ A + c, batched
    A1, c1 = a
    A2, c2 = b
    return A1 @ A2, jnp.einsum("bi,bij->bj", c1, A2) + c2


def _apply(x, e):
    A, c = e
    return jnp.einsum("bi,bij->bj", x, A) + c


@pytest.mark.parametrize("dim", [1, 2])
def test_seeded_prefix_scan_matches_a_sequential_loop(dim):
    rng = np.random.default_rng(dim)
    for n in range(0, 34):
        A = rng.normal(size=(n, dim, dim)) * 0.8
        c = rng.normal(size=(n, dim))
        seed = rng.normal(size=dim)
        got = np.asarray(seeded_prefix_scan(_compose, _apply, jnp.asarray(seed), (jnp.asarray(A), jnp.asarray(c))))
        x, want = seed, []
        for t in range(n):
            x = x @ A[t] + c[t]
            want.append(x)
        np.testing.assert_allclose(got, np.stack(want) if want else np.zeros((0, dim)), rtol=1e-5, atol=1e-5, err_msg=f"n={n}")


def test_seeded_prefix_scan_of_no_elements_is_empty():
    got = seeded_prefix_scan(_compose, _apply, jnp.zeros(2), (jnp.zeros((0, 2, 2)), jnp.zeros((0, 2))))
    assert got.shape == (0, 2)
