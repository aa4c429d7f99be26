"""Generic metrics for state-space fits: R², permutation-matched state accuracy, affine-aligned R²,
k-nearest-neighbour classification. NumPy on host (the inputs are small summaries)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["r2_score", "matched_state_accuracy", "affine_align", "affine_aligned_r2", "knn_classify"]


def _masked(y, mask):
    y = np.asarray(y, float)
    return np.ones(y.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), y.shape)


def r2_score(y_true, y_pred, mask=None) -> float:
    """Unweighted mean over dimensions of R²_n = 1 - SS_res / (SS_tot + 1e-8) (the GDM code's convention).

    Args:
        y_true, y_pred: (..., time, dim); leading axes are pooled with time.
        mask: optional bool like ``y_true``; only True entries count.
    """
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_pred: expected shape {y_true.shape} like y_true, got {y_pred.shape}")
    m = _masked(y_true, mask).reshape(-1, y_true.shape[-1])
    yt, yp = y_true.reshape(-1, y_true.shape[-1]), y_pred.reshape(-1, y_true.shape[-1])
    count = m.sum(0)
    mean = np.where(m, yt, 0).sum(0) / np.maximum(count, 1)
    ss_res = np.where(m, (yt - yp) ** 2, 0).sum(0)
    ss_tot = np.where(m, (yt - mean) ** 2, 0).sum(0)
    return float(np.mean(1.0 - ss_res / (ss_tot + 1e-8)))


def _confusion(true_states, inferred_states, num_states: Optional[int]) -> np.ndarray:
    """(K, K) counts with ``[inferred, true]``."""
    t, z = np.asarray(true_states).ravel(), np.asarray(inferred_states).ravel()
    if t.shape != z.shape:
        raise ValueError(f"inferred_states: expected {t.size} labels like true_states, got {z.size}")
    k = int(max(t.max(), z.max()) + 1) if num_states is None else int(num_states)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (z, t), 1)
    return confusion


def match_states(true_states, inferred_states, num_states: Optional[int] = None) -> np.ndarray:
    """The relabelling of the truth that best agrees with the inferred labels.

    Returns ``perm`` (K,) with ``perm[true_label] = inferred_label`` (Hungarian on the confusion), so
    ``perm[true_states]`` is the truth written in the inferred labels.
    """
    rows, cols = linear_sum_assignment(-_confusion(true_states, inferred_states, num_states))
    perm = np.empty(len(cols), dtype=int)
    perm[cols] = rows
    return perm


def matched_state_accuracy(true_states, inferred_states, num_states: Optional[int] = None) -> float:
    """Accuracy after the best one-to-one relabelling of inferred states (Hungarian on the confusion)."""
    confusion = _confusion(true_states, inferred_states, num_states)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / confusion.sum())


def affine_align(source, target):
    """Least-squares affine map source (T, d) -> target (T, e); returns (aligned (T, e), A (d+1, e))."""
    src = np.concatenate([np.asarray(source, float), np.ones((len(source), 1))], 1)
    coef, *_ = np.linalg.lstsq(src, np.asarray(target, float), rcond=None)
    return src @ coef, coef


def affine_aligned_r2(source, target) -> float:
    """R² of ``target`` by the best affine map of ``source`` (latents are identified up to affine maps)."""
    aligned, _ = affine_align(source, target)
    return r2_score(target, aligned)


def knn_classify(train_features, train_labels, test_features, k: int = 10) -> np.ndarray:
    """k-nearest-neighbour majority vote (Euclidean, uniform weights; ties go to the smallest label,
    like scikit-learn's KNeighborsClassifier)."""
    xtr, xte = np.asarray(train_features, float), np.asarray(test_features, float)
    labels = np.asarray(train_labels).astype(int)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features: expected (n, d) train and (m, d) test arrays, got {xtr.shape} and {xte.shape}")
    if len(labels) != len(xtr):
        raise ValueError(f"train_labels: expected {len(xtr)} labels, got {len(labels)}")
    k = int(min(k, len(xtr)))
    d2 = (xte**2).sum(1)[:, None] - 2 * xte @ xtr.T + (xtr**2).sum(1)[None]
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(xte), labels.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(len(xte)), k), labels[nearest].ravel()), 1)
    return np.argmax(votes, 1)
