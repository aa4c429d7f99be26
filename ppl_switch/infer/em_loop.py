"""The EM driver shared by the HMM, ARHMM and LDS EMs: the whole iteration loop as one
``lax.while_loop`` and the restarts as one ``vmap``, so a fit is a single compiled program.

A family supplies three pure functions of JAX arrays:

* ``init(key) -> params``: a starting point for one restart;
* ``e_step(params) -> (stats, log_likelihood, objective)``: expected sufficient statistics at
  ``params``, the data log-likelihood there, and the EM objective (log-likelihood, plus the log prior
  under MAP);
* ``m_step(params, stats) -> params``: the (conditional) maximiser.

The loop stops after ``num_iters`` M-steps, when the objective has moved by less than
``max(tol, eps |objective|)`` in ``PATIENCE`` consecutive iterations (the second term: changes below the
float resolution are noise; the patience: EM can crawl across a plateau with gains near that
resolution before it speeds up again, and one small step is no evidence of convergence), or when it has
stalled: its best value of the last ``STALL_WINDOW`` iterations exceeds its best before them by less than
that threshold. The last rule ends restarts at a fixed point whose float32 objective jitters by more than
the threshold (a near-singular covariance makes the log-determinant sensitive to the last bit of the
parameters: +-0.1 nats at -22,900 measured, so they ran to ``num_iters`` and held every restart's loop);
a restart still climbing beats its old best within the window and goes on.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.compile_cache import CompiledCache, model_key
from ppl_switch.infer.sharding import replicate, resolve_mesh, shard_trials

#: consecutive small changes of the objective that count as convergence
PATIENCE = 3
#: iterations without a new best objective (beyond the threshold) after which a restart has stalled
STALL_WINDOW = 20


class EMRun(NamedTuple):
    """Per-restart output of :func:`run_em` (leading axis: restarts R).

    Attributes:
        params: the final parameters (pytree, leading axis R).
        log_likelihoods: (R, num_iters + 1) log-likelihood at the start of every iteration, then at the
            final parameters in entry ``num_iterations``; NaN after it.
        objectives: (R, num_iters + 1) the EM objective, laid out the same way.
        num_iterations: (R,) M-steps taken.
        converged: (R,) stopped by the tolerance or stalled (not by ``num_iters``).
    """

    params: Any
    log_likelihoods: jax.Array
    objectives: jax.Array
    num_iterations: jax.Array
    converged: jax.Array


def run_em(init: Callable, e_step: Callable, m_step: Callable, keys, num_iters: int, tol: float) -> EMRun:
    """Run EM from ``init(key)`` for every key in ``keys`` (R, 2) in one vmapped while loop.

    Traceable: call it inside ``jax.jit`` with ``num_iters`` static.
    """

    def one(key):
        p0 = init(key)
        # every iteration: E-step at p_i (its objective is recorded), then p_{i+1} = M(p_i) unless
        # the objective has stopped moving; the E-step and M-step are traced once each
        dtype = jnp.result_type(*jax.tree.leaves(p0))
        nan = jnp.full((num_iters + 1,), jnp.nan, dtype)
        eps = jnp.finfo(dtype).eps

        def cond(carry):
            i, _, _, _, _, _, done = carry
            return (i <= num_iters) & ~done

        def body(carry):
            i, p, obj_prev, small, lls, objs, _ = carry
            stats, ll, obj = e_step(p)
            lls, objs = lls.at[i].set(ll), objs.at[i].set(obj)
            threshold = jnp.maximum(tol, eps * jnp.abs(obj))
            is_small = (i > 0) & (jnp.abs(obj - obj_prev) < threshold)
            small = jnp.where(is_small, small + 1, 0)
            step = jnp.arange(num_iters + 1)
            best_before = jnp.max(jnp.where(step <= i - STALL_WINDOW, objs, -jnp.inf))
            best_recent = jnp.max(jnp.where((step > i - STALL_WINDOW) & (step <= i), objs, -jnp.inf))
            stalled = (i >= STALL_WINDOW) & (best_recent - best_before < threshold)
            done = (small >= PATIENCE) | stalled | (i == num_iters) | ~jnp.isfinite(obj)
            p_new = m_step(p, stats)
            p = jax.tree.map(lambda new, old: jnp.where(done, old, new), p_new, p)
            return i + 1, p, obj, small, lls, objs, done

        carry = (jnp.asarray(0), p0, jnp.asarray(jnp.nan, dtype), jnp.asarray(0), nan, nan, jnp.asarray(False))
        i, p, obj, _, lls, objs, done = jax.lax.while_loop(cond, body, carry)
        n = i - 1  # M-steps taken: the last E-step evaluated the returned parameters
        converged = (n < num_iters) & jnp.isfinite(obj)
        return EMRun(p, lls, objs, n, converged)

    return jax.vmap(one)(keys)


def compiled_program(cache: CompiledCache, build: Callable, model, *options):
    """``build(model, *options)``, built once per process for a model configuration (:func:`model_key`) and
    options: models with equal configurations share it, so a new instance does not recompile (a model
    without a ``config()`` is built afresh)."""
    mkey = model_key(model)
    return cache.get_or_make(None if mkey is None else (mkey,) + options, lambda: build(model, *options))


def run_on_devices(run: Callable, keys, data, dtype, start, devices) -> EMRun:
    """Call a compiled EM program ``run(keys, y, mask, lengths, inputs, start)`` on ``data``: on JAX's
    default device, or (``devices`` not None) with the trials padded and split over the devices
    (:mod:`ppl_switch.infer.sharding`) and the restart keys and start replicated."""
    mesh = resolve_mesh(devices)
    if mesh is None:
        inputs = None if data.inputs is None else jnp.asarray(data.inputs, dtype)
        return run(keys, jnp.asarray(data.y, dtype), jnp.asarray(data.mask), jnp.asarray(data.lengths), inputs, start)
    placed = shard_trials(data, mesh, dtype)
    return run(replicate(keys, mesh), placed.y, placed.mask, placed.lengths, placed.inputs, replicate(start, mesh))


def best_restart(run: EMRun) -> tuple[int, dict]:
    """Index of the restart with the highest final objective, and the history dict a Fit stores."""
    n = np.asarray(run.num_iterations)
    objs = np.asarray(run.objectives, dtype=float)
    lls = np.asarray(run.log_likelihoods, dtype=float)
    final = objs[np.arange(len(n)), n]
    if not np.isfinite(final).any():
        raise FloatingPointError("EM: every restart ended with a non-finite objective (check the data's scale)")
    best = int(np.nanargmax(np.where(np.isfinite(final), final, -np.inf)))
    history = {
        "log_likelihoods": lls[best, : n[best] + 1],
        "objective": objs[best, : n[best] + 1],
        "restart_objectives": final,
        "num_iterations": int(n[best]),
        "converged": bool(np.asarray(run.converged)[best]),
    }
    return best, history
