"""Recurrent transition logits of the rSLDS: p(z_t = j | z_{t-1} = i, x_{t-1}, u_t) = softmax_j(logits_ij).

Three forms (K regimes, latent dim D, input dim U)::

    "recurrent"       logits_ij = R_ij + W_j . x_{t-1} + r_j (+ V_j . u_t)
    "recurrent_only"  logits_ij =        W_j . x_{t-1} + r_j (+ V_j . u_t)      (rows equal: z_{t-1} ignored)
    "sticky"          logits_ij = kappa [i == j] + W_j . x_{t-1} + r_j (+ V_j . u_t),   kappa >= 0

Parameter names (sites of the model): ``transition_weights`` W (K, D), ``transition_bias`` r (K,),
``transition_state_logits`` R (K, K) ("recurrent"), ``transition_stickiness`` kappa () ("sticky"),
``transition_input_weights`` V (K, U) (U > 0). Pure JAX; one parameter draw, any leading axes on x.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TRANSITION_KINDS = ("recurrent", "recurrent_only", "sticky")


class TransitionPrior(NamedTuple):
    """Independent normal priors (loc, scale) on each transition site; ``stickiness`` is half-normal."""

    loc: dict
    scale: dict


def transition_site_names(kind: str, input_dim: int) -> tuple[str, ...]:
    """The parameter names a transition form uses."""
    names = ["transition_weights", "transition_bias"]
    if kind == "recurrent":
        names.append("transition_state_logits")
    elif kind == "sticky":
        names.append("transition_stickiness")
    if input_dim:
        names.append("transition_input_weights")
    return tuple(names)


def transition_logits(kind: str, params, x_prev, u_next=None):
    """Logits (..., K, K), row i = previous regime, column j = next regime.

    Args:
        kind: one of :data:`TRANSITION_KINDS`.
        params: dict with the sites of :func:`transition_site_names`.
        x_prev: (..., D) previous continuous state.
        u_next: (..., U) input at the destination step, or None.
    """
    W = jnp.asarray(params["transition_weights"])
    base = x_prev @ W.T + jnp.asarray(params["transition_bias"])  # (..., K)
    if u_next is not None and "transition_input_weights" in params:
        base = base + u_next @ jnp.asarray(params["transition_input_weights"]).T
    K = W.shape[0]
    logits = jnp.broadcast_to(base[..., None, :], base.shape[:-1] + (K, K))
    if kind == "recurrent":
        logits = logits + jnp.asarray(params["transition_state_logits"])
    elif kind == "sticky":
        logits = logits + jnp.asarray(params["transition_stickiness"]) * jnp.eye(K, dtype=logits.dtype)
    return logits


def path_transition_logits(kind: str, params, x, inputs=None):
    """(T-1, K, K) logits of the moves z_t -> z_{t+1} along one path x (T, D); inputs (T, U) or None."""
    u = None if inputs is None or inputs.shape[-1] == 0 else inputs[1:]
    return transition_logits(kind, params, x[:-1], u)


def path_transition_matrices(kind: str, params, x, inputs=None):
    """(T-1, K, K) time-varying transition matrices (rows sum to one) along one path x (T, D)."""
    return jax.nn.softmax(path_transition_logits(kind, params, x, inputs), axis=-1)


def regime_partition(kind: str, params, points, previous_state=None):
    """Most likely next regime at each point of latent space, (...,) int.

    For "recurrent_only" the answer does not depend on the previous regime; for the other forms it is
    taken from row ``previous_state`` (default: the row average of the logits, i.e. the location part
    W x + r plus the mean of each column of R / of the sticky diagonal).
    """
    logits = transition_logits(kind, params, points)
    row = logits.mean(-2) if previous_state is None else logits[..., previous_state, :]
    return jnp.argmax(row, -1)


__all__ = [
    "TRANSITION_KINDS",
    "TransitionPrior",
    "transition_site_names",
    "transition_logits",
    "path_transition_logits",
    "path_transition_matrices",
    "regime_partition",
]
