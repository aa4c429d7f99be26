"""Label switching: align the discrete-state labels of all posterior draws before they are written.

A mixture or switching model's likelihood is invariant to permuting its states, so different chains (and
sometimes draws within a chain) may use different labels for the same state. We align them by matching
per-state features (``model.state_features(params)``, shape (K, F), e.g. emission means) across draws:

1. standardise every feature column by its spread over all draws and states, so no feature dominates;
2. match every draw to a reference draw (the first draw of the first chain) with the Hungarian algorithm
   (``scipy.optimize.linear_sum_assignment`` on squared Euclidean distances between state features);
3. average the aligned features into a mean reference and match every draw to it once more (this removes
   the dependence on a possibly atypical first draw);
4. relabel each draw whose permutation is not the identity with ``model.permute_states(params, perm)``.

Convention: ``perm[k]`` is the old label of new state ``k`` (as in ``Model.permute_states``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment


def _draw(samples: Mapping[str, np.ndarray], chain: int, draw: int) -> dict[str, np.ndarray]:
    return {name: value[chain, draw] for name, value in samples.items()}


def _match(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(num_draws, K) permutations so that ``features[n, perm[n]]`` is closest to ``reference`` (K, F)."""
    perms = np.empty(features.shape[:2], dtype=np.int64)
    for n, f in enumerate(features):
        cost = ((reference[:, None, :] - f[None, :, :]) ** 2).sum(-1)  # (new k, old j)
        _, cols = linear_sum_assignment(cost)
        perms[n] = cols
    return perms


def state_feature_draws(model, samples: Mapping[str, Any]) -> np.ndarray | None:
    """(chain, draw, K, F) state features of every draw, or None if the model has none."""
    samples = {name: np.asarray(value) for name, value in samples.items()}
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    rows = []
    for c in range(num_chains):
        for d in range(num_draws):
            f = model.state_features(_draw(samples, c, d))
            if f is None:
                return None
            f = np.asarray(f, dtype=float)
            rows.append(f.reshape(f.shape[0], -1))
    return np.stack(rows).reshape(num_chains, num_draws, *rows[0].shape)


def alignment_permutations(features: np.ndarray) -> np.ndarray:
    """(chain, draw, K) permutations aligning ``features`` (chain, draw, K, F) across all draws."""
    num_chains, num_draws, num_states, num_features = features.shape
    flat = features.reshape(-1, num_states, num_features)
    spread = flat.reshape(-1, num_features).std(axis=0)
    flat = flat / np.where(spread > 0, spread, 1.0)
    perms = _match(flat, flat[0])
    aligned = np.take_along_axis(flat, perms[:, :, None], axis=1)
    perms = _match(flat, aligned.mean(axis=0))
    return perms.reshape(num_chains, num_draws, num_states)


def relabel_draws(model, samples: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Align state labels across all chains and draws.

    Args:
        model: a Model with ``num_states > 0``, ``state_features`` and ``permute_states``.
        samples: ``{site: (chain, draw, ...)}``.

    Returns:
        ``(relabelled samples, perms)``; perms is (chain, draw, K) int with ``perm[k]`` = old label of new
        state k (identity everywhere for a model without states or features).
    """
    samples = {name: np.array(value) for name, value in samples.items()}
    if not samples:
        raise ValueError("samples: expected at least one site")
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    num_states = int(getattr(model, "num_states", 0) or 0)
    identity = np.broadcast_to(np.arange(max(num_states, 1)), (num_chains, num_draws, max(num_states, 1))).copy()
    if num_states < 2:
        return samples, identity
    features = state_feature_draws(model, samples)
    if features is None:
        return samples, identity
    if features.shape[2] != num_states:
        raise ValueError(
            f"model.state_features: expected {num_states} rows (one per state), got shape {features.shape[2:]}"
        )
    perms = alignment_permutations(features)
    for c, d in zip(*np.nonzero((perms != np.arange(num_states)).any(-1))):
        permuted = model.permute_states(_draw(samples, c, d), perms[c, d])
        for name, value in permuted.items():
            if name in samples:
                samples[name][c, d] = np.asarray(value)
    return samples, perms


def num_permuted(perms: np.ndarray) -> int:
    """Number of draws whose permutation is not the identity."""
    return int((perms != np.arange(perms.shape[-1])).any(-1).sum())
