"""A data-driven start for the 2-level GDM: fit its hard-state limit by EM, then run SVI from there.

With relaxed states at tau = 0.99, GS-BBVI from the released code's random start usually settles in a fit
that blends states (paper Fig. 2B): which true states get merged depends on the seed, and per-state
quantities such as the fixed points (I - F S_k)^{-1} F b_k then mean little. The GDM's tau -> 0 limit
is an autoregressive HMM whose state k regresses y_t on the projection F y_{t-1}::

    s_t | s_{t-1} ~ Cat(P[s_{t-1}]),    y_t | s_t = k ~ N(S_k F y_{t-1} + b_k, diag(sigma^2))     (t >= 1)

and this has closed-form EM (forward-backward, then weighted least squares per state).
:func:`hard_state_em` fits it from several starts and keeps the best log-likelihood;
:func:`segmentation_start` turns the estimate into start values for the GDM's point estimates and its
linear encoder (multinomial logistic regressions of the smoothed states on F y_{t-1} and on y_t), to pass
as ``LinearGuide(model, start=...)``; :func:`~ppl_switch.infer.gdm_svi.fit_gdm_svi` does this by default
(``start="auto"``). :func:`pca_projection` gives a projection F that keeps the data's leading principal
subspace; the released code's random F can all but lose a latent direction (model card).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppl_switch.data import DataError, SequenceData, as_sequence_data, check_positive_int, interpolate_missing, missing_share
from ppl_switch.guides.gdm_guides import MAP_SUFFIX, LinearGuide, MixtureGuide
from ppl_switch.models.gdm import GDM
from ppl_switch.ops.hmm import hmm_posterior_stats

__all__ = ["HardStateFit", "hard_state_em", "pca_projection", "segmentation_start"]

#: start types cycled over the restarts of :func:`hard_state_em` (see :func:`_start_labels`)
_START_KINDS = ("velocity", "velocity_and_position", "random_walk")


@dataclass
class HardStateFit:
    """Result of :func:`hard_state_em` (K states, N observed dims, D projected dims).

    Attributes:
        dynamics: (K, N, D) S_k.
        offsets: (K, N) b_k.
        obs_var: (N,) sigma^2, shared by the states.
        transition_matrix: (K, K) P.
        state_probs: (trials, time, K) smoothed p(s_t | y); step 0 (no regression) copies step 1.
        log_likelihood: log p(y_{1:} | y_0) of the kept restart.
        history: (iterations,) log-likelihood per EM iteration of the kept restart.
        restart_log_likelihoods: (restarts,) final log-likelihood of every restart.
    """

    dynamics: np.ndarray
    offsets: np.ndarray
    obs_var: np.ndarray
    transition_matrix: np.ndarray
    state_probs: np.ndarray
    log_likelihood: float
    history: np.ndarray
    restart_log_likelihoods: np.ndarray


def _filled_y(data: SequenceData) -> np.ndarray:
    """(trials, time, N) y with its missing entries inside the trials interpolated (:func:`interpolate_missing`)."""
    return np.asarray(interpolate_missing(data).y if missing_share(data) > 0 else data.y, float)


def _as_data(data) -> SequenceData:
    return data if isinstance(data, SequenceData) else as_sequence_data(data)


def pca_projection(data, latent_dim: int) -> np.ndarray:
    """(latent_dim, N) projection onto the leading principal directions of y (steps pooled over trials,
    missing entries interpolated in time by :func:`interpolate_missing`), scaled so that F y has unit
    variance along each direction; ``data``: y (trials, time, N) or a SequenceData.

    Pass it as ``GDM(..., projection_matrix=F)``. Unlike a random projection it cannot nearly lose a
    direction the data vary in."""
    latent_dim = check_positive_int(latent_dim, "latent_dim")
    data = _as_data(data)
    y = _filled_y(data)[np.asarray(data.time_mask)]
    if latent_dim > min(y.shape):
        raise ValueError(f"latent_dim: expected at most min(steps, obs_dim) = {min(y.shape)}, got {latent_dim}")
    _, sv, vt = np.linalg.svd(y - y.mean(0), full_matrices=False)
    scale = sv[:latent_dim] / np.sqrt(len(y) - 1)
    if not np.all(scale > 1e-12 * max(scale[0], 1e-300)):
        raise DataError(f"data: y varies in fewer than latent_dim = {latent_dim} directions")
    return vt[:latent_dim] / scale[:, None]


def _kmeans(features: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """(T,) labels of plain k-means from k distinct random rows."""
    centres = features[rng.choice(len(features), k, replace=False)]
    for _ in range(iterations):
        labels = np.argmin(((features[:, None] - centres) ** 2).sum(-1), 1)
        centres = np.stack([features[labels == j].mean(0) if np.any(labels == j) else centres[j] for j in range(k)])
    return labels


def _start_labels(kind: str, projected: np.ndarray, num_states: int, rng) -> np.ndarray:
    """Initial hard labels of the regression pairs. ``projected`` (pairs, 2, D) holds F y_{t-1}, F y_t.

    velocity: k-means on the standardised step F y_t - F y_{t-1} (separates constant-velocity pieces);
    velocity_and_position: the same with the position appended at a random relative weight;
    random_walk: k-means on a 4-D Gaussian random walk (contiguous random segments)."""
    step = projected[:, 1] - projected[:, 0]
    step = step / (step.std(0) + 1e-12)
    if kind == "velocity":
        features = step
    elif kind == "velocity_and_position":
        position = projected[:, 0] - projected[:, 0].mean(0)
        features = np.concatenate([step, rng.uniform(0.2, 2.0) * position / (position.std(0) + 1e-12)], 1)
    else:
        features = rng.standard_normal((len(step), 4)).cumsum(0)
    return _kmeans(features, num_states, rng)


def _weighted_regressions(regressors, targets, weights, observed, ridge: float = 1e-6):
    """Per state k and target dim n: argmin_w sum_t w_tk o_tn (y_tn - w' x_t)^2 + ridge |w|^2, where
    ``observed`` o (n, N) is 1 where y_tn is observed; (K, P, N)."""
    gram = np.einsum("tk,tn,tp,tq->knpq", weights, observed, regressors, regressors, optimize=True)
    cross = np.einsum("tk,tn,tp->knp", weights, observed * targets, regressors, optimize=True)
    coef = np.linalg.solve(gram + ridge * np.eye(regressors.shape[1]), cross[..., None])[..., 0]  # (K, N, P)
    return np.swapaxes(coef, 1, 2)


@jax.jit
def _smooth_trials(transition, log_likelihoods, mask):
    """Forward-backward per trial: (trials, pairs, K) marginals, (trials, K, K) summed pairwise, (trials,) log Z."""
    K = transition.shape[0]
    both = (mask[:, 1:] & mask[:, :-1]).astype(log_likelihoods.dtype)  # pairs of two valid steps
    out = jax.vmap(lambda ll, m, w: hmm_posterior_stats(jnp.full(K, 1.0 / K), transition, ll, m, w))(log_likelihoods, mask, both)
    return out.smoothed_probs, out.transition_counts, out.log_normalizer


def _em_from(labels, K, regressors, targets, observed, pair_mask, num_iters, transition_pseudocount):
    """EM from hard start ``labels`` (n,) of the n valid pairs (``pair_mask`` (trials, pairs) marks them);
    only the observed entries of the targets (``observed`` (n, N), 1 or 0) enter the likelihood.

    Each iteration is an M-step (weighted least squares, shared variance, expected transition counts),
    then an E-step under those parameters; so the returned parameters are the ones whose smoothed
    marginals (trials, pairs, K) and log-likelihood are returned with them."""
    trials, pairs = pair_mask.shape
    resp = np.eye(K)[labels]
    hard = np.zeros((trials, pairs), int)
    hard[pair_mask] = labels
    both = pair_mask[:, 1:] & pair_mask[:, :-1]
    counts = np.zeros((K, K))
    np.add.at(counts, (hard[:, :-1][both], hard[:, 1:][both]), 1.0)
    history = []
    for _ in range(num_iters):
        coef = _weighted_regressions(regressors, targets, resp, observed)
        residual = targets[:, None, :] - np.einsum("tp,kpn->tkn", regressors, coef)
        obs_var = np.maximum(np.einsum("tk,tn,tkn->n", resp, observed, residual**2) / np.maximum(observed.sum(0), 1), 1e-10)
        transition = (counts + transition_pseudocount) / (counts + transition_pseudocount).sum(1, keepdims=True)
        log_lik = -0.5 * np.einsum("tn,tkn->tk", observed, residual**2 / obs_var + np.log(2 * np.pi * obs_var))
        padded = np.zeros((trials, pairs, K))
        padded[pair_mask] = log_lik
        probs, pairwise, log_z = _smooth_trials(jnp.asarray(transition), jnp.asarray(padded), jnp.asarray(pair_mask))
        resp = np.asarray(probs, float)[pair_mask]
        counts = np.asarray(pairwise, float).sum(0)
        history.append(float(np.sum(log_z)))
    return coef, obs_var, transition, np.asarray(probs, float), np.asarray(history)


def hard_state_em(
    data,
    projection: np.ndarray,
    num_states: int,
    *,
    num_restarts: int = 20,
    num_iters: int = 50,
    transition_pseudocount: float = 1e-3,
    seed: int = 0,
) -> HardStateFit:
    """EM for the GDM's hard-state limit (module docstring), best of ``num_restarts`` starts.

    Args:
        data: y (trials, time, N) or a SequenceData. Missing entries: the regressors F y_{t-1} read y
            interpolated in time (:func:`interpolate_missing`); the missing targets are left out.
        projection: (D, N) the GDM's F (``model.fixed_projection(N)``).
        num_states: K.
        num_restarts: starts, cycling through k-means on the projected velocity, on velocity and
            position, and on a random walk (contiguous segments).
        num_iters: EM iterations per start (each: weighted least squares, then forward-backward).
        transition_pseudocount: added to the expected transition counts (keeps P off zero).
        seed: seeds the starts.
    """
    num_states = check_positive_int(num_states, "num_states")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    num_iters = check_positive_int(num_iters, "num_iters")
    data = _as_data(data)
    projection = np.asarray(projection, float)
    if projection.ndim != 2 or projection.shape[1] != data.obs_dim:
        raise ValueError(f"projection: expected shape (latent_dim, obs_dim = {data.obs_dim}), got {projection.shape}")
    steps = np.asarray(data.time_mask)
    pair_mask = steps[:, 1:] & steps[:, :-1]  # regression pairs (y_{t-1}, y_t)
    if pair_mask.sum() < num_states * (projection.shape[0] + 1):
        raise DataError(f"data: {int(pair_mask.sum())} consecutive steps are too few for "
                        f"{num_states} state regressions on {projection.shape[0] + 1} regressors")
    # missing entries: the regressor F y_{t-1} reads the data interpolated in time; the targets' missing
    # entries are left out of the likelihood (interpolating them too measured 0.84 vs 1.0 hard-state
    # accuracy on NASCAR at noise sd 0.01 with 20% missing: interpolation error is larger than the noise)
    y = _filled_y(data)
    observed = np.asarray(data.mask)[:, 1:][pair_mask].astype(float)
    previous, current = y[:, :-1][pair_mask], y[:, 1:][pair_mask]
    projected = np.stack([previous @ projection.T, current @ projection.T], 1)  # F y_{t-1}, F y_t
    regressors = np.concatenate([projected[:, 0], np.ones((len(previous), 1))], 1)
    rng = np.random.default_rng(seed)
    best, finals = None, []
    for r in range(num_restarts):
        labels = _start_labels(_START_KINDS[r % len(_START_KINDS)], projected, num_states, rng)
        if np.unique(labels).size < num_states:  # k-means lost a state: skip this start
            finals.append(-np.inf)
            continue
        result = _em_from(labels, num_states, regressors, current, observed, pair_mask, num_iters, transition_pseudocount)
        final = result[-1][-1] if np.isfinite(result[-1][-1]) else -np.inf  # a start that broke down loses
        finals.append(final)
        if final > -np.inf and (best is None or final > best[-1][-1]):
            best = result
    if best is None:
        raise ValueError(f"num_states: no start gave a finite fit (k-means left a state empty, or EM broke down); "
                         f"{num_states} may be too many for these data")
    coef, obs_var, transition, probs, history = best
    state_probs = np.concatenate([probs[:, :1], probs], 1) * steps[..., None]
    return HardStateFit(
        dynamics=np.transpose(coef[:, :-1, :], (0, 2, 1)),
        offsets=coef[:, -1, :],
        obs_var=obs_var,
        transition_matrix=transition,
        state_probs=state_probs,
        log_likelihood=float(history[-1]),
        history=history,
        restart_log_likelihoods=np.asarray(finals),
    )


def _multinomial_logistic(features, targets, l2: float = 1e-3, steps: int = 500):
    """Logistic regression of soft labels ``targets`` (n, K) on ``features`` (n, P) (mean cross-entropy,
    L2 penalty on the standardised slopes, Adam); returns (W (K, P), b (K,)) on the raw scale."""
    mean, sd = features.mean(0), features.std(0) + 1e-12
    x, t = jnp.asarray((features - mean) / sd), jnp.asarray(targets)
    K, P = targets.shape[1], features.shape[1]
    params = {"W": jnp.zeros((K, P)), "b": jnp.zeros(K)}

    def loss(p):
        log_probs = jax.nn.log_softmax(x @ p["W"].T + p["b"])
        return -jnp.mean(jnp.sum(t * log_probs, -1)) + l2 * jnp.sum(p["W"] ** 2)

    optimiser = optax.adam(0.05)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(loss)(p)
        updates, state = optimiser.update(grads, state)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, length=steps)
    W = np.asarray(params["W"]) / sd
    return W, np.asarray(params["b"]) - W @ mean


def segmentation_start(model, data, *, guide=None, num_restarts: int = 20, num_iters: int = 50, seed: int = 0,
                       hard_fit: Optional[HardStateFit] = None) -> dict[str, np.ndarray]:
    """Start values for a 2-level GDM fit from :func:`hard_state_em`: S_k, b_k, sigma^2 from the
    hard-state fit, the transition weights from a logistic regression of its smoothed states on
    F y_{t-1} (divided by 1 - gamma at gamma's start), the initial logits and means from step 0, and the
    linear encoder's W, b from a logistic regression of the smoothed states on y_t. Everything else (gamma,
    a sticky encoder's B) keeps the guide's own start.

    Args:
        model: a :class:`~ppl_switch.models.gdm.GDM` with Gaussian emissions, linear transitions and no inputs.
        data: observations (trials, time, N) or a SequenceData.
        guide: the :class:`~ppl_switch.guides.gdm_guides.LinearGuide` whose other start values to keep
            (default ``LinearGuide(model, seed=seed)``).
        hard_fit: a :class:`HardStateFit` to reuse instead of running :func:`hard_state_em`.

    Returns:
        ``{name: value}`` in the guide's naming (``<site>_map``, ``guide_W``, ``guide_b``): pass it as
        ``LinearGuide(model, start=...)``.
    """
    if not isinstance(model, GDM):
        raise TypeError(f"model: expected a GDM (the 2-level model), got {type(model).__name__}")
    unsupported = {"emission": (model.emission, "gaussian"), "transition": (model.transition, "linear"),
                   "input_dim": (model.input_dim, 0)}
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"model.{name}: segmentation_start supports {name}={needed!r} only, got {value!r}")
    guide = LinearGuide(model, seed=seed) if guide is None else guide
    if not isinstance(guide, LinearGuide) or isinstance(guide, MixtureGuide):
        raise TypeError(f"guide: expected a LinearGuide (its encoder is what the start fits), got {type(guide).__name__}")
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    N, K = data.obs_dim, model.num_states
    F = model.fixed_projection(N)
    fit = hard_state_em(data, F, K, num_restarts=num_restarts, num_iters=num_iters, seed=seed) if hard_fit is None else hard_fit
    values = dict(guide.init_values(N))
    steps = np.asarray(data.time_mask)
    y, probs = _filled_y(data), fit.state_probs
    pairs = steps[:, 1:] & steps[:, :-1]
    gamma = float(model.gamma({"stickiness": jnp.asarray(values["stickiness" + MAP_SUFFIX])})) if model.sticky else 0.0
    trans_W, trans_b = _multinomial_logistic(y[:, :-1][pairs] @ F.T, probs[:, 1:][pairs])
    enc_W, enc_b = _multinomial_logistic(y[steps], probs[steps])
    first = probs[:, 0].mean(0)
    values.update({
        "dynamics" + MAP_SUFFIX: fit.dynamics,
        "offsets" + MAP_SUFFIX: fit.offsets,
        "log_obs_var" + MAP_SUFFIX: np.log(fit.obs_var),
        "init_mean" + MAP_SUFFIX: np.tile(y[:, 0].mean(0), (K, 1)),
        "init_logits" + MAP_SUFFIX: np.log(first + 1e-3) - np.log(first + 1e-3).mean(),
        "transition_weights" + MAP_SUFFIX: trans_W / (1.0 - gamma),
        "transition_bias" + MAP_SUFFIX: trans_b / (1.0 - gamma),
        "guide_W": enc_W,
        "guide_b": enc_b,
    })
    if model.train_projection:
        values["projection" + MAP_SUFFIX] = F
    return values
