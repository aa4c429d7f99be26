"""Per-draw quantities computed after fitting: pointwise log-likelihood, posterior predictive draws and
discrete-state decoding. All take ``samples`` as ``{site: (chain, draw, ...)}`` and return NumPy arrays.

Conventions for steps past a trial's length (padding): log-likelihood 0, predictive ``y`` NaN, state
marginals NaN, Viterbi and sampled states -1.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.data import SequenceData
from ppl_switch.infer.draws import DEFAULT_CHUNK_SIZE, Static, chain_draw_shape, flatten_draws, from_chunks, map_draws, to_chunks
from ppl_switch.infer.prepare import device_data


def _as_device(data: SequenceData) -> SequenceData:
    return device_data(data) if isinstance(data.y, np.ndarray) else data


def _time_mask(data: SequenceData) -> np.ndarray:
    return np.arange(data.y.shape[1])[None, :] < np.asarray(data.lengths)[:, None]


def pointwise_log_likelihood(model, samples: Mapping[str, Any], data: SequenceData, *, chunk_size=DEFAULT_CHUNK_SIZE):
    """(chain, draw, trial, time) ``model.log_likelihood`` per draw; exactly 0 at steps with no observed entry."""
    dev = _as_device(data)
    ll = map_draws(model.log_likelihood, samples, dev, chunk_size=chunk_size)
    expected = tuple(chain_draw_shape(samples)) + data.y.shape[:2]
    if ll.shape != expected:
        raise ValueError(f"model.log_likelihood: expected shape (trials, time) per draw -> {expected}, got {ll.shape}")
    observed = np.asarray(data.mask).any(-1)
    return np.where(observed, ll, 0.0)


def posterior_predictive_draws(model, samples, data: SequenceData, key, *, chunk_size=DEFAULT_CHUNK_SIZE):
    """(chain, draw, trial, time, obs) replicated observations, one per draw; NaN past each trial's length."""
    dev = _as_device(data)
    y = map_draws(model.posterior_predictive, samples, dev, key=key, chunk_size=chunk_size)
    expected = tuple(chain_draw_shape(samples)) + data.y.shape
    if y.shape != expected:
        raise ValueError(f"model.posterior_predictive: expected shape like data.y -> {expected}, got {y.shape}")
    return np.where(_time_mask(data)[..., None], y, np.nan)


@partial(jax.jit, static_argnames=("model", "chunk", "with_paths"))
def _decode_chunked(model: Static, chunk: int, with_paths: bool, flat, keys, data):
    """Mean state marginals, and per-draw Viterbi and sampled paths, scanning over padded chunks."""
    n = keys.shape[0]
    model = model.value

    def one(params, k):
        post = model.state_posterior(params, data)
        path = model.sample_states(k, params, data) if with_paths else jnp.zeros_like(post["viterbi"])
        return post["state_probs"], post["viterbi"].astype(jnp.int32), path.astype(jnp.int32)

    def body(total, chunk_in):
        params, k, w = chunk_in
        probs, viterbi, paths = jax.vmap(one)(params, k)
        return total + jnp.tensordot(w.astype(probs.dtype), probs, axes=1), (viterbi, paths)

    params_chunks, key_chunks = to_chunks((flat, keys), chunk)
    # padding repeats the last draw; those copies get weight 0 in the mean
    weights = (jnp.arange(key_chunks.shape[0] * chunk) < n).reshape(key_chunks.shape[:2])
    chunks = (params_chunks, key_chunks, weights)
    probs_shape = jax.eval_shape(one, jax.tree.map(lambda x: x[0], flat), keys[0])[0]
    total, paths = jax.lax.scan(body, jnp.zeros(probs_shape.shape, probs_shape.dtype), chunks)
    viterbi, sampled = from_chunks(paths, n)
    return total / n, viterbi, sampled


def posterior_states(
    model,
    samples: Mapping[str, Any],
    data: SequenceData,
    *,
    key: Optional[jax.Array] = None,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sample_paths: bool = True,
) -> dict[str, np.ndarray]:
    """Decode the discrete states of every draw.

    For each draw, ``model.state_posterior(params, data)`` gives smoothed marginals and the Viterbi path;
    ``model.sample_states(key, params, data)`` gives one posterior path (skipped if the model does not
    implement it or ``sample_paths=False``). Draws are processed in vmapped chunks of ``chunk_size``
    and the marginals are averaged on the fly, so memory does not grow with the number of draws.

    Returns:
        ``state_probs``: (trial, time, state) posterior mean marginals (NaN past each trial's length);
        ``viterbi``: (chain, draw, trial, time) int32 MAP paths per draw (-1 past the length);
        ``state_samples``: (chain, draw, trial, time) int32 sampled paths (-1 past the length).
    """
    from ppl_switch.infer.prepare import implements

    if int(getattr(model, "num_states", 0) or 0) < 1:
        raise ValueError(f"model {getattr(model, 'name', model)!r} has no discrete states (num_states = 0)")
    num_chains, num_draws = chain_draw_shape(samples)
    n = num_chains * num_draws
    chunk = max(1, min(int(chunk_size), n))
    if key is None:
        key = jax.random.PRNGKey(seed)
    with_paths = sample_paths and implements(model, "sample_states")
    probs, viterbi, paths = _decode_chunked(
        Static(model), chunk, with_paths, flatten_draws(samples), jax.random.split(key, n), _as_device(data)
    )
    probs, viterbi, paths = np.asarray(probs), np.asarray(viterbi), np.asarray(paths)
    num_trials, num_steps = data.y.shape[:2]
    if probs.shape[:2] != (num_trials, num_steps) or viterbi.shape[1:] != (num_trials, num_steps):
        raise ValueError(
            "model.state_posterior: expected state_probs (trials, time, K) and viterbi (trials, time), got "
            f"{probs.shape} and {viterbi.shape[1:]}"
        )
    inside = _time_mask(data)
    out = {
        "state_probs": np.where(inside[..., None], probs, np.nan),
        "viterbi": np.where(inside, viterbi, -1).reshape(num_chains, num_draws, num_trials, num_steps),
    }
    if with_paths:
        out["state_samples"] = np.where(inside, paths, -1).reshape(num_chains, num_draws, num_trials, num_steps)
    return out
