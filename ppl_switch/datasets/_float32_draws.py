"""Generators that draw with ``jax.random`` give different numbers for the same key in float32 and float64
(the samplers depend on the dtype), so a seed would name two data sets depending on whether the caller had
turned on ``jax_enable_x64``. Such generators run with 64-bit mode off: a seed names one data set."""

from __future__ import annotations

import functools

import jax


def float32_draws(generator):
    """Decorator: run ``generator`` with ``jax_enable_x64`` off (its arrays come back as float32 / int32)."""

    @functools.wraps(generator)
    def run(*args, **kwargs):
        with jax.enable_x64(False):
            return generator(*args, **kwargs)

    return run
