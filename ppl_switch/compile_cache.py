"""Caches of compiled programs, and the keys that say when a compiled program can be reused.

A fit compiles programs (SVI steps, EM loops, posterior draws, a guide's set-up) that depend only on the
model's class and configuration, the data's pytree structure, shapes and dtypes, and the precision. Keyed
by these (:func:`model_key`, :func:`shapes_key`), a later fit of an equal model on equally shaped data
reuses them instead of compiling again (compiling is most of a small fit's time, benchmarks/results.md).

Every cache is a :class:`CompiledCache`: it keeps its newest ``max_size`` entries, so a session that fits
many shapes does not grow without bound, and :func:`cold` empties all of them for a block (a first fit
measured or tested as a user's first fit runs) and puts the entries back after.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CompiledCache", "cold", "freeze", "model_key", "shapes_key"]

#: every cache made, so that :func:`cold` can reach them
_ALL: list["CompiledCache"] = []


class CompiledCache:
    """``key -> compiled program``, oldest out beyond ``max_size`` entries (None: unbounded, for a handful
    of fixed keys). ``keep_alive`` objects are held with an entry when its key uses their ``id``: while the
    entry exists the id cannot be reused by another object."""

    def __init__(self, name: str, max_size: Optional[int] = 32):
        self.name = name
        self.max_size = max_size
        self._entries: dict = {}
        _ALL.append(self)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, oldest first."""
        return iter(list(self._entries))

    def swap_entries(self, entries: dict) -> dict:
        """Replace every entry by ``entries`` (as this method returned them); returns the ones replaced."""
        old, self._entries = self._entries, entries
        return old

    def __getitem__(self, key: Hashable) -> Any:
        return self._entries[key][0]

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.put(key, value)

    def get(self, key: Hashable, default: Any = None) -> Any:
        entry = self._entries.get(key)
        return default if entry is None else entry[0]

    def put(self, key: Hashable, value: Any, keep_alive: Any = None) -> Any:
        """Store ``value`` under ``key`` (the oldest entries go beyond ``max_size``); returns ``value``."""
        self._entries[key] = (value, keep_alive)
        while self.max_size is not None and len(self._entries) > self.max_size:
            self._entries.pop(next(iter(self._entries)))
        return value

    def get_or_make(self, key: Optional[Hashable], make: Callable[[], Any], keep_alive: Any = None) -> Any:
        """The value under ``key``, else ``make()`` stored there; ``key`` None: ``make()``, not stored."""
        if key is None:
            return make()
        if key not in self._entries:
            return self.put(key, make(), keep_alive)
        return self._entries[key][0]

    def __repr__(self) -> str:
        return f"CompiledCache({self.name!r}, {len(self)} of {self.max_size} entries)"


@contextlib.contextmanager
def cold() -> Iterator[None]:
    """Inside the block every cache starts empty (what a new process compiles, it compiles); after it, each
    cache holds what it held before. JAX's own caches (jit, the persistent compilation cache) are not
    touched."""
    saved = [(cache, cache.swap_entries({})) for cache in _ALL]
    try:
        yield
    finally:
        for cache, entries in saved:
            cache.swap_entries(entries)


def freeze(value) -> Hashable:
    """A hashable, value-equal stand-in for a config value (dicts, lists, arrays, scalars)."""
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(freeze(v) for v in value)
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        array = np.asarray(value)
        return ("array", array.dtype.str, array.shape, array.tobytes())
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return value


def model_key(model) -> Optional[tuple]:
    """``(type, frozen model.config())``: models of the same class and config trace to the same program,
    so compiled functions are shared between them (a new ``HMM(3, obs_dim=2)`` per fit reuses the first
    one's compilations). None for an object without a usable ``config()`` (then identity is the key)."""
    config = getattr(model, "config", None)
    if not callable(config):
        return None
    try:
        return (type(model), freeze(config()))
    except Exception:  # no config (NotImplementedError) or an unusual one: fall back to identity
        return None


def labelled_model_key(label, model) -> Optional[tuple]:
    """``(label, model_key(model))`` (e.g. a guide's start strategy and its model), or None where the model
    has no key: a ``(label, None)`` key would let unrelated models share one compiled program."""
    key = model_key(model)
    return None if key is None else (label, key)


def shapes_key(tree) -> tuple:
    """The pytree structure, leaf shapes and dtypes of ``tree`` and the precision: what a trace depends on
    besides the program."""
    leaves, treedef = jax.tree.flatten(tree)
    return (str(treedef), tuple((jnp.shape(x), str(jnp.result_type(x))) for x in leaves), bool(jax.config.jax_enable_x64))
