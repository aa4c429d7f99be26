"""Posterior draws: ``{site: (chain, draw, ...)}`` dicts, and mapping per-draw functions over them.

Per-draw quantities (log-likelihood, state posteriors, predictive draws) are computed by a jitted scan
over chunks of ``chunk_size`` draws, vmapped within a chunk, so memory stays bounded for many draws and
long series. The draws are padded to whole chunks (repeating the last draw) so that only one chunk shape
is ever compiled, and the compiled function is cached per (function, chunk size, shapes): calling it again
for the same model costs no compilation.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import seed, substitute, trace

from ppl_switch.compile_cache import CompiledCache, model_key

DEFAULT_CHUNK_SIZE = 64


class Static:
    """Wraps a callable or model as a static argument of ``jax.jit``.

    A model (or a bound method of one) is hashed by its class and ``config()`` (:func:`model_key`), so a
    new instance of the same model reuses the compiled code; anything else by identity (``model.method``
    is a new object on every access, so a bound method is identified by its object and function). The
    jit cache holds the wrapped value, so an id cannot be reused while its entry exists."""

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        owner, func = (value.__self__, value.__func__) if inspect.ismethod(value) else (value, None)
        key = model_key(owner)
        if key is None:
            key = (id(owner),)
        self._key = key if func is None else (key, func)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Static) and other._key == self._key


def chain_draw_shape(samples: Mapping[str, Any]) -> tuple[int, int]:
    if not samples:
        raise ValueError("samples: expected at least one site with (chain, draw, ...) draws")
    shapes = {name: np.shape(value)[:2] for name, value in samples.items()}
    distinct = set(shapes.values())
    if len(distinct) != 1 or len(next(iter(distinct))) != 2:
        raise ValueError(f"samples: every site needs the same leading (chain, draw) dims, got {shapes}")
    return next(iter(distinct))


def flatten_draws(samples: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``{site: (chain * draw, ...)}``"""
    c, d = chain_draw_shape(samples)
    return {name: jnp.reshape(jnp.asarray(v), (c * d,) + np.shape(v)[2:]) for name, v in samples.items()}


def unflatten(tree, num_chains: int, num_draws: int):
    """Reshape the leading ``chain * draw`` axis of every leaf back to (chain, draw), as NumPy."""
    return jax.tree.map(lambda x: np.asarray(x).reshape((num_chains, num_draws) + np.shape(x)[1:]), tree)


def to_chunks(tree, chunk: int):
    """Pad the leading axis (n) to whole chunks by repeating the last entry; -> (num_chunks, chunk, ...)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n

    def split(x):
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    return jax.tree.map(split, tree)


def from_chunks(tree, n: int):
    """Inverse of :func:`to_chunks`: (num_chunks, chunk, ...) -> (n, ...)."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], tree)


@partial(jax.jit, static_argnames=("fn", "chunk"))
def _map_chunked(fn: Static, chunk: int, xs, data):
    n = jax.tree.leaves(xs)[0].shape[0]
    out = jax.lax.map(jax.vmap(lambda x: fn.value(x, data)), to_chunks(xs, chunk))
    return from_chunks(out, n)


def map_draws(fn: Callable, samples: Mapping[str, Any], data, *, key=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """``fn(params, data)`` (or ``fn(key, params, data)`` when ``key`` is given) for every draw.

    Returns fn's output pytree with leading (chain, draw) axes, as NumPy arrays.
    """
    num_chains, num_draws = chain_draw_shape(samples)
    n = num_chains * num_draws
    flat = flatten_draws(samples)
    chunk = max(1, min(int(chunk_size), n))
    if key is None:
        out = _map_chunked(Static(fn), chunk, flat, data)
    else:
        out = _map_chunked(_KeyedFn.of(fn), chunk, (jax.random.split(key, n), flat), data)
    return unflatten(out, num_chains, num_draws)


class _KeyedFn(Static):
    """``(key, params) -> fn(key, params, data)`` as a cached static callable."""

    _cache = CompiledCache("keyed per-draw functions", max_size=64)

    @classmethod
    def of(cls, fn):
        return cls._cache.get_or_make(Static(fn), lambda: cls(lambda kp, data: fn(kp[0], kp[1], data)))


#: compiled draw functions of :func:`draws_from_guide`, by the caller's ``cache_key``
_DRAW_FNS = CompiledCache("posterior draw functions")


def draws_from_guide(program, guide, params, data, names, key, num_draws: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     cache_key=None):
    """``num_draws`` posterior draws from a fitted guide, as ``{name: (1, num_draws, ...)}``.

    Each draw runs the guide (with its fitted ``params``) and then the model program with the guide's
    samples substituted, and keeps the model's values of ``names``: latent sites come from the guide,
    deterministic sites are recomputed by the model, and any latent site the guide does not sample is
    drawn from the model's conditional prior. One compiled function does all of it.

    ``cache_key``: a hashable key saying that ``(program, guide)`` trace to the same functions as on an
    earlier call with this key (same model config, guide kind and data shapes); the function compiled
    then is reused. The guide object of that earlier call is the one traced, which is only valid when
    its structure (sites, plates) is the same: the key must imply it. None: compile afresh.
    """
    names = tuple(names)
    fn = None if cache_key is None else _DRAW_FNS.get((cache_key, names))
    if fn is None:

        def one(k, data_and_params):
            d, p = data_and_params
            guide_key, program_key = jax.random.split(k)
            guide_tr = trace(substitute(seed(guide, guide_key), data=p)).get_trace(d)
            latent = {name: site["value"] for name, site in guide_tr.items() if site["type"] == "sample"}
            model_tr = trace(substitute(seed(program, program_key), data=latent)).get_trace(d)
            return {name: model_tr[name]["value"] for name in names}

        fn = Static(one)
        if cache_key is not None:
            _DRAW_FNS.put((cache_key, names), fn)
    chunk = max(1, min(int(chunk_size), num_draws))
    out = _map_chunked(fn, chunk, jax.random.split(key, num_draws), (data, params))
    return {name: np.asarray(value)[None] for name, value in out.items()}
