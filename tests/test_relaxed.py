"""Tests of the Concrete / Gumbel-softmax distributions against closed forms and quadrature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln, softmax

from ppl_switch.distributions.relaxed import (
    ExpRelaxedOneHotCategorical,
    RelaxedOneHotCategorical,
    straight_through,
)

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def concrete_density_oracle(z, logits, tau):
    """Maddison et al. (2016) eq. for the Concrete density, written with products (float64 NumPy)."""
    k = len(z)
    alpha = np.exp(logits)
    num = np.exp(gammaln(k)) * tau ** (k - 1) * np.prod(alpha * z ** (-tau - 1))
    return num / np.sum(alpha * z ** (-tau)) ** k


@pytest.mark.parametrize("num_states", [2, 3, 4, 6])
def test_log_prob_matches_closed_form(num_states):
    rng = np.random.default_rng(num_states)
    for _ in range(5):
        logits = rng.normal(size=num_states)
        tau = rng.uniform(0.3, 2.0)
        z = rng.dirichlet(np.ones(num_states))
        got = RelaxedOneHotCategorical(tau, logits=jnp.array(logits)).log_prob(jnp.array(z))
        np.testing.assert_allclose(got, np.log(concrete_density_oracle(z, logits, tau)), rtol=1e-10)


def test_shift_invariance_and_probs_parameterisation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4))
    z = rng.dirichlet(np.ones(4), size=7)
    base = RelaxedOneHotCategorical(0.8, logits=logits).log_prob(z)
    shifted = RelaxedOneHotCategorical(0.8, logits=logits + rng.normal(size=(7, 1)) * 5).log_prob(z)
    from_probs = RelaxedOneHotCategorical(0.8, probs=softmax(logits, axis=-1)).log_prob(z)
    np.testing.assert_allclose(shifted, base, rtol=1e-10)
    np.testing.assert_allclose(from_probs, base, rtol=1e-10)


@pytest.mark.parametrize("tau", [0.5, 0.99, 2.0])
def test_density_integrates_to_one_k2(tau):
    # z = (sigmoid(s), 1 - sigmoid(s)); dz1/ds = z1 z2
    s = np.linspace(-60, 60, 200_001)
    z1 = jax.nn.sigmoid(s)
    z = jnp.stack([z1, 1 - z1], -1)
    dist = RelaxedOneHotCategorical(tau, logits=jnp.array([0.7, -0.4]))
    integrand = jnp.exp(dist.log_prob(z) + jnp.log(z1) + jnp.log1p(-z1))
    assert abs(float(jnp.trapezoid(integrand, s)) - 1.0) < 1e-4


@pytest.mark.parametrize("tau", [0.7, 1.5])
def test_density_integrates_to_one_k3(tau):
    # z = softmax(s1, s2, 0); the Jacobian of (s1, s2) -> (z1, z2) is z1 z2 z3
    s = np.linspace(-40, 40, 1201)
    s1, s2 = np.meshgrid(s, s, indexing="ij")
    scores = np.stack([s1, s2, np.zeros_like(s1)], -1)
    log_z = jax.nn.log_softmax(scores, axis=-1)
    dist = RelaxedOneHotCategorical(tau, logits=jnp.array([0.5, -1.0, 0.3]))
    integrand = jnp.exp(dist.log_prob(jnp.exp(log_z)) + log_z.sum(-1))
    total = jnp.trapezoid(jnp.trapezoid(integrand, s, axis=1), s)
    assert abs(float(total) - 1.0) < 1e-3


def test_gumbel_max_frequencies_at_low_temperature():
    logits = jnp.array([1.0, 0.0, -0.5, 0.3])
    n = 100_000
    z = RelaxedOneHotCategorical(0.01, logits=logits).sample(jax.random.PRNGKey(0), (n,))
    assert float(jnp.mean(jnp.max(z, -1))) > 0.99  # nearly one-hot
    freq = np.bincount(np.asarray(jnp.argmax(z, -1)), minlength=4) / n
    p = softmax(np.asarray(logits))
    np.testing.assert_array_less(np.abs(freq - p), 3 * np.sqrt(p * (1 - p) / n))


def test_samples_on_simplex_and_log_space_twin_consistent():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 0.0, 30.0]])
    key = jax.random.PRNGKey(1)
    log_z = ExpRelaxedOneHotCategorical(0.6, logits=logits).sample(key, (5,))
    z = RelaxedOneHotCategorical(0.6, logits=logits).sample(key, (5,))
    np.testing.assert_allclose(jnp.exp(log_z), z, rtol=1e-10)
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(log_z, -1), 0.0, atol=1e-12)
    # exp pushes the ExpConcrete density onto the Concrete density (Jacobian sum_k y_k)
    lp_y = ExpRelaxedOneHotCategorical(0.6, logits=logits).log_prob(log_z)
    lp_z = RelaxedOneHotCategorical(0.6, logits=logits).log_prob(z)
    np.testing.assert_allclose(lp_y - log_z.sum(-1), lp_z, rtol=1e-8)


def test_gradients_finite_near_boundary():
    z = jnp.array([1 - 2e-300, 1e-300, 1e-300])
    logits = jnp.array([50.0, -50.0, 0.0])
    g_z, g_l = jax.grad(lambda z, l: RelaxedOneHotCategorical(0.5, logits=l).log_prob(z), argnums=(0, 1))(z, logits)
    assert np.all(np.isfinite(g_z)) and np.all(np.isfinite(g_l))

    # reparameterised gradient in float32 with extreme logits and low temperature
    def loss(logits32):
        d = RelaxedOneHotCategorical(jnp.float32(0.05), logits=logits32)
        z = d.rsample(jax.random.PRNGKey(3), (64,))
        return jnp.mean(d.log_prob(z) + z[..., 0])

    grad = jax.grad(loss)(jnp.array([40.0, -40.0, 0.0], dtype=jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_reparameterised_gradient_matches_finite_difference():
    def objective(logits):
        z = RelaxedOneHotCategorical(0.7, logits=logits).rsample(jax.random.PRNGKey(5), (200,))
        return jnp.mean(z @ jnp.array([1.0, -2.0, 0.5]))

    logits = jnp.array([0.2, -0.3, 0.1])
    grad = jax.grad(objective)(logits)
    eps = 1e-6
    fd = [(objective(logits.at[i].add(eps)) - objective(logits.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-5)


def test_straight_through_forward_hard_backward_soft():
    logits = jnp.array([0.3, 1.2, -0.4])
    key = jax.random.PRNGKey(2)
    soft = RelaxedOneHotCategorical(0.9, logits=logits).sample(key)
    hard = RelaxedOneHotCategorical(0.9, logits=logits, straight_through=True).sample(key)
    np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(soft), 3))
    w = jnp.array([1.0, 2.0, 3.0])
    g_hard = jax.grad(lambda l: RelaxedOneHotCategorical(0.9, logits=l, straight_through=True).sample(key) @ w)(logits)
    g_soft = jax.grad(lambda l: RelaxedOneHotCategorical(0.9, logits=l).sample(key) @ w)(logits)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-12)
    np.testing.assert_allclose(straight_through(soft), hard)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="exactly one of logits= or probs="):
        RelaxedOneHotCategorical(1.0, logits=jnp.zeros(3), probs=jnp.ones(3) / 3)
    with pytest.raises(ValueError, match="temperature"):
        RelaxedOneHotCategorical(0.0, logits=jnp.zeros(3))
    with pytest.raises(ValueError, match="logits"):
        RelaxedOneHotCategorical(1.0, logits=1.0)


def test_batch_shapes_and_numpyro_site():
    import numpyro
    from numpyro.infer.util import log_density

    d = RelaxedOneHotCategorical(jnp.array([0.5, 1.0]), logits=jnp.zeros((3, 1, 4)))
    assert d.batch_shape == (3, 2) and d.event_shape == (4,)
    assert d.sample(jax.random.PRNGKey(0), (5,)).shape == (5, 3, 2, 4)

    def model():
        numpyro.sample("z", RelaxedOneHotCategorical(0.8, logits=jnp.array([0.1, 0.2, 0.3])))

    z = jnp.array([0.2, 0.5, 0.3])
    lp, _ = log_density(model, (), {}, {"z": z})
    np.testing.assert_allclose(lp, np.log(concrete_density_oracle(np.asarray(z), np.array([0.1, 0.2, 0.3]), 0.8)))
