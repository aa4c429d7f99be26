"""Parameter uncertainty with the latent path integrated out: a Laplace approximation of p(x, theta | y).

The latent-SDE guides factorise q(x) q(theta). Where the path and the parameters are coupled -- a drift
fitted to a path that is itself uncertain, an errors-in-variables problem -- the moves in which path and
parameters shift together are not in that family, and q(theta) can state the parameters too precisely. A Gaussian
(Laplace) approximation of the joint posterior at the fitted means (x_hat, u_hat), u = the parameters in
numpyro's unconstrained space, has the marginal precision of u

    Lambda_u = H_uu - H_ux H_xx^{-1} H_xu,      H = Hessian of  -log p(y, x, theta(u)) - log|d theta / d u|

(a Schur complement). H_xx is block tridiagonal in time -- the Euler chain couples neighbouring steps
only and the emissions are per step -- so the correction term is sum_t |(L^{-1} H_xu)_t|^2 from one
forward sweep of a block Cholesky factorisation H_xx = L L' per trial: O(B T K^2 m) for m parameters.
It is close to the linear-response correction of mean-field variational Bayes (Giordano, Broderick &
Jordan, JMLR 2018), with Hessians at the means in place of expectations under q.

Sites that fix the latent frame (the readout, by default) are held at their fitted values: an affine
change of the latents moved into the readout leaves the likelihood unchanged, so with the readout free
the joint precision is nearly singular along those directions and the parameters' spread would be that
of the frame, not of the dynamics in it. Ridges of the posterior along which the data say little (the
partition's W / tau, the centre-offset pair (c, e), prior scales against weights) can make the Hessian at
the means indefinite; the function then raises, and those sites can be held too. The two-rotation
benchmark's numbers are in benchmarks/results.md (gpSLDS history; ``benchmarks/gpslds.py --joint-laplace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import biject_to
from numpyro.infer.util import potential_energy

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.guides.mean_field import holds_tracer
from ppl_switch.ops.switching import chain_forward, chain_solve

__all__ = ["LaplaceParameterPosterior", "laplace_parameter_posterior", "block_tridiagonal_hessian",
           "block_tridiagonal_whiten", "block_tridiagonal_solve", "schur_precision"]

#: sites held at their fitted values by default: the readout fixes the latent frame
READOUT_SITES = ("emission_matrix", "emission_bias", "emission_scales")


def block_tridiagonal_hessian(hvp, shape, dtype=float):
    """Blocks of a Hessian that is block tridiagonal in time, from 3 K Hessian-vector products.

    Probe vectors are one-hot in a latent dimension k on every third step (t = c mod 3): a step's row of
    H v then touches only its own column block or a neighbour's, and exactly one of them has colour c.

    Args:
        hvp: v (B, T, K) -> H v (B, T, K).
        shape: (B, T, K).

    Returns:
        (diag (B, T, K, K) = H[t, t], lower (B, T-1, K, K) = H[t+1, t]); rows index the output step.
    """
    B, T, K = shape
    t = np.arange(T)
    colour = t % 3
    responses = []
    for c in range(3):
        for k in range(K):
            v = np.zeros(shape)
            v[:, colour == c, k] = 1.0
            responses.append(hvp(jnp.asarray(v, dtype)))
    R = jnp.stack(responses).reshape(3, K, B, T, K)  # (colour, column k, B, row step, row dim)
    Rt = jnp.moveaxis(R, 3, 0)  # (row step, colour, column k, B, row dim)
    diag = Rt[t, colour]  # (T, k, B, row): the column block of step t itself
    lower = Rt[t[1:], colour[:-1]]  # (T-1, k, B, row): step t+1's rows, step t's columns
    return jnp.transpose(diag, (2, 0, 3, 1)), jnp.transpose(lower, (2, 0, 3, 1))


def block_tridiagonal_whiten(diag, lower, rhs):
    """Y = L^{-1} R for the block Cholesky factor H = L L' of a block-tridiagonal H, per trial
    (then R' H^{-1} R = Y' Y). The block elimination is ``ops.switching``'s: with P_t the Schur complements
    and hh_t the eliminated right-hand sides, Y_t = chol(P_t)^{-1} hh_t.

    Args:
        diag: (B, T, K, K) H[t, t]; lower: (B, T-1, K, K) H[t+1, t]; rhs: (B, T, K, m).

    Returns:
        (B, T, K, m); NaN where H is not positive definite (a failed Cholesky block).
    """
    def one(D, O, R):
        Ls, hh = chain_forward(D, O, R)
        return jax.vmap(lambda L, h: jax.scipy.linalg.solve_triangular(L, h, lower=True))(Ls, hh)

    return jax.vmap(one)(diag, lower, rhs)


def block_tridiagonal_solve(diag, lower, rhs):
    """H^{-1} R per trial (``ops.switching.chain_solve``). Shapes as :func:`block_tridiagonal_whiten`."""
    return jax.vmap(chain_solve)(diag, lower, rhs)


def schur_precision(energy, x_hat, u_hat, *, chunk: int = 8):
    """H_uu and H_ux H_xx^{-1} H_xu of ``energy(x, u)`` at (x_hat, u_hat), H_xx block tridiagonal in time
    (the marginal precision of u is their difference, the Schur complement).

    Args:
        energy: (x (B, T, K), u (m,)) -> scalar whose Hessian in x is block tridiagonal in time.
        x_hat: (B, T, K); u_hat: (m,).
        chunk: Hessian columns in u per compiled call.

    Returns:
        (H_uu (m, m), the correction H_ux H_xx^{-1} H_xu (m, m), the gradient in u (m,)) as numpy arrays.

    Raises:
        FloatingPointError: H_xx is not positive definite at x_hat (names the first failing trial and step).
    """
    grad_both = jax.grad(energy, argnums=(0, 1))
    dtype = jnp.result_type(x_hat, u_hat)
    x_hat, u_hat = jnp.asarray(x_hat, dtype), jnp.asarray(u_hat, dtype)
    hvp_x = jax.jit(lambda v: jax.jvp(lambda x: grad_both(x, u_hat)[0], (x_hat,), (v,))[1])
    diag, lower = block_tridiagonal_hessian(hvp_x, x_hat.shape, dtype)

    m = u_hat.shape[0]

    @jax.jit
    def columns(E):  # E (c, m) unit vectors -> H_xu columns (c, B, T, K) and H_uu columns (c, m)
        return jax.vmap(lambda e: jax.jvp(lambda u: grad_both(x_hat, u), (u_hat,), (e,))[1])(E)

    eye = jnp.eye(m, dtype=dtype)
    h_xu, h_uu = [], []
    for start in range(0, m, chunk):
        E = eye[start:start + chunk]
        pad = chunk - E.shape[0]  # one compiled shape for every chunk
        cx, cu = columns(jnp.concatenate([E, jnp.zeros((pad, m), dtype)]) if pad else E)
        h_xu.append(cx[:chunk - pad])
        h_uu.append(cu[:chunk - pad])
    h_xu = jnp.moveaxis(jnp.concatenate(h_xu), 0, -1)  # (B, T, K, m)
    h_uu = jnp.concatenate(h_uu)

    y = block_tridiagonal_whiten(diag, lower, h_xu)
    finite = np.isfinite(np.asarray(y)).all((-2, -1))
    if not finite.all():
        b, t = np.argwhere(~finite)[0]
        raise FloatingPointError(f"the path block H_xx is not positive definite at the mean path (trial {b}, step {t}): "
                                 f"the path is far from a mode given the parameters -- refine it "
                                 f"(fit_svi_with_path_refinement)")
    correction = np.asarray(jnp.einsum("btki,btkj->ij", y, y))
    h_uu = np.asarray(h_uu)
    return 0.5 * (h_uu + h_uu.T), 0.5 * (correction + correction.T), np.asarray(grad_both(x_hat, u_hat)[1])


def split_flat(flat, sites: dict) -> dict:
    """(..., m) -> {name: (..., *shape)} in ``sites`` order (numpy or jax arrays)."""
    out, i = {}, 0
    for name, shape in sites.items():
        n = int(np.prod(shape))
        out[name] = flat[..., i:i + n].reshape(flat.shape[:-1] + tuple(shape))
        i += n
    return out


@dataclass
class LaplaceParameterPosterior:
    """N(loc, cov) over the free parameters in unconstrained space, the held sites at fixed values.

    Attributes:
        loc: (m,) unconstrained means of the free sites, flattened in ``sites`` order.
        cov: (m, m) the Laplace covariance (path integrated out).
        mean_field_cov: (m, m) the fitted guide's covariance of the same coordinates given the held sites
            at their means (the mean-field answer to the same question), for comparison.
        sites: {name: shape} of the free sites; held: {name: constrained value} of the held sites.
        supports: {name: constraint} of the free sites (to map draws back).
        gradient_norm: |d(-log p)/du| at (x_hat, u_hat): how far the fitted means are from a stationary point.
    """

    loc: np.ndarray
    cov: np.ndarray
    mean_field_cov: np.ndarray
    sites: dict
    held: dict
    supports: dict = field(repr=False)
    gradient_norm: float = 0.0

    def sd_ratio(self) -> dict[str, np.ndarray]:
        """{site: Laplace sd / mean-field sd per unconstrained coordinate}."""
        ratio = np.sqrt(np.diag(self.cov) / np.diag(self.mean_field_cov))
        return split_flat(ratio, self.sites)

    def sample(self, key, num_samples: int) -> dict[str, np.ndarray]:
        """{site: (num_samples, ...)} constrained draws of every parameter site (held sites repeated)."""
        num_samples = check_positive_int(num_samples, "num_samples")
        z = np.asarray(jax.random.normal(key, (num_samples, len(self.loc))))
        u = self.loc + z @ np.linalg.cholesky(self.cov).T
        out = {name: np.asarray(biject_to(self.supports[name])(jnp.asarray(v))) for name, v in split_flat(u, self.sites).items()}
        out.update({k: np.broadcast_to(np.asarray(v), (num_samples,) + np.shape(v)).copy() for k, v in self.held.items()})
        return out


def unpack_parameter_vector(parameter_guide, params, data, flat, model_trace) -> dict:
    """A joint-normal parameter guide's flat unconstrained vector ``flat`` (n,) as {site: unconstrained value}.

    numpyro's continuous autoguides lay their sites out in the order the guide samples them, each raveled
    in its unconstrained shape (a Cholesky factor of a correlation matrix is a vector there); the order is
    read off a trace of the guide and the shapes off the supports in ``model_trace``."""
    substituted = numpyro.handlers.substitute(numpyro.handlers.seed(parameter_guide, 0), data=params)
    guide_trace = numpyro.handlers.trace(substituted).get_trace(data)
    own = f"_{parameter_guide.prefix}_latent"  # the guide's flat site itself
    shapes = {name: jnp.shape(biject_to(model_trace[name]["fn"].support).inv(site["value"]))
              for name, site in guide_trace.items() if site["type"] == "sample" and name != own}
    size = sum(int(np.prod(shape)) for shape in shapes.values())
    if size != np.shape(flat)[-1]:
        raise ValueError(f"the parameter guide's vector has {np.shape(flat)[-1]} entries, its sites {size} ({shapes})")
    return split_flat(flat, shapes)


def unconstrained_fit(model, guide, params, data):
    """(x_hat (B, T, K), {site: unconstrained mean}, {site: the prior's support}, mean-field covariance (n, n)).

    One compiled program: op by op, the guide's mean path (a parallel scan) and the model's trace were some 300
    single-op compilations (~10 s of the gpSLDS tutorial). The supports and the sites' order (the guide's vector
    layout; a jitted program returns a dict in sorted key order) are read off its trace as Python objects."""
    supports = {}  # in the guide's layout order

    def arrays(params, data):
        substituted = numpyro.handlers.substitute(guide, data=params)
        guide_trace = numpyro.handlers.trace(numpyro.handlers.seed(substituted, 0)).get_trace(data)
        values = {k: v["value"] for k, v in guide_trace.items() if v["type"] == "sample"}
        trace = numpyro.handlers.trace(numpyro.handlers.substitute(model.program, data=values)).get_trace(data)
        pg = guide.parameter_guide
        loc = jnp.asarray(params[f"{pg.prefix}_loc"])
        scale_tril = jnp.asarray(pg.get_posterior(params).scale_tril)
        unpacked = unpack_parameter_vector(pg, params, data, loc, trace)
        x_hat = numpyro.handlers.substitute(guide.path, data=params)(data).mean
        supports.update({name: trace[name]["fn"].support for name in unpacked})
        return x_hat, unpacked, scale_tril @ scale_tril.T

    x_hat, unpacked, covariance = jax.jit(arrays)(params, data)
    unpacked = {name: unpacked[name] for name in supports}
    if any(holds_tracer(support) for support in supports.values()):
        raise ValueError(f"unconstrained_fit: a prior's support depends on traced values ({supports})")
    return x_hat, unpacked, supports, covariance


def laplace_parameter_posterior(model, data, guide, params, *, hold: Optional[Sequence[str]] = None,
                                chunk: int = 8) -> LaplaceParameterPosterior:
    """Laplace approximation of the parameters' marginal posterior, the latent path integrated out.

    Args:
        model: a latent-SDE model (:class:`~ppl_switch.models.gpslds.GPSLDS`, ``GPSDE``).
        data: the fitted SequenceData (or raw y).
        guide: the fitted :class:`~ppl_switch.guides.latent_sde.LatentSDEGuide` (joint normal over the
            parameters, Gauss–Markov q(x)); params: its fitted ``numpyro.param`` values (``fit.params``).
        hold: sites held at their fitted values (default: the readout sites, which fix the latent frame).
        chunk: Hessian columns computed per compiled call (memory: chunk x one gradient's intermediates).

    Returns:
        :class:`LaplaceParameterPosterior`, centred at the guide's means.

    Raises:
        TypeError: the guide is not a latent-SDE guide. ValueError: ``hold`` names an unknown site.
        FloatingPointError: H_xx or the Schur complement is not positive definite at the fitted means
            (the means are far from a mode of the joint; refine the fit, e.g. ``fit_svi_with_path_refinement``).
    """
    if not (hasattr(guide, "parameter_guide") and hasattr(guide, "path")):
        raise TypeError(f"guide: expected a LatentSDEGuide (parameter_guide and path), got {type(guide).__name__}")
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    x_hat, unconstrained, supports, mf_cov_all = unconstrained_fit(model, guide, params, jdata)
    hold = tuple(s for s in READOUT_SITES if s in unconstrained) if hold is None else tuple(hold)
    unknown = [s for s in hold if s not in unconstrained]
    if unknown:
        raise ValueError(f"hold: unknown parameter sites {unknown}; the guide's sites are {sorted(unconstrained)}")
    free = {k: tuple(np.shape(v)) for k, v in unconstrained.items() if k not in hold}
    if not free:
        raise ValueError("hold: every parameter site is held; nothing left to approximate")

    # the guide's covariance of the free coordinates given the held ones (its precision's free block)
    offsets, i = {}, 0
    for name, v in unconstrained.items():
        offsets[name] = np.arange(i, i + np.size(v))
        i += np.size(v)
    index = np.concatenate([offsets[k] for k in free])
    mf_cov = np.linalg.inv(np.linalg.inv(np.asarray(mf_cov_all))[np.ix_(index, index)])

    dtype = jnp.result_type(float)  # float64 under jax_enable_x64: the Schur complement subtracts large terms
    u_hat = jnp.concatenate([jnp.ravel(unconstrained[k]) for k in free]).astype(dtype)
    held_u = {k: jnp.asarray(unconstrained[k], dtype) for k in hold}

    def energy(x, u):
        return potential_energy(model.program, (jdata,), {}, {**held_u, **split_flat(u, free), "x": x})

    x_hat = jnp.asarray(x_hat, dtype)
    h_uu, correction, grad_u = schur_precision(energy, x_hat, u_hat, chunk=chunk)
    precision = h_uu - correction
    eigenvalues = np.linalg.eigvalsh(precision)
    if eigenvalues.min() <= 0:
        raise FloatingPointError(f"laplace_parameter_posterior: the parameters' Schur-complement precision is not "
                                 f"positive definite (smallest eigenvalue {eigenvalues.min():.3g}): the fitted means are "
                                 f"far from a mode of the joint, or the free sites include a ridge the data do not "
                                 f"resolve (partition weights / temperature, centres / offsets, the scales) -- hold them")
    cov = np.linalg.inv(precision)
    held = {k: np.asarray(biject_to(supports[k])(jnp.asarray(v))) for k, v in held_u.items()}
    return LaplaceParameterPosterior(loc=np.asarray(u_hat), cov=0.5 * (cov + cov.T), mean_field_cov=mf_cov, sites=free,
                                     held=held, supports={k: supports[k] for k in free},
                                     gradient_norm=float(np.linalg.norm(grad_u)))
