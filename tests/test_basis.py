"""Basis features for weight-space GP priors (ppl_switch.ops.basis)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_switch.ops.basis import (
    ConstantBasis,
    FourierBasis,
    HSGPBasis,
    LinearBasis,
    ProductBasis,
    circle_se_spectrum,
    evaluate,
    wrapped_se_kernel,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def test_circle_spectrum_matches_reference_table():
    # CLDS notes §1.3: sigma=0.5, kappa=0.1, N=5 -> theta_3 = 3.9894, sqrt S(n) table.
    s = circle_se_spectrum(5, 0.5, 0.1)
    np.testing.assert_allclose(np.sqrt(s), [0.2503, 0.2268, 0.1687, 0.1030, 0.0516], atol=1e-4)
    np.testing.assert_allclose(0.25 / s[0], 3.9894, atol=1e-4)
    s2 = circle_se_spectrum(5, 1.0, 0.15)
    np.testing.assert_allclose(np.sqrt(s2), [0.6132, 0.4911, 0.2522, 0.0831, 0.0176], atol=1e-4)


@pytest.mark.parametrize("reference", [False, True])
def test_fourier_counts_and_periodicity(reference):
    b1 = FourierBasis(5, 0.5, 0.1, reference_scaling=reference)
    assert b1.num_features == 9
    b2 = FourierBasis(5, 0.5, 0.1, columns=(0, 1), reference_scaling=reference)
    assert b2.num_features == (49 if reference else 81)
    u = jax.random.uniform(jax.random.PRNGKey(0), (7, 2), minval=-5, maxval=5)
    for b in (b1, b2):
        phi = b(u)
        assert phi.shape == (7, b.num_features)
        np.testing.assert_allclose(b(u + 2 * math.pi), phi, atol=1e-10)
        np.testing.assert_allclose(b(u + jnp.array([0.0, 2 * math.pi])), phi, atol=1e-10)


def test_fourier_prior_variance_correct_vs_reference():
    u = jnp.linspace(0, 2 * math.pi, 13)[:, None]
    k_correct = jnp.diag(FourierBasis(5, 0.5, 0.1).kernel(u, u))
    k_ref = jnp.diag(FourierBasis(5, 0.5, 0.1, reference_scaling=True).kernel(u, u))
    np.testing.assert_allclose(k_correct, 0.2490, atol=2e-4)  # >= 0.99 sigma^2
    np.testing.assert_allclose(k_ref, 0.1558, atol=2e-4)  # the released code's deficit
    k_ref2 = jnp.diag(FourierBasis(5, 1.0, 0.15, reference_scaling=True).kernel(u, u))
    np.testing.assert_allclose(k_ref2, 0.6880, atol=2e-4)


def test_fourier_converges_to_wrapped_se_kernel():
    u1 = jnp.linspace(-3, 3, 11)
    u2 = jnp.linspace(0, 6, 9)
    exact = wrapped_se_kernel(u1, u2, sigma=0.7, kappa=0.1)
    approx = FourierBasis(12, 0.7, 0.1).kernel(u1[:, None], u2[:, None])
    np.testing.assert_allclose(approx, exact, atol=1e-10)
    # the exact wrapped kernel is the SE kernel of the chord-free angle difference for small kappa
    d = 0.3
    se = 0.49 * math.exp(-(d**2) / (2 * (0.1 * 2 * math.pi) ** 2))
    np.testing.assert_allclose(wrapped_se_kernel(jnp.array([d]), jnp.array([0.0]), sigma=0.7, kappa=0.1), se, rtol=1e-6)


def test_torus_is_product_of_circle_kernels():
    b1 = FourierBasis(4, 0.8, 0.15)
    b2 = FourierBasis(4, 0.8, 0.15, columns=(0, 1))
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    u = jax.random.uniform(key1, (5, 2), maxval=6.0)
    v = jax.random.uniform(key2, (6, 2), maxval=6.0)
    k1 = b1.kernel(u[:, :1], v[:, :1]) * b1.kernel(u[:, 1:], v[:, 1:])
    np.testing.assert_allclose(b2.kernel(u, v), k1, atol=1e-12)


def test_large_kappa_makes_functions_constant():
    basis = FourierBasis(5, 0.5, 1.0)
    w = jax.random.normal(jax.random.PRNGKey(2), (basis.num_features, 2, 2))
    a = evaluate(basis(jnp.linspace(0, 2 * math.pi, 50)[:, None]), w)
    assert float(jnp.max(a.max(0) - a.min(0))) < 1e-2


def test_kronecker_identity_eq5():
    # M(u) X == W^T (phi(u) kron X) with W reshaped phi-major (rows (l, j)).
    basis = FourierBasis(3, 1.0, 0.2)
    key = jax.random.PRNGKey(3)
    w = jax.random.normal(key, (basis.num_features, 4, 3))  # (L, D1, D2)
    phi = basis(jnp.array([[0.7]]))[0]
    x = jax.random.normal(jax.random.PRNGKey(4), (3,))
    m_u = evaluate(phi, w)
    w_mat = jnp.transpose(w, (0, 2, 1)).reshape(-1, 4)  # (L*D2, D1)
    np.testing.assert_allclose(m_u @ x, w_mat.T @ jnp.kron(phi, x), atol=1e-12)


def test_hsgp_matches_se_kernel_inside_box():
    basis = HSGPBasis(num_basis=40, sigma=1.3, lengthscale=0.8, ell=5.0)
    u = jnp.linspace(-2, 2, 9)[:, None]
    exact = 1.69 * jnp.exp(-((u - u.T) ** 2) / (2 * 0.8**2))
    np.testing.assert_allclose(basis.kernel(u, u), exact, atol=1e-3)
    assert basis(u).shape == (9, 40)
    b2 = HSGPBasis(num_basis=6, columns=(0, 1))
    assert b2(jnp.zeros((3, 2))).shape == (3, 36) and b2.num_features == 36


def test_linear_constant_product():
    u = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    lin = LinearBasis(columns=(1,), scale=2.0)
    np.testing.assert_allclose(lin(u), [[1.0, 4.0], [1.0, -2.0]])
    np.testing.assert_allclose(lin.kernel(u, u), 1.0 + 4.0 * u[:, 1:] @ u[:, 1:].T)
    np.testing.assert_allclose(ConstantBasis(3.0)(u), [[3.0], [3.0]])
    prod = ProductBasis((FourierBasis(3, columns=(0,)), LinearBasis(columns=(1,))))
    assert prod.num_features == 10
    k = prod.kernel(u, u)
    expected = FourierBasis(3).kernel(u[:, :1], u[:, :1]) * LinearBasis(columns=(1,)).kernel(u, u)
    np.testing.assert_allclose(k, expected, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_frequencies"):
        FourierBasis(0)
    with pytest.raises(ValueError, match="kappa"):
        FourierBasis(3, kappa=-1.0)
    with pytest.raises(ValueError, match="u: the basis reads condition columns"):
        FourierBasis(3, columns=(1,))(jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="columns"):
        LinearBasis(columns=())
