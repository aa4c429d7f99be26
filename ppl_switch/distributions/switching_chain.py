"""The switching linear chain: the latent path of an SLDS with its discrete regimes summed out.

:class:`SwitchingLinearChain` is the density p(x_{1:T} | theta) of the continuous path x (trials, T, D) of a
switching linear dynamical system -- z_t ~ Markov(pi0, P), x_t = A_{z_t} x_{t-1} + b_{t,z_t} + noise Q_{z_t} --
with z summed out by the HMM forward algorithm (:mod:`ppl_switch.ops.hmm`), and its ancestral sampler. The
rest are the same path in other coordinates, for NUTS (same model, same posterior):

- :class:`WhitenedSwitchingChain`: the path's innovations under the regime-averaged dynamics;
- :class:`AnchoredSwitchingChain`: the path measured from an anchor a (unit Jacobian);
- :class:`PathWithRelativeParameters`: one block site (path coordinates, eta, zeta) with the dynamics noise
  scales and the initial mean measured relative to the path (:func:`path_noise_scales`), laid out by
  :func:`split_relative_site` / :func:`join_relative_site`.

The model that builds them from its parameters is :class:`ppl_switch.models.slds.SLDS`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints

from ppl_switch.ops import switching as sw
from ppl_switch.ops.hmm import hmm_filter

_LOG_2PI = math.log(2.0 * math.pi)


class SwitchingLinearChain(dist.Distribution):
    """p(x_{1:T}) of an SLDS's continuous path with z summed out (forward algorithm).

    Batch shape (trials,), event shape (T, D).

    Args:
        initial_probs: (K,). transition_matrix: (K, K).
        initial_mean: (D,). initial_scale_tril: (D, D).
        dynamics_matrices: (K, D, D). dynamics_scale_trils: (K, D, D).
        dynamics_biases: (B, T-1, K, D) per trial (inputs folded in); row t is the move x_t -> x_{t+1}.
        time_mask: (B, T) bool, True inside each trial (padding gets N(0, I), no regime).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, initial_probs, transition_matrix, initial_mean, initial_scale_tril, dynamics_matrices,
                 dynamics_scale_trils, dynamics_biases, time_mask, *, validate_args=None):
        self.initial_probs = initial_probs
        self.transition_matrix = transition_matrix
        self.initial_mean = initial_mean
        self.initial_scale_tril = initial_scale_tril
        self.dynamics_matrices = dynamics_matrices
        self.dynamics_scale_trils = dynamics_scale_trils
        self.dynamics_biases = dynamics_biases
        self.time_mask = time_mask
        B, T = jnp.shape(time_mask)
        D = jnp.shape(initial_mean)[-1]
        super().__init__(batch_shape=(B,), event_shape=(T, D), validate_args=validate_args)

    def regime_log_likelihoods(self, x):
        """(B, T, K) log p(x_t | x_{t-1}, z_t = k); row 0 (x_1 does not depend on z_1) and padding are 0."""

        def one(x_b, b_b, tm_b):
            ll = sw.transition_log_likelihoods(x_b, self.dynamics_matrices, b_b, self.dynamics_scale_trils)
            ll = jnp.concatenate([jnp.zeros_like(ll[:1]), ll]) if ll.shape[0] else jnp.zeros((1, self.initial_probs.shape[0]), x_b.dtype)
            return jnp.where(tm_b[:, None], ll, 0.0)

        return jax.vmap(one)(x, self.dynamics_biases, self.time_mask)

    def chain_log_normalizers(self, x, regime_log_likelihoods):
        """(B,) log of the sum over regime paths of p(z) prod_t p(x_t | x_{t-1}, z_t) per trial (forward
        algorithm); ``regime_log_likelihoods`` (B, T, K). A subclass with other transitions overrides this."""
        return jax.vmap(lambda l, m: hmm_filter(self.initial_probs, self.transition_matrix, l, m).log_normalizer)(
            regime_log_likelihoods, self.time_mask)

    def log_prob(self, x):
        """(B,) log p(x_n) of each trial's path."""
        ll = self.regime_log_likelihoods(x)
        init = dist.MultivariateNormal(self.initial_mean, scale_tril=self.initial_scale_tril).log_prob(x[:, 0])
        chain = self.chain_log_normalizers(x, ll)
        pad = jnp.sum(jnp.where(self.time_mask[..., None], 0.0, -0.5 * x**2 - 0.5 * _LOG_2PI), (-2, -1))
        return init + chain + pad

    def ancestral_step_inputs(self, z_keys, eps):
        """The per-step inputs of :meth:`ancestral_step`, leading axis T-1: a key per step, the dynamics noise
        (T-1, B, D) and the biases (T-1, B, K, D). A subclass may add its own."""
        return z_keys, eps, jnp.swapaxes(self.dynamics_biases, 0, 1)

    def ancestral_step(self, carry, inp):
        """One step of the ancestral draw: (z (B,), x (B, D)) and this step's inputs -> the next (z, x)."""
        z, x = carry
        key_t, e, b_t = inp  # b_t (B, K, D)
        z_next = jax.random.categorical(key_t, jnp.log(self.transition_matrix)[z])
        return z_next, self.regime_move(z_next, x, b_t, e)

    def regime_move(self, z_next, x, b_t, e):
        """x_{t+1} = A_z x_t + b_z + L_z e for the regimes z_next (B,) entered; x (B, D), b_t (B, K, D), e (B, D)."""
        A = self.dynamics_matrices[z_next]
        L = self.dynamics_scale_trils[z_next]
        return jnp.einsum("bij,bj->bi", A, x) + jnp.take_along_axis(b_t, z_next[:, None, None], 1)[:, 0] + jnp.einsum("bij,bj->bi", L, e)

    def sample_with_states(self, key):
        """Ancestral draw: (z (B, T) int32, -1 past the end; x (B, T, D))."""
        B, T = self.batch_shape[0], self.event_shape[0]
        D = self.event_shape[1]
        k_z0, k_z, k_x0, k_x, k_pad = jax.random.split(key, 5)
        dtype = jnp.result_type(self.initial_mean, float)
        z0 = jax.random.categorical(k_z0, jnp.log(self.initial_probs), shape=(B,))
        x0 = self.initial_mean + jax.random.normal(k_x0, (B, D), dtype) @ self.initial_scale_tril.T

        def step(carry, inp):
            new = self.ancestral_step(carry, inp)
            return new, new

        if T > 1:
            eps = jax.random.normal(k_x, (T - 1, B, D), dtype)
            _, (zs, xs) = jax.lax.scan(step, (z0, x0), self.ancestral_step_inputs(jax.random.split(k_z, T - 1), eps))
            z = jnp.concatenate([z0[:, None], zs.T], 1)
            x = jnp.concatenate([x0[:, None], jnp.swapaxes(xs, 0, 1)], 1)
        else:
            z, x = z0[:, None], x0[:, None]
        tm = self.time_mask
        x = jnp.where(tm[..., None], x, jax.random.normal(k_pad, x.shape, dtype))
        z = jnp.where(tm, z, -1).astype(jnp.int32)
        return z, x

    def sample(self, key, sample_shape=()):
        if not sample_shape:
            return self.sample_with_states(key)[1]
        n = int(np.prod(sample_shape))
        xs = jax.vmap(lambda k: self.sample_with_states(k)[1])(jax.random.split(key, n))
        return xs.reshape(tuple(sample_shape) + self.batch_shape + self.event_shape)


class _PathCoordinates(dist.Distribution):
    """The path of a :class:`SwitchingLinearChain` in other coordinates v, x = to_path(v) invertible.

    log p(v) = log p_x(to_path(v)) + log|det dx/dv|, so the model (and its posterior) is unchanged; only the
    coordinates NUTS moves in differ. Subclasses give ``to_path``, ``to_site`` (its inverse) and
    ``log_abs_det_jacobian``. Batch shape (trials,), event shape (T, D).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, chain: SwitchingLinearChain, *, validate_args=None):
        self.chain = chain
        super().__init__(batch_shape=chain.batch_shape, event_shape=chain.event_shape, validate_args=validate_args)

    def log_prob(self, v):
        return self.chain.log_prob(self.to_path(v)) + self.log_abs_det_jacobian()

    def sample(self, key, sample_shape=()):
        x = self.chain.sample(key, sample_shape)
        if not sample_shape:
            return self.to_site(x)
        flat = x.reshape((-1,) + self.batch_shape + self.event_shape)
        return jax.vmap(self.to_site)(flat).reshape(x.shape)


class WhitenedSwitchingChain(_PathCoordinates):
    """The same path as :class:`SwitchingLinearChain`, in whitened (non-centred) coordinates e.

    The path is an invertible affine map of e under the regime-averaged ("reference") dynamics
    A = mean_k A_k, b_t = mean_k b_{t,k}, L = mean_k L_k (L_k the Cholesky factors of Q_k)::

        x_1 = m0 + L0 e_1,    x_t = A x_{t-1} + b_{t-1} + L e_t    (inside a trial; x_t = e_t past its end)

    In these coordinates the two troublesome directions of the centred path leave x: scaling the dynamics
    noise (the funnel between Q_k and the increments of x) and shifting the whole path by a constant (with
    m0, b_k, d compensating, a direction the likelihood cannot see) move only parameters, not the T*D
    coordinates of the path. The price: a change of any Q_k, A_k or b_k moves the whole path.
    """

    def __init__(self, chain: SwitchingLinearChain, *, validate_args=None):
        self.reference_matrix = jnp.mean(chain.dynamics_matrices, 0)  # (D, D)
        self.reference_scale_tril = jnp.mean(chain.dynamics_scale_trils, 0)  # (D, D), positive diagonal
        self.reference_biases = jnp.mean(chain.dynamics_biases, -2)  # (B, T-1, D)
        super().__init__(chain, validate_args=validate_args)

    def to_path(self, e):
        """(B, T, D) innovations -> (B, T, D) path x (sequential, O(T D^2))."""
        A, L = self.reference_matrix, self.reference_scale_tril
        x1 = self.chain.initial_mean + e[:, 0] @ self.chain.initial_scale_tril.T

        def step(x_prev, inp):
            e_t, b_t, inside = inp  # (B, D), (B, D), (B,)
            x_t = jnp.where(inside[:, None], x_prev @ A.T + b_t + e_t @ L.T, e_t)
            return x_t, x_t

        if e.shape[1] == 1:
            return x1[:, None]
        inputs = (jnp.swapaxes(e[:, 1:], 0, 1), jnp.swapaxes(self.reference_biases, 0, 1), self.chain.time_mask[:, 1:].T)
        _, rest = jax.lax.scan(step, x1, inputs)
        return jnp.concatenate([x1[:, None], jnp.swapaxes(rest, 0, 1)], 1)

    def to_site(self, x):
        """(B, T, D) path -> (B, T, D) innovations (the inverse of :meth:`to_path`, vectorised)."""
        A, L = self.reference_matrix, self.reference_scale_tril
        e1 = _solve_lower(self.chain.initial_scale_tril, x[:, 0] - self.chain.initial_mean)
        resid = x[:, 1:] - x[:, :-1] @ A.T - self.reference_biases
        rest = jnp.where(self.chain.time_mask[:, 1:, None], _solve_lower(L, resid), x[:, 1:])
        return jnp.concatenate([e1[:, None], rest], 1)

    def log_abs_det_jacobian(self):
        """(B,) log|det dx/de|: log|L0| + (length - 1) log|L| per trial."""
        log_L0 = jnp.sum(jnp.log(jnp.diagonal(self.chain.initial_scale_tril)))
        log_L = jnp.sum(jnp.log(jnp.diagonal(self.reference_scale_tril)))
        steps = jnp.sum(self.chain.time_mask[:, 1:], -1)
        return log_L0 + steps * log_L


class AnchoredSwitchingChain(_PathCoordinates):
    """The path measured from an anchor a: x_t = a + v_t inside a trial (x_t = v_t past its end).

    :class:`SLDS` with ``path_parameterisation="anchored"`` uses a = -C^+ d (:meth:`SLDS.path_anchor`) and
    measures m0 and b_k from it as well (m0 = m~0 + a, b_k = b~_k + (I - A_k) a), so that the dynamics
    residuals, x_1 - m0 and (on the column space of C) the emission means C x_t + d do not depend on d:
    the translation x -> x + c, m0 -> m0 + c, b_k -> b_k + (I - A_k) c, d -> d - C c, which the likelihood
    cannot see, becomes a move of d alone (bounded by the priors of m0, b_k and d) instead of a ridge
    through all T*D path coordinates, and v is pinned by the data. The path stays centred otherwise (a
    change of Q_k, A_k or b~_k does not move it). Unit Jacobian.

    Args:
        chain: the path distribution in centred coordinates.
        anchor: (D,) the anchor a.
    """

    def __init__(self, chain: SwitchingLinearChain, anchor, *, validate_args=None):
        self.anchor = anchor
        super().__init__(chain, validate_args=validate_args)

    def _shift(self):
        return jnp.where(self.chain.time_mask[..., None], self.anchor, 0.0)  # (B, T, D)

    def to_path(self, v):
        return v + self._shift()

    def to_site(self, x):
        return x - self._shift()

    def log_abs_det_jacobian(self):
        return jnp.zeros(self.batch_shape)


class PathWithRelativeParameters(dist.Distribution):
    """One block site u = (path coordinates v, log-ratios eta, zeta) in which the parameters that the path
    pins are measured relative to it: the dynamics noise scales s_kd = s^_kd(x) exp(eta_kd) and the initial
    mean m0 = xbar_1 - s0 * zeta / sqrt(B), with x = to_path(v) and xbar_1 the mean first point of the B
    trials.

    s^_kd(x) is the path's own estimate of regime k's noise scale (:func:`path_noise_scales`; it depends on
    x, A_k and b_k, not on s). Moving the path with eta fixed carries the scales along with its roughness,
    and moving it with zeta fixed carries m0 along with x_1: the funnels between Q_k and the T*D path
    coordinates, and between the initial scales s0 and m0 - x_1, become, to first order, independent
    directions. The map (v, eta, zeta) -> (x, s, m0) is triangular, log|det| = sum log s_kd +
    sum_d log(s0_d / sqrt(B)) + log|det dx/dv|, so

        log p(u) = log p(x | s, m0) + log p_prior(s) + log p_prior(m0) + log|det|.

    Generative sampling draws s and m0 from their priors and x given them, then returns u. Event shape
    (B*T*D + K*D + D,) flattened (path, eta, zeta); no batch shape.

    Args:
        make_chain: (s (K, D), m0 (D,)) -> :class:`SwitchingLinearChain` (the other parameters fixed).
        coordinates: chain -> the path's coordinates (:class:`AnchoredSwitchingChain`) or None (centred).
        scale_prior: the prior of one s_kd. initial_mean_prior: the prior of m0, event shape (D,).
        initial_scales: (D,) s0. path_shape: (B, T, D). num_states: K.
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, make_chain, coordinates, scale_prior, initial_mean_prior, initial_scales, path_shape, num_states,
                 *, validate_args=None):
        self.make_chain = make_chain
        self.scale_prior = scale_prior
        self.initial_mean_prior = initial_mean_prior
        self.path_shape = tuple(path_shape)
        D = self.path_shape[-1]
        self.scale_shape = (num_states, D)
        self.path_size = int(np.prod(self.path_shape))
        self.scale_size = int(np.prod(self.scale_shape))
        # s0 / sqrt(B): the spread of the trials' mean first point about m0
        self.initial_spread = jnp.asarray(initial_scales) / math.sqrt(self.path_shape[0])
        # a chain with s = 1 and m0 = 0, for what depends on neither (anchor, residuals, mask), and the path
        # coordinates, which do not depend on them either
        self._reference_chain = make_chain(jnp.ones(self.scale_shape), jnp.zeros(D))
        self._coords = coordinates(self._reference_chain)
        super().__init__(batch_shape=(), event_shape=(self.path_size + self.scale_size + D,), validate_args=validate_args)

    def _to_path(self, v):
        return v if self._coords is None else self._coords.to_path(v)

    def _to_site(self, x):
        return x if self._coords is None else self._coords.to_site(x)

    def path_scales_and_initial_mean(self, u):
        """(B, T, D) path x, (K, D) scales s and (D,) initial mean m0 of a site value u."""
        v, eta, zeta = split_relative_site(u, *self.scale_shape)
        x = self._to_path(v.reshape(self.path_shape))
        s = path_noise_scales(self._reference_chain, x) * jnp.exp(eta)
        return x, s, jnp.mean(x[:, 0], 0) - self.initial_spread * zeta

    def site_value(self, x, s, m0):
        """The site value u of a path x (B, T, D), scales s (K, D) and initial mean m0 (D,)."""
        eta = jnp.log(s) - jnp.log(path_noise_scales(self._reference_chain, x))
        zeta = (jnp.mean(x[:, 0], 0) - m0) / self.initial_spread
        return join_relative_site(self._to_site(x), eta, zeta)

    def log_prob(self, u):
        x, s, m0 = self.path_scales_and_initial_mean(u)
        log_det = jnp.sum(jnp.log(s)) + jnp.sum(jnp.log(self.initial_spread))
        if self._coords is not None:
            log_det = log_det + jnp.sum(self._coords.log_abs_det_jacobian())
        return (jnp.sum(self.make_chain(s, m0).log_prob(x)) + jnp.sum(self.scale_prior.log_prob(s))
                + self.initial_mean_prior.log_prob(m0) + log_det)

    def sample(self, key, sample_shape=()):
        def one(k):
            k_s, k_m, k_x = jax.random.split(k, 3)
            s = self.scale_prior.sample(k_s, self.scale_shape)
            m0 = self.initial_mean_prior.sample(k_m)
            return self.site_value(self.make_chain(s, m0).sample(k_x), s, m0)

        if not sample_shape:
            return one(key)
        n = int(np.prod(sample_shape))
        return jax.vmap(one)(jax.random.split(key, n)).reshape(tuple(sample_shape) + self.event_shape)


def split_relative_site(u, num_states: int, latent_dim: int):
    """The layout of a :class:`PathWithRelativeParameters` site value, in one place: the flat u (n,) is
    (path coordinates, eta (K*D,), zeta (D,)); returns (path coordinates (n - K*D - D,), eta (K, D), zeta (D,))."""
    tail = num_states * latent_dim + latent_dim
    return u[:-tail], u[-tail:-latent_dim].reshape(num_states, latent_dim), u[-latent_dim:]


def join_relative_site(path_coordinates, eta, zeta):
    """Inverse of :func:`split_relative_site`: the flat site value from its three parts (any shapes)."""
    return jnp.concatenate([jnp.reshape(path_coordinates, -1), jnp.reshape(eta, -1), jnp.reshape(zeta, -1)])


def path_noise_scales(chain: SwitchingLinearChain, x, prior_steps: float = 1.0, prior_scale: float = 0.5):
    """(K, D) the path's own estimate of each regime's dynamics noise scale, independent of Q_k.

    The residuals r_tk = x_t - A_k x_{t-1} - b_tk of every step inside a trial are given to the regimes by
    soft weights w_tk = softmax_k(-|r_tk|^2 / (2 g^2)), g^2 the mean squared residual over steps, regimes and
    dimensions (a scale that does not involve Q_k); s^_kd^2 = (sum_t w_tk r_tkd^2 + n0 c^2) / (sum_t w_tk + n0)
    with n0 = ``prior_steps`` pseudo-steps at scale c = ``prior_scale`` (keeps an unused regime finite)."""
    A, mask = chain.dynamics_matrices, chain.time_mask[:, 1:]  # (K, D, D), (B, T-1)
    resid = jax.vmap(sw.transition_residuals, (0, None, 0))(x, A, chain.dynamics_biases)  # (B, T-1, K, D)
    sq = jnp.sum(resid**2, -1)  # (B, T-1, K)
    valid = mask[..., None]
    g2 = jnp.sum(jnp.where(valid, sq, 0.0)) / jnp.maximum(jnp.sum(valid) * A.shape[0] * A.shape[-1], 1.0)
    w = jnp.where(valid, jax.nn.softmax(-sq / (2.0 * g2), -1), 0.0)  # (B, T-1, K)
    num = jnp.einsum("btk,btkd->kd", w, resid**2) + prior_steps * prior_scale**2
    return jnp.sqrt(num / (jnp.sum(w, (0, 1))[:, None] + prior_steps))


def _solve_lower(L, v):
    """L^{-1} v for a lower-triangular (D, D) L and v (..., D)."""
    flat = v.reshape(-1, v.shape[-1])
    return solve_triangular(L, flat.T, lower=True).T.reshape(v.shape)


__all__ = ["SwitchingLinearChain", "WhitenedSwitchingChain", "AnchoredSwitchingChain", "PathWithRelativeParameters",
           "split_relative_site", "join_relative_site", "path_noise_scales"]
