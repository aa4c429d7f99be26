"""Drift posterior of the gpSLDS with the latent path sampled, not fixed: Metropolis-within-Gibbs.

The SVI guide factorises q(x) q(theta), and the joint Laplace approximation (``infer.joint_laplace``) is a
Gaussian at the fitted means: both inherit the errors-in-variables bias of a drift fitted to a smoothed path
(benchmarks/results.md, gpSLDS history, "Calibration"). This sampler targets p(x, theta | y) itself, with the readout held at its fitted
value (it fixes the latent frame), by alternating three blocks:

1. **path** x | theta, per trial: an independence Metropolis–Hastings step whose proposal is the Laplace
   approximation N(x*, H^{-1}) of p(x | theta, y) at its mode x* (Newton's method; H = the Hessian of
   -log p(x, y | theta) in x, block tridiagonal in time, so the solve and the draw are O(T K^3) per trial).
   The accept step makes it exact: a poor proposal lowers the acceptance rate, never the target.
2. **partition and prior scales** (W, tau, c, M, sigma0) | x, with the weights A, e integrated out in closed
   form (``ops.conjugate_drift.collapsed_log_marginal``): random-walk Metropolis in numpyro's unconstrained
   coordinates, with proposal covariance the inverse Hessian of that collapsed target (adapted in burn-in).
3. **weights** A, e | x, partition: their exact Gaussian conditional (conjugate), drawn directly.

Blocks 2 + 3 draw (partition, weights) | x jointly, so the chain moves as fast as the path lets it. Each sweep
costs a few Newton steps on the path (4 K Hessian-vector products and one block-tridiagonal solve each) and a
few collapsed evaluations (sums over steps).

Read the draws in the frame of the chain's own paths (``PathGibbsDraws.path_mean``): with the readout held, the
sampled paths are larger than a variational guide's shrunk mean path, so the guide's alignment would stretch
them. Measured on the two-rotation benchmark in benchmarks/results.md (gpSLDS history, "Sampling the path").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import biject_to

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.infer.joint_laplace import (split_flat, unconstrained_fit, block_tridiagonal_hessian,
                                            block_tridiagonal_solve)
from ppl_switch.infer.path_refinement import path_negative_log_joint
from ppl_switch.ops.conjugate_drift import collapsed_log_marginal, weight_posterior
from ppl_switch.ops.switching import gaussian_chain_sample

__all__ = ["PathGibbsDraws", "sample_path_gibbs", "guide_means"]

#: the drift weights, drawn from their conjugate conditional (block 3)
WEIGHT_SITES = ("regime_matrix", "regime_offset")


@dataclass
class PathGibbsDraws:
    """Draws of p(x, theta | y) with the readout held.

    Attributes:
        samples: {site: (num_draws, ...)} constrained parameter draws (held sites repeated).
        path_mean: (B, T, K) mean of the path draws kept; path_sd: (B, T, K) their standard deviation.
        path_acceptance: (num_sweeps, B) per-trial acceptance of the path block.
        partition_acceptance: (num_sweeps,) acceptance rate of the partition block's Metropolis steps (empty
            when every drift-prior site is held).
        newton_steps: (num_sweeps,) Newton iterations to the path mode per sweep.
        trace: {site: (num_sweeps, ...)} every sweep's constrained value of the partition block's sites
            (burn-in included), for mixing diagnostics.
        kept_sweeps: (num_draws,) indices of the sweeps whose draws are in ``samples``.
        wall: seconds.
    """

    samples: dict
    path_mean: np.ndarray
    path_sd: np.ndarray
    path_acceptance: np.ndarray
    partition_acceptance: np.ndarray
    newton_steps: np.ndarray
    trace: dict = field(repr=False)
    kept_sweeps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))
    wall: float = 0.0

    def to_inference_data(self, model, data, *, backend: str = "auto"):
        """ArviZ InferenceData: posterior (chain 1, draw) of every parameter site with the model's dims, the path's
        posterior mean and sd as group ``path`` (trial, time, latent), the observed data, and sample_stats
        ``path_acceptance`` (the fraction of trials whose path proposal was accepted at each kept sweep)."""
        from ppl_switch.results import build_inference_data

        data = data if isinstance(data, SequenceData) else model.prepare(data)
        kept = self.kept_sweeps
        dims = ("trial", "time", "latent")
        return build_inference_data(
            model, data, {k: v[None] for k, v in self.samples.items()},
            sample_stats={"path_acceptance": self.path_acceptance[kept].mean(-1)[None]},
            extra_groups={"path": {"x_mean": (dims, self.path_mean), "x_sd": (dims, self.path_sd)}},
            attrs={"inference": "path_gibbs", "path_acceptance": float(self.path_acceptance.mean()),
                   "partition_acceptance": float(self.partition_acceptance.mean()) if self.partition_acceptance.size else -1.0},
            backend=backend)


def _trial_log_joint(model, theta, data, x):
    """(B,) log p(x_b, y_b | theta) per trial."""
    return model.path_distribution(theta, data).log_prob(x) + jnp.sum(model.emission_log_prob(theta, x, data), -1)


@partial(jax.jit, static_argnums=0)
def _newton_direction(model, theta, data, x, damping):
    """The Newton step (H + damping I)^{-1} g of -log p(x, y | theta) at x, the damped H's blocks and the
    energy (a scalar). The step is NaN where the damped H is not positive definite.

    The Euler chain's Hessian is block tridiagonal (3 K probes); the emissions' is block diagonal, so K probes
    (one-hot in a latent dimension on every step) give it -- the emissions dominate the cost."""
    def path_energy(p):
        return -jnp.sum(model.path_distribution(theta, data).log_prob(p))

    def emission_energy(p):
        return -jnp.sum(model.emission_log_prob(theta, p, data))

    def hvp(energy):
        grad = jax.grad(energy)
        return lambda v: jax.jvp(grad, (x,), (v,))[1]

    K = x.shape[-1]
    diag, lower = block_tridiagonal_hessian(hvp(path_energy), x.shape, x.dtype)
    eye = jnp.eye(K, dtype=x.dtype)
    emission_columns = [hvp(emission_energy)(jnp.broadcast_to(eye[k], x.shape)) for k in range(K)]
    diag = diag + jnp.stack(emission_columns, -1) + damping * eye
    grad = jax.grad(path_energy)(x) + jax.grad(emission_energy)(x)
    step = block_tridiagonal_solve(diag, lower, grad[..., None])[..., 0]
    return step, diag, lower, path_energy(x) + emission_energy(x)


@partial(jax.jit, static_argnums=0)
def _path_mh(model, theta, data, x, mode, diag, lower, key):
    """One independence Metropolis–Hastings step per trial with proposal N(mode, H^{-1}) (H from diag, lower).

    Returns (the new path (B, T, K), acceptance indicators (B,))."""
    B = x.shape[0]

    def quad(v):  # per-trial v' H v from the blocks: diagonal terms plus twice the sub-diagonal ones
        d = jnp.einsum("btk,btkl,btl->b", v, diag, v)
        o = jnp.einsum("btk,btkl,btl->b", v[:, 1:], lower, v[:, :-1])
        return d + 2.0 * o

    h = jnp.einsum("btkl,btl->btk", diag, mode)
    h = h.at[:, 1:].add(jnp.einsum("btkl,btl->btk", lower, mode[:, :-1]))
    h = h.at[:, :-1].add(jnp.einsum("btlk,btl->btk", lower, mode[:, 1:]))
    k_draw, k_accept = jax.random.split(key)
    proposal = jax.vmap(gaussian_chain_sample)(jax.random.split(k_draw, B), diag, lower, h)
    log_ratio = (_trial_log_joint(model, theta, data, proposal) - _trial_log_joint(model, theta, data, x)
                 + 0.5 * quad(proposal - mode) - 0.5 * quad(x - mode))
    accept = jnp.log(jax.random.uniform(k_accept, (B,), x.dtype)) < log_ratio
    return jnp.where(accept[:, None, None], proposal, x), accept


#: Newton steps smaller than this (latent units; the path's posterior sd is ~0.05-0.2) are taken whole
_TRUSTED_STEP = 0.05
#: Levenberg damping tried in turn where the path Hessian is not positive definite (its diagonal is ~2 / dt)
_DAMPING = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _path_mode(model, theta, data, x, *, tol: float, max_iters: int):
    """Newton's method with step halving to the mode of p(x | theta, y) from x. Returns (x at the last
    Hessian, the full Newton step there, the Hessian blocks, iterations); mode = x - step."""
    for it in range(1, max_iters + 1):
        for damping in _DAMPING:  # Levenberg: away from the mode the Euler terms' curvature in f can make H indefinite
            step, diag, lower, energy = _newton_direction(model, theta, data, x, damping)
            if bool(jnp.all(jnp.isfinite(step))):
                break
        else:
            raise FloatingPointError(f"sample_path_gibbs: the path Hessian is not positive definite even with damping "
                                     f"{_DAMPING[-1]} (a Cholesky block failed); start from a refined fit")
        size = float(jnp.max(jnp.abs(step)))
        x_at = x
        if size < tol and damping == 0.0:
            return x, step, diag, lower, it
        if size < _TRUSTED_STEP:  # near the mode Newton converges quadratically: no line search needed
            x = x - step
            continue
        scale = 1.0
        while scale > 1e-4:
            candidate = x - scale * step
            if float(path_negative_log_joint(model, theta, data, candidate)) <= float(energy):
                break
            scale *= 0.5
        x = candidate
    return x_at, step, diag, lower, max_iters  # not converged: the proposal is still valid, only less efficient


class _PartitionBlock:
    """Random-walk Metropolis on log p(W, tau, c, M, sigma0 | x) in numpyro's unconstrained coordinates u,
    the weights A, e integrated out (``collapsed_log_marginal``); the other parameters (theta) held."""

    def __init__(self, model, data, sites: dict, priors: dict):
        self.model, self.data, self.sites, self.priors = model, data, sites, priors
        self.transforms = {k: biject_to(d.support) for k, d in priors.items()}
        self.log_density = jax.jit(self._log_density)
        self.neg_hessian = jax.jit(jax.hessian(lambda u, theta, x: -self._log_density(u, theta, x)))
        self.steps = jax.jit(self._steps, static_argnums=0)

    def flatten(self, values: dict):
        """{site: constrained value} -> u (m,)."""
        return jnp.concatenate([jnp.ravel(self.transforms[k].inv(jnp.asarray(values[k]))) for k in self.sites])

    def unpack(self, u) -> dict:
        """u (m,) -> {site: constrained value}."""
        return {name: self.transforms[name](v) for name, v in split_flat(u, self.sites).items()}

    def _log_density(self, u, theta, x):
        unconstrained = split_flat(u, self.sites)
        values = {name: self.transforms[name](v) for name, v in unconstrained.items()}
        th = {**theta, **values}
        stats = self.model.weight_regression_stats(th, x, self.data)
        lp = collapsed_log_marginal(self.model.weight_prior_precision(th), stats, self.model.dt)
        for name, v in unconstrained.items():
            lp = (lp + jnp.sum(self.priors[name].log_prob(values[name]))
                  + jnp.sum(self.transforms[name].log_abs_det_jacobian(v, values[name])))
        return lp

    def _steps(self, num_steps, u, theta, x, chol, key):
        """``num_steps`` Metropolis steps with proposal u + chol z; returns (u, accepted count)."""
        def body(carry, k):
            u, lp, n = carry
            k_prop, k_acc = jax.random.split(k)
            proposal = u + chol @ jax.random.normal(k_prop, u.shape, u.dtype)
            lp_new = self._log_density(proposal, theta, x)
            accept = jnp.log(jax.random.uniform(k_acc, (), u.dtype)) < lp_new - lp  # NaN proposals: rejected
            return (jnp.where(accept, proposal, u), jnp.where(accept, lp_new, lp), n + accept), None

        (u, _, n), _ = jax.lax.scan(body, (u, self._log_density(u, theta, x), 0), jax.random.split(key, num_steps))
        return u, n


def _proposal_cholesky(neg_hessian, floor=1e-6):
    """Cholesky factor of the inverse of a symmetric matrix with its eigenvalues' magnitudes floored
    (a ridge or a saddle still gets a proposal covariance)."""
    h = 0.5 * (neg_hessian + neg_hessian.T)
    lam, vec = np.linalg.eigh(h)
    lam = np.maximum(np.abs(lam), floor * max(1.0, np.abs(lam).max()))
    return np.linalg.cholesky((vec / lam) @ vec.T)


def guide_means(model, guide, fit_params, data):
    """The start of :func:`sample_path_gibbs` from a fitted latent-SDE guide: ({site: constrained mean of the
    parameter guide}, the mean path (B, T, K))."""
    if not (hasattr(guide, "parameter_guide") and hasattr(guide, "path")):
        raise TypeError(f"guide: expected a LatentSDEGuide (parameter_guide and path), got {type(guide).__name__}")
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    x, unconstrained, supports, _ = unconstrained_fit(model, guide, fit_params, jdata)
    return {k: np.asarray(biject_to(supports[k])(jnp.asarray(v))) for k, v in unconstrained.items()}, np.asarray(x)


def sample_path_gibbs(model, data, params: dict, path, *, num_draws: int = 200, burn_in: int = 100, thin: int = 2,
                      partition_steps: int = 10, newton_tol: float = 1e-3, newton_max_iters: int = 20,
                      hold: Optional[Sequence[str]] = None, seed: int = 0, progress: Optional[int] = None) -> PathGibbsDraws:
    """Draws of the gpSLDS drift parameters and path from p(x, theta | y), some sites held.

    Runs ``burn_in + num_draws * thin`` sweeps from (params, path) -- e.g. :func:`guide_means` of a refined fit
    (``fit_svi_with_path_refinement``) -- and keeps every ``thin``-th sweep after burn-in. During burn-in the
    partition block's step size is adapted towards 30% acceptance and its proposal covariance is re-read once
    (half way) from the collapsed target's Hessian. The Newton tolerance is on the largest coordinate of the
    step (latent units): the proposal's centre is then the mode to ~tol^2.

    Args:
        model: :class:`~ppl_switch.models.gpslds.GPSLDS`.
        data: SequenceData (or raw y).
        params: {site: constrained value} for every parameter site of the model.
        path: (B, T, K) the start path.
        partition_steps: Metropolis steps of the partition block per sweep.
        hold: drift-prior sites held at their value in ``params`` as well. Sites that are neither drift
            weights nor drift-prior sites (the readout, input matrix) are always held: the readout fixes the frame.
        progress: print a line every this many sweeps.

    Returns:
        :class:`PathGibbsDraws`.

    Raises:
        TypeError: the model's drift is not linear in conjugate weights (not a GPSLDS).
        ValueError: bad sizes, a missing parameter site, an unknown held site.
        FloatingPointError: the path Hessian is not positive definite where the chain is, even damped.
    """
    if not (hasattr(model, "weight_regression_stats") and hasattr(model, "weights_to_sites")):
        raise TypeError(f"model: expected a GPSLDS (drift linear in its weights), got {type(model).__name__}")
    # float64 throughout: the collapsed target is a difference of two sums of ~1e5 nats over all steps, and the
    # acceptance ratios are differences of per-trial log joints of similar size
    with jax.enable_x64(True):
        return _sample_path_gibbs(model, data, params, path, num_draws, burn_in, thin, partition_steps, newton_tol,
                                  newton_max_iters, hold, seed, progress)


def _sample_path_gibbs(model, data, params, path, num_draws, burn_in, thin, partition_steps, newton_tol,
                       newton_max_iters, hold, seed, progress):
    num_draws, thin, partition_steps = (check_positive_int(v, n) for v, n in (
        (num_draws, "num_draws"), (thin, "thin"), (partition_steps, "partition_steps")))
    if not (isinstance(burn_in, (int, np.integer)) and burn_in >= 0):
        raise ValueError(f"burn_in: expected a non-negative integer, got {burn_in!r}")
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    dtype = jnp.result_type(float)
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    x = jnp.asarray(path, dtype)
    expected = (data.num_trials, data.num_timesteps, model.latent_dim)
    if x.shape != expected:
        raise ValueError(f"path: expected shape {expected} (trials, time, latent_dim), got {x.shape}")
    # the path substituted: the trace only lists the sites and their priors, it does not simulate a path
    shell = numpyro.handlers.substitute(numpyro.handlers.seed(model.program, 0), data={**params, "x": x})
    prior_trace = numpyro.handlers.trace(shell).get_trace(jdata)
    sites = [k for k, v in prior_trace.items() if v["type"] == "sample" and not v["is_observed"] and k != "x"]
    missing = [k for k in sites if k not in params]
    if missing:
        raise ValueError(f"params: missing parameter sites {missing}; expected a value for each of {sites}")
    theta = {k: jnp.asarray(params[k], dtype) for k in sites}
    drift_prior_sites = [k for k in model.drift_site_dims() if k not in WEIGHT_SITES]
    hold = () if hold is None else tuple(hold)
    unknown = [s for s in hold if s not in sites]
    if unknown:
        raise ValueError(f"hold: unknown parameter sites {unknown}; the model's sites are {sites}")
    block = {k: tuple(np.shape(theta[k])) for k in drift_prior_sites if k not in hold}
    # the block sites' priors are top-level constants: read them off the prior trace
    partition = _PartitionBlock(model, jdata, block, {k: prior_trace[k]["fn"] for k in block}) if block else None

    @jax.jit
    def draw_weights(th, x_, key):
        stats = model.weight_regression_stats(th, x_, jdata)
        mean, _, chol = weight_posterior(model.weight_prior_precision(th), stats, model.dt)
        z = jax.random.normal(key, mean.shape, mean.dtype)
        w = mean + jax.scipy.linalg.solve_triangular(chol.T, z, lower=False)  # (D, K), cov = precision^{-1}
        return model.weights_to_sites(w.T)

    key = jax.random.PRNGKey(seed)
    if partition is not None:
        u = partition.flatten(theta)
        chol = _proposal_cholesky(np.asarray(partition.neg_hessian(u, theta, x)))
        log_scale = np.log(2.38 / np.sqrt(len(u)))
    num_sweeps = burn_in + num_draws * thin
    path_acc, part_acc, newton, kept, kept_sweeps, trace = [], [], [], [], [], []
    path_sum = path_sq = 0.0  # running moments of the kept paths (all draws would be S x B x T x K)
    mode = x
    t0 = time.perf_counter()
    for sweep in range(num_sweeps):
        key, k_part, k_w, k_path = jax.random.split(key, 4)
        if partition is not None:  # partition and prior scales | x, the weights integrated out
            u, accepted = partition.steps(partition_steps, u, theta, x, jnp.asarray(np.exp(log_scale) * chol, dtype), k_part)
            rate = int(accepted) / partition_steps
            if sweep < burn_in:  # Robbins–Monro on the step size towards 30% acceptance
                log_scale += (rate - 0.3) / np.sqrt(1.0 + sweep)
                if sweep == burn_in // 2:
                    chol = _proposal_cholesky(np.asarray(partition.neg_hessian(u, theta, x)))
            theta = {**theta, **partition.unpack(u)}
            part_acc.append(rate)
            trace.append({k: np.asarray(theta[k]) for k in block})
        # weights | x, partition: exact
        theta = {**theta, **draw_weights(theta, x, k_w)}
        # path | theta: independence MH with the Laplace proposal at the mode. Newton starts from the last
        # sweep's mode: theta moved little, while the current path (a draw) sits about a posterior sd away
        x_at, step, diag, lower, iters = _path_mode(model, theta, jdata, mode, tol=newton_tol, max_iters=newton_max_iters)
        mode = x_at - step
        x, accept = _path_mh(model, theta, jdata, x, mode, diag, lower, k_path)
        path_acc.append(np.asarray(accept))
        newton.append(iters)
        if sweep >= burn_in and (sweep - burn_in) % thin == thin - 1:
            kept.append({k: np.asarray(v) for k, v in theta.items()})
            kept_sweeps.append(sweep)
            path_sum, path_sq = path_sum + x, path_sq + x**2
        if progress and (sweep + 1) % progress == 0:
            print(f"[path gibbs] sweep {sweep + 1}/{num_sweeps} {time.perf_counter() - t0:.0f}s: path acceptance "
                  f"{np.mean(path_acc[-progress:]):.2f}, partition acceptance "
                  f"{np.mean(part_acc[-progress:]) if part_acc else float('nan'):.2f}, "
                  f"Newton steps {np.mean(newton[-progress:]):.1f}", flush=True)
    path_mean = np.asarray(path_sum) / len(kept)
    path_sd = np.sqrt(np.maximum(np.asarray(path_sq) / len(kept) - path_mean**2, 0.0))
    return PathGibbsDraws(samples={k: np.stack([d[k] for d in kept]) for k in kept[0]},
                          path_mean=path_mean, path_sd=path_sd, path_acceptance=np.stack(path_acc),
                          partition_acceptance=np.asarray(part_acc), newton_steps=np.asarray(newton),
                          trace={k: np.stack([d[k] for d in trace]) for k in block} if trace else {},
                          kept_sweeps=np.asarray(kept_sweeps), wall=time.perf_counter() - t0)
