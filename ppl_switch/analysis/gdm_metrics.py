"""GDM analysis (paper §3.2, §4): inferred-state accuracy, smoothing, k-step prediction with envelopes,
per-state fixed points.

All functions take model point estimates ``params`` (e.g. ``fit.point_estimate()`` of a GDM fit) and
soft-state samples ``z`` (samples, trials, time, K) from the amortised guide
(:func:`ppl_switch.infer.gdm_svi.encode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.analysis.metrics import affine_align, knn_classify, r2_score
from ppl_switch.distributions.relaxed import RelaxedOneHotCategorical

__all__ = [
    "inferred_state_accuracy",
    "smooth",
    "smoothed_r2",
    "predict_k_steps",
    "one_step_envelope",
    "state_fixed_points",
    "aligned_state_fixed_points",
    "envelope_coverage",
]


def inferred_state_accuracy(train_soft_states, train_labels, test_soft_states, test_labels, k: int = 10) -> float:
    """Paper §4: fit k-NN (k=10, Euclidean) from soft states to labels on the training trial(s), score
    on the test trial(s). Soft states (..., K) and labels (...) are flattened over trials and time."""
    K = np.shape(train_soft_states)[-1]
    pred = knn_classify(np.reshape(train_soft_states, (-1, K)), np.ravel(train_labels), np.reshape(test_soft_states, (-1, K)), k)
    return float(np.mean(pred == np.ravel(test_labels)))


def smooth(model, params, z, data):
    """(trials, time, N) smoothed observations: sum_k zbar_tk m_tk with zbar the mean of the samples
    ``z`` (samples, trials, time, K) (equal to averaging per-sample predictions, the mean is linear in z).
    For Poisson emissions this is the rate averaged over samples."""
    if model.emission == "gaussian":
        return model.mixed_mean(params, jnp.mean(z, 0), data.y, data.inputs)
    return jnp.mean(jax.nn.softplus(model.mixed_mean(params, z, data.y, data.inputs)), 0)


def smoothed_r2(model, params, z, data) -> float:
    """Mean-over-dimensions R² of the smoothed observations (observed entries only)."""
    return r2_score(data.y, smooth(model, params, z, data), data.mask)


def predict_k_steps(model, params, z, data, k: int, key, num_branches: int = 1, temperature=None):
    """k-step-ahead predictions from every start (paper §3.2 / released code).

    From each start t, z_{t+1..t+k} are drawn from the model's transition (Gumbel noise), starting at the
    encoder's z_t and the observed y_t; each predicted mean y-hat is fed back as the next input.

    Args:
        z: (samples, trials, time, K) encoder samples; each is branched ``num_branches`` times.
        k: horizon >= 1.
    Returns:
        (samples * num_branches, trials, time, N): entry [s, i, t] predicts y_{t} from the start t - k
        (NaN for t < k).
    """
    if int(k) < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k}")
    k = int(k)
    tau = model.temperature if temperature is None else temperature
    F = model.projection(params, data.y.shape[-1])
    gamma = model.gamma(params)
    if model.transition != "linear":
        raise NotImplementedError("predict_k_steps: only the linear transition is supported")
    y = jnp.asarray(data.y)
    z = jnp.repeat(z, num_branches, axis=0)
    S, T = z.shape[0], y.shape[1]

    def one_step(z_prev, y_prev, key):
        drive = (y_prev @ F.T) @ params["transition_weights"].T + params["transition_bias"]
        logits = (1.0 - gamma) * drive + gamma * z_prev
        z_new = RelaxedOneHotCategorical(tau, logits=logits).sample(key)
        means = jnp.einsum("knd,...d->...kn", params["dynamics"], y_prev @ F.T) + params["offsets"]
        y_new = jnp.einsum("...k,...kn->...n", z_new, means)
        return z_new, y_new

    state = (z[:, :, : T - k], jnp.broadcast_to(y[:, : T - k], (S,) + y[:, : T - k].shape))
    for step_key in jax.random.split(key, k):
        state = one_step(*state, step_key)
    pad = jnp.full((S, y.shape[0], k, y.shape[2]), jnp.nan, dtype=y.dtype)
    return jnp.concatenate([pad, state[1]], axis=2)


def one_step_envelope(
    model, params, z, data, key, num_branches: int = 10, width: float = 3.0, observation_noise: bool = True
):
    """One-step-ahead prediction envelope (paper Fig. 2C): each of the encoder paths ``z`` (samples,
    trials, time, K) is branched ``num_branches`` times through the transition; returns (mean, lower,
    upper) of shape (trials, time, N), mean ± width * std, NaN at t = 0.

    ``observation_noise=True`` (default) gives the one-step posterior predictive of the observation
    y_t: its variance is the spread of the predicted means plus the emission variance (sigma^2 for
    Gaussian, the rate for Poisson, by the law of total variance), so coverage of observed y is a
    calibration check. ``observation_noise=False`` is the released code's envelope: the spread of the
    noise-free predicted means alone (transition uncertainty only), which is not an interval for y.
    Poisson envelopes are on the rate scale (softplus of the mixed mean).
    """
    pred = predict_k_steps(model, params, z, data, 1, key, num_branches)
    if model.emission != "gaussian":
        pred = jax.nn.softplus(pred)
    mean, var = jnp.mean(pred, 0), jnp.var(pred, 0)
    if observation_noise:
        var = var + (jnp.exp(params["log_obs_var"]) if model.emission == "gaussian" else mean)
    std = jnp.sqrt(var)
    return mean, mean - width * std, mean + width * std


def envelope_coverage(lower, upper, y, dim=None) -> float:
    """Fraction of observed y inside [lower, upper] (t >= 1; optionally one dimension)."""
    lower, upper, y = (np.asarray(a)[:, 1:] for a in (lower, upper, y))
    if dim is not None:
        lower, upper, y = lower[..., dim], upper[..., dim], y[..., dim]
    return float(np.mean((y >= lower) & (y <= upper)))


def state_fixed_points(model, params, obs_dim: int, soft_states=None):
    """Fixed points in the projected space of x -> A(z) x + c(z), A(z) = sum_k z_k F S_k,
    c(z) = sum_k z_k F b_k (App. B correspondence).

    ``soft_states=None``: (K, D), one per pure state, x*_k = (I - F S_k)^{-1} F b_k. Otherwise
    ``soft_states`` (M, K) rows on the simplex, e.g. the mean soft state over a segment where the model
    mixes states, gives (M, D) fixed points of the mixed dynamics."""
    F = model.projection(params, obs_dim)
    A = jnp.einsum("dn,kne->kde", F, params["dynamics"])
    c = params["offsets"] @ F.T
    z = jnp.eye(A.shape[0]) if soft_states is None else jnp.asarray(soft_states, A.dtype)
    A_z, c_z = jnp.einsum("mk,kde->mde", z, A), z @ c
    eye = jnp.eye(A.shape[-1])
    return jnp.linalg.solve(eye - A_z, c_z[..., None])[..., 0]


def aligned_state_fixed_points(model, params, y, reference, soft_states=None):
    """:func:`state_fixed_points` carried into a reference frame (e.g. the true latent positions): the
    projected space F y is identified only up to an affine map, so the least-squares affine map from
    F y_t (T, D) to ``reference`` (T, d) on the same steps is applied. ``y``: (T, N); returns (K or M, d)."""
    y = np.asarray(y, float)
    F = np.asarray(model.projection(params, y.shape[-1]))
    _, coef = affine_align(y @ F.T, reference)
    fixed = np.asarray(state_fixed_points(model, params, y.shape[-1], soft_states))
    return np.concatenate([fixed, np.ones((len(fixed), 1))], 1) @ coef
