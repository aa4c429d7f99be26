"""A minimal gated recurrent unit (GRU) in pure JAX, used by the GDM's recurrent transition and guide.

Parameters are a dict of arrays (so they can be NumPyro sample/param sites):
``W`` (3H, I) input weights, ``U`` (3H, H) recurrent weights, ``b`` (3H,) biases, gate order
(reset r, update u, candidate n):

    r_t = sigmoid(W_r x_t + U_r h_{t-1} + b_r)
    u_t = sigmoid(W_u x_t + U_u h_{t-1} + b_u)
    n_t = tanh(W_n x_t + r_t * (U_n h_{t-1}) + b_n)
    h_t = (1 - u_t) * n_t + u_t * h_{t-1}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gru_init", "gru_cell", "gru_scan", "bigru_scan"]


def gru_init(rng: np.random.Generator, input_dim: int, hidden_dim: int) -> dict[str, np.ndarray]:
    """Uniform(-1/sqrt(H), 1/sqrt(H)) initial weights (the PyTorch convention)."""
    bound = 1.0 / np.sqrt(hidden_dim)
    return {
        "W": rng.uniform(-bound, bound, (3 * hidden_dim, input_dim)),
        "U": rng.uniform(-bound, bound, (3 * hidden_dim, hidden_dim)),
        "b": rng.uniform(-bound, bound, (3 * hidden_dim,)),
    }


def gru_cell(params, h_prev, x):
    """One step: h_prev (..., H), x (..., I) -> h (..., H)."""
    hidden = h_prev.shape[-1]
    gx = x @ params["W"].T + params["b"]
    gh = h_prev @ params["U"].T
    r = jax.nn.sigmoid(gx[..., :hidden] + gh[..., :hidden])
    u = jax.nn.sigmoid(gx[..., hidden : 2 * hidden] + gh[..., hidden : 2 * hidden])
    n = jnp.tanh(gx[..., 2 * hidden :] + r * gh[..., 2 * hidden :])
    return (1.0 - u) * n + u * h_prev


def gru_scan(params, inputs, h0=None, reverse: bool = False):
    """Run the GRU over time: inputs (..., T, I) -> hidden states (..., T, H) (h_t after reading x_t)."""
    hidden = params["U"].shape[-1]
    if h0 is None:
        h0 = jnp.zeros(inputs.shape[:-2] + (hidden,), dtype=inputs.dtype)

    def step(h, x):
        h = gru_cell(params, h, x)
        return h, h

    _, hs = jax.lax.scan(step, h0, jnp.moveaxis(inputs, -2, 0), reverse=reverse)
    return jnp.moveaxis(hs, 0, -2)


def bigru_scan(forward_params, backward_params, inputs):
    """Bidirectional GRU: (..., T, I) -> (..., T, 2H), forward and backward states concatenated."""
    return jnp.concatenate(
        [gru_scan(forward_params, inputs), gru_scan(backward_params, inputs, reverse=True)], axis=-1
    )
