"""The EM driver's stopping rules on scripted objective sequences (no model: params counts the iterations
and the E-step reads the objective off a table)."""

import jax
import jax.numpy as jnp
import numpy as np

from ppl_switch.infer.em_loop import PATIENCE, STALL_WINDOW, run_em


def _run(objectives, num_iters, tol=1e-6):
    table = jnp.asarray(objectives, jnp.float32)

    def e_step(p):
        return None, table[p.astype(jnp.int32)], table[p.astype(jnp.int32)]

    run = jax.jit(lambda keys: run_em(lambda key: jnp.asarray(0.0, jnp.float32), e_step, lambda p, stats: p + 1, keys, num_iters, tol))
    out = run(jax.random.split(jax.random.PRNGKey(0), 1))
    return int(out.num_iterations[0]), bool(out.converged[0])


def test_a_jittering_fixed_point_stalls_and_a_slow_climb_goes_on():
    num_iters = 200
    # climbs to -1000 by step 30, then jitters by +-0.1 there (float32 rounding of a sharp objective)
    climb = -1100.0 + 100.0 * np.minimum(np.arange(num_iters + 1), 30) / 30
    jitter = np.where(np.arange(num_iters + 1) > 30, 0.1 * (-1.0) ** np.arange(num_iters + 1), 0.0)
    steps, converged = _run(climb + jitter, num_iters)
    assert converged and steps == 32 + STALL_WINDOW  # its best, -999.9 first at step 32, not beaten in the window after
    # a monotone climb by 0.05 nats a step (above eps |objective|) never stalls: it runs to num_iters
    steps, converged = _run(-1000.0 + 0.05 * np.arange(num_iters + 1), num_iters)
    assert (steps, converged) == (num_iters, False)
    # a flat objective stops by the patience rule first
    steps, converged = _run(np.full(num_iters + 1, -1000.0), num_iters)
    assert converged and steps == PATIENCE
