"""Test configuration: float64 for oracle comparisons (float32 behaviour is tested explicitly)."""

import jax

jax.config.update("jax_enable_x64", True)
