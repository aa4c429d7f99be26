"""Laplace parameter covariance with the path integrated out: the block-tridiagonal pieces and the Schur
complement against dense matrices, and the whole function against the dense joint Hessian of a tiny fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import potential_energy

from ppl_switch.infer import fit_svi
from ppl_switch.infer.joint_laplace import (
    block_tridiagonal_hessian,
    block_tridiagonal_solve,
    block_tridiagonal_whiten,
    laplace_parameter_posterior,
    schur_precision,
    unpack_parameter_vector,
)
from ppl_switch.models.gpslds import GPSLDS

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64


def _random_block_tridiagonal(rng, B, T, K):
    """(B, T K, T K) dense symmetric positive definite matrices, block tridiagonal in time."""
    out = np.zeros((B, T * K, T * K))
    for b in range(B):
        for t in range(T):
            a = rng.normal(size=(K, K))
            out[b, t * K:(t + 1) * K, t * K:(t + 1) * K] = a + a.T
            if t + 1 < T:
                O = rng.normal(size=(K, K))
                out[b, (t + 1) * K:(t + 2) * K, t * K:(t + 1) * K] = O
                out[b, t * K:(t + 1) * K, (t + 1) * K:(t + 2) * K] = O.T
        out[b] += (0.5 - np.linalg.eigvalsh(out[b]).min()) * np.eye(T * K)  # smallest eigenvalue 0.5
    return out


def test_block_hessian_and_whitening_equal_dense_matrices():
    rng = np.random.default_rng(0)
    B, T, K, m = 2, 7, 2, 3
    H = _random_block_tridiagonal(rng, B, T, K)

    def hvp(v):
        return jnp.einsum("bij,bj->bi", H, v.reshape(B, T * K)).reshape(B, T, K)

    diag, lower = block_tridiagonal_hessian(hvp, (B, T, K))
    for b in range(B):
        for t in range(T):
            np.testing.assert_allclose(diag[b, t], H[b, t * K:(t + 1) * K, t * K:(t + 1) * K], atol=1e-12)
            if t + 1 < T:
                np.testing.assert_allclose(lower[b, t], H[b, (t + 1) * K:(t + 2) * K, t * K:(t + 1) * K], atol=1e-12)
    R = rng.normal(size=(B, T, K, m))
    Y = block_tridiagonal_whiten(diag, lower, jnp.asarray(R))
    for b in range(B):
        Rb = R[b].reshape(T * K, m)
        np.testing.assert_allclose(np.asarray(Y[b]).reshape(T * K, m).T @ np.asarray(Y[b]).reshape(T * K, m),
                                   Rb.T @ np.linalg.solve(H[b], Rb), rtol=1e-9)
    X = block_tridiagonal_solve(diag, lower, jnp.asarray(R))
    for b in range(B):
        np.testing.assert_allclose(np.asarray(X[b]).reshape(T * K, m), np.linalg.solve(H[b], R[b].reshape(T * K, m)),
                                   rtol=1e-9, atol=1e-12)
    # not positive definite -> NaN, not a silent number
    bad = np.asarray(diag).copy()
    bad[1, 3] = -np.eye(K)
    assert not np.all(np.isfinite(block_tridiagonal_whiten(jnp.asarray(bad), lower, jnp.asarray(R))[1]))


def test_schur_precision_equals_the_dense_marginal_precision():
    """A quartic-in-u, banded-in-x energy: the Schur complement equals the inverse of the u-block of the
    dense Hessian's inverse."""
    rng = np.random.default_rng(1)
    B, T, K, m = 2, 6, 2, 3
    def energy(x, u):  # neighbouring steps coupled, nonlinear in both, every u coupled to every step
        chain = jnp.sum((x[:, 1:] - 0.8 * x[:, :-1] - 0.1 * jnp.tanh(x[:, :-1] * u[2])) ** 2)
        level = 0.5 * jnp.sum((x - u[:K]) ** 2)
        return chain + level + 0.3 * jnp.sum(x**2) + jnp.sum(u**2) + 0.1 * jnp.sum(u**4)

    x_hat = jnp.asarray(rng.normal(size=(B, T, K)) * 0.5)
    u_hat = jnp.asarray(rng.normal(size=m) * 0.5)
    h_uu, correction, grad_u = schur_precision(energy, x_hat, u_hat, chunk=2)
    n = B * T * K

    def flat_energy(z):
        return energy(z[:n].reshape(B, T, K), z[n:])

    H = np.asarray(jax.hessian(flat_energy)(jnp.concatenate([x_hat.ravel(), u_hat])))
    dense = np.linalg.inv(np.linalg.inv(H)[n:, n:])
    np.testing.assert_allclose(h_uu - correction, dense, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(h_uu, H[n:, n:], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_u, jax.grad(energy, argnums=1)(x_hat, u_hat), rtol=1e-10)


#: every site but the drift weights held (see the test below)
HOLD = ("emission_matrix", "emission_bias", "slope_scales", "offset_scale", "partition_weights", "temperature",
        "fixed_points")


@pytest.fixture(scope="module")
def tiny_fit():
    model = GPSLDS(num_states=2, latent_dim=2, obs_dim=4, dt=0.05)
    data, _ = model.simulate(jax.random.PRNGKey(3), 2, 40)
    guide = model.default_guide(data, latent_scale=1.0)
    fit = fit_svi(model, data, guide=guide, num_steps=300, learning_rate=0.02, num_draws=4, progress_bar=False)
    return model, data, guide, fit


def test_laplace_posterior_equals_the_dense_joint_hessian(tiny_fit):
    """The covariance is the (x, u) -> u block of the inverse of the dense Hessian of numpyro's potential
    energy over (x, the free unconstrained parameters), the held sites at the guide's means. On 2 x 40 steps
    of 4 neurons only the drift weights are resolved well enough for a positive definite joint Hessian."""
    model, data, guide, fit = tiny_fit
    with pytest.raises(FloatingPointError, match="not positive definite"):  # ridges (W / tau, c / e) left free
        laplace_parameter_posterior(model, data, guide, fit.params)
    lap = laplace_parameter_posterior(model, data, guide, fit.params, hold=HOLD)
    assert set(lap.held) == set(HOLD) and set(lap.sites) == {"regime_matrix", "regime_offset"}
    pg = guide.parameter_guide
    unpacked = pg.unpack_latent(fit.params["auto_loc"])  # the guide's own layout (numpyro's: tests/test_mean_field_guide.py)
    x_hat = np.asarray(fit.params["x_mean"])
    values = {k: jnp.asarray(v[0, 0]) for k, v in fit.samples.items()}
    model_trace = handlers.trace(handlers.substitute(handlers.seed(model.program, 0), data=values)).get_trace(data)
    ours = unpack_parameter_vector(pg, fit.params, data, fit.params["auto_loc"], model_trace)
    assert list(ours) == list(unpacked)
    for name in unpacked:
        np.testing.assert_array_equal(ours[name], unpacked[name], err_msg=name)
    held_u = {k: unpacked[k] for k in lap.held}
    n = x_hat.size

    def flat_energy(z):
        u, i = {}, n
        for name, shape in lap.sites.items():
            k = int(np.prod(shape))
            u[name] = z[i:i + k].reshape(shape)
            i += k
        return potential_energy(model.program, (data,), {}, {**held_u, **u, "x": z[:n].reshape(x_hat.shape)})

    z = jnp.concatenate([jnp.asarray(x_hat).ravel(), jnp.asarray(lap.loc)])
    H = np.asarray(jax.hessian(flat_energy)(z))
    np.testing.assert_allclose(lap.cov, np.linalg.inv(H)[n:, n:], rtol=1e-6, atol=1e-9)
    L = np.asarray(pg.get_posterior(fit.params).scale_tril)
    order = [k for k in unpacked]
    sizes = {k: int(np.size(unpacked[k])) for k in order}
    starts = np.cumsum([0] + [sizes[k] for k in order])
    free = np.concatenate([np.arange(starts[i], starts[i + 1]) for i, k in enumerate(order) if k in lap.sites])
    # the guide's answer to the same question: its covariance of the free sites given the held ones
    np.testing.assert_allclose(np.linalg.inv(lap.mean_field_cov), np.linalg.inv(L @ L.T)[np.ix_(free, free)], rtol=1e-8)
    ratio = lap.sd_ratio()
    assert set(ratio) == set(lap.sites) and all(np.all(np.isfinite(r)) for r in ratio.values())
    # draws: held sites fixed, free sites from N(loc, cov) mapped to their supports
    n_draws = 20000
    draws = lap.sample(jax.random.PRNGKey(0), n_draws)
    np.testing.assert_array_equal(draws["emission_bias"][0], draws["emission_bias"][-1])
    np.testing.assert_array_equal(draws["temperature"][0], draws["temperature"][-1])
    rm = draws["regime_matrix"].reshape(n_draws, -1)
    i = list(lap.sites).index("regime_matrix")
    start = sum(int(np.prod(s)) for s in list(lap.sites.values())[:i])
    block = lap.cov[start:start + rm.shape[1], start:start + rm.shape[1]]
    sd = np.sqrt(np.diag(block))
    standard_error = np.outer(sd, sd) * np.sqrt(2.0 / n_draws)  # of a sample covariance entry, at most
    np.testing.assert_array_less(np.abs(np.cov(rm.T) - block), 5 * standard_error)


def test_laplace_posterior_rejects_bad_arguments(tiny_fit):
    model, data, guide, fit = tiny_fit
    with pytest.raises(ValueError, match="hold: unknown parameter sites"):
        laplace_parameter_posterior(model, data, guide, fit.params, hold=("emission_matrix", "nope"))
    with pytest.raises(TypeError, match="guide: expected a LatentSDEGuide"):
        laplace_parameter_posterior(model, data, guide.parameter_guide, fit.params)
