"""Seeded parallel prefix scan: all prefixes ``seed ∘ e_0 ∘ ... ∘ e_i`` in O(log n) depth, where the seed
is a cheaper object than the elements (a vector against matrices, a filtered Gaussian against affine
Gaussian maps).

``lax.associative_scan`` composes elements with elements at every level, about 2n compositions in all.
When the prefix of interest starts from a seed (the forward filter starts from the initial distribution,
the backward pass from the all-ones message), only the up-sweep needs element-element compositions (about n);
every other step applies a single element to a seed-like prefix, which is O(K^2) instead of O(K^3) for an
HMM. Same depth, about half the matrix-matrix work.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Pytree = Any


def _length(tree: Pytree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _take(tree: Pytree, index: slice) -> Pytree:
    return jax.tree.map(lambda x: x[index], tree)


def _concat(a: Pytree, b: Pytree) -> Pytree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _interleave(even: Pytree, odd: Pytree) -> Pytree:
    """[even_0, odd_0, even_1, odd_1, ...]; ``even`` may be one longer than ``odd``."""
    m = _length(odd)

    def merge(e, o):
        pairs = jnp.stack([e[:m], o], axis=1).reshape((2 * m,) + o.shape[1:])
        return jnp.concatenate([pairs, e[m:]])

    return jax.tree.map(merge, even, odd)


def seeded_prefix_scan(
    combine: Callable[[Pytree, Pytree], Pytree],
    apply: Callable[[Pytree, Pytree], Pytree],
    seed: Pytree,
    elements: Pytree,
) -> Pytree:
    """Prefixes ``p_i = apply(... apply(apply(seed, e_0), e_1) ..., e_i)`` for i = 0..n-1.

    Args:
        combine: composes adjacent elements, batched over a leading axis: ``combine(a, b)`` with ``a``
            earlier must satisfy ``apply(apply(p, a), b) == apply(p, combine(a, b))`` (associativity).
        apply: applies elements to prefixes, batched over a leading axis of both.
        seed: one prefix, without a leading axis.
        elements: pytree with leading axis n >= 0.

    Returns:
        The n prefixes, pytree with leading axis n (for n = 0 the empty batch ``apply`` makes of no elements,
        so callers need no special case for a one-step series).
    """
    return _scan(combine, apply, jax.tree.map(lambda x: x[None], seed), elements)


def _scan(combine, apply, seed, elements):
    n = _length(elements)
    if n <= 1:
        return apply(_take(seed, slice(0, n)), elements)
    m = n // 2
    # prefixes after an even number of elements: the seed scanned over composed pairs (e_{2j}, e_{2j+1})
    pair_prefixes = _scan(combine, apply, seed, combine(_take(elements, slice(0, 2 * m, 2)),
                                                         _take(elements, slice(1, 2 * m, 2))))
    # prefixes after an odd number: one element applied to the prefix just before it
    before = _concat(seed, _take(pair_prefixes, slice(0, n - m - 1)))
    odd_prefixes = apply(before, _take(elements, slice(0, n, 2)))
    return _interleave(odd_prefixes, pair_prefixes)
