"""Latent-SDE fits (gpSLDS, GP-SDE): SVI stages separated by a MAP refinement of the latent path.

SVI moves the per-step mean path of the Gauss–Markov q(x) slowly. On the two-rotation benchmark (seed 0,
1500 steps) the fitted mean path's log joint under the fitted parameters is about 33,000 nats below that of
the most probable path given the same parameters, and that path is much closer to the truth (latent R² 0.984
against 0.950 after affine alignment). Restarting SVI from it reaches a better ELBO and a better flow field
(benchmarks/results.md, gpSLDS history). The paper's variational EM makes the analogous move on q(x) by forward–backward sweeps; here
the path step is a deterministic L-BFGS maximisation of

    log p(x | theta) + log p(y | x, theta)          (Euler–Maruyama prior, the model's emissions)

at theta = the posterior mean of the fitted parameter guide, and SVI then refits everything (q(x) and the
parameters) starting from that path and those parameters.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppl_switch.data import SequenceData, check_positive_int
from ppl_switch.infer.prepare import check_float
from ppl_switch.infer.svi import DEFAULT_CLIP_NORM, fit_svi

__all__ = ["map_path", "fit_svi_with_path_refinement", "split_step_optimizer"]


def _require_latent_sde(model):
    if not (hasattr(model, "path_distribution") and hasattr(model, "emission_log_prob") and hasattr(model, "default_guide")):
        raise TypeError(f"model: expected a latent-SDE model (GPSLDS, GPSDE) with path_distribution and "
                        f"emission_log_prob, got {type(model).__name__}")


def _negative_log_joint(model, theta, data, x):
    """-(log p(x | theta) + log p(y | x, theta)) of a path x (trials, time, latent_dim)."""
    return -(jnp.sum(model.path_distribution(theta, data).log_prob(x)) + jnp.sum(model.emission_log_prob(theta, x, data)))


#: :func:`_negative_log_joint` compiled once per model (the model is a static, hashable argument)
path_negative_log_joint = jax.jit(_negative_log_joint, static_argnums=0)
_LBFGS = optax.lbfgs()


@partial(jax.jit, static_argnums=(0, 1))
def _lbfgs_steps(model, num_steps, theta, data, x, state):
    """``num_steps`` L-BFGS steps on the negative log joint. theta and the data are arguments, not constants
    folded into the compiled program, so one compilation serves every call with the same model and shapes."""
    def objective(path):
        return _negative_log_joint(model, theta, data, path)

    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry, _):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = _LBFGS.update(grad, state, x, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(x, updates), state), None

    (x, state), _ = jax.lax.scan(body, (x, state), None, length=num_steps)
    return x, state


def map_path(model, params, data, init_path, *, max_iters: int = 2000, tolerance: float = 1e-5, check_every: int = 100):
    """The most probable latent path given parameters, by L-BFGS from ``init_path``.

    Args:
        model: a latent-SDE model (:class:`~ppl_switch.models.gpslds.GPSLDS`, ``GPSDE``).
        params: {site: value} of every parameter site (no ``x``), e.g. posterior means.
        data: the fitted SequenceData (or raw y).
        init_path: (trials, time, latent_dim) start, e.g. the fit's posterior-mean path.
        max_iters: L-BFGS iterations at most.
        tolerance: stop when the log joint changes by less than ``tolerance`` * |log joint| over
            ``check_every`` iterations.

    Returns:
        (path (trials, time, latent_dim), info {"start_log_joint", "log_joint", "iterations", "converged"}).

    Raises:
        FloatingPointError: the log joint became non-finite (the message gives the iteration).
    """
    _require_latent_sde(model)
    max_iters = check_positive_int(max_iters, "max_iters")
    check_every = check_positive_int(check_every, "check_every")
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    expected = (data.num_trials, data.num_timesteps, model.latent_dim)
    if np.shape(init_path) != expected:
        raise ValueError(f"init_path: expected shape (trials, time, latent_dim) = {expected}, got {np.shape(init_path)}")
    dtype = jnp.result_type(float)
    jdata = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), data)
    theta = {k: jnp.asarray(v, dtype) for k, v in params.items() if k != "x"}

    x = jnp.asarray(init_path, dtype)
    state = _LBFGS.init(x)
    start = float(path_negative_log_joint(model, theta, jdata, x))
    if not np.isfinite(start):
        raise FloatingPointError("map_path: the log joint of init_path is not finite; check the parameters and the start")
    previous, done, converged = start, 0, False
    while done < max_iters:
        x, state = _lbfgs_steps(model, check_every, theta, jdata, x, state)
        done += check_every
        current = float(path_negative_log_joint(model, theta, jdata, x))
        if not np.isfinite(current):
            raise FloatingPointError(f"map_path: the log joint became non-finite within iterations {done - check_every}-{done}")
        if abs(previous - current) < tolerance * abs(current):
            converged = True
            break
        previous = current
    return np.asarray(x), {"start_log_joint": -start, "log_joint": -current, "iterations": done, "converged": converged}


def posterior_mean_parameters(guide, fit, data, *, num_draws: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """{site: mean over ``num_draws`` parameter draws of the fitted guide} (x excluded)."""
    draws = guide.sample_parameters(jax.random.PRNGKey(seed), fit.params, num_draws, data=data)
    return {k: np.asarray(v).mean(0) for k, v in draws.items() if k != "x"}


def split_step_optimizer(learning_rate: float, path_learning_rate: float) -> optax.GradientTransformation:
    """The default optimiser (global-norm clipping, then Adam) with its own Adam step size for the guide's
    mean path ``x_mean``: Adam moves every coordinate by about its step size whatever the gradient, so
    at 0.02 the 150,000 mean-path values of the benchmark jitter by about 0.02 each, which the Euler prior
    charges about (0.02)^2 / dt nats per step and dimension."""
    def labels(params):
        return {name: "path" if name == "x_mean" else "rest" for name in params}

    return optax.chain(optax.clip_by_global_norm(DEFAULT_CLIP_NORM),
                       optax.multi_transform({"path": optax.adam(path_learning_rate), "rest": optax.adam(learning_rate)},
                                             labels))


def fit_svi_with_path_refinement(model, data, *, num_steps: int = 1500, refine_steps: int = 500, num_rounds: int = 1,
                                 learning_rate: float = 0.02, path_learning_rate=None, latent_scale: float = 3.0,
                                 seed: int = 0, num_draws: int = 200, map_iters: int = 2000, progress_bar: bool = False):
    """SVI, then ``num_rounds`` times: the MAP path given the posterior-mean parameters, and SVI again
    (``refine_steps``) from that path and those parameters (the default joint guide throughout).

    Args:
        model: a latent-SDE model; data: y or a SequenceData.
        num_steps: steps of the first SVI stage, from ``model.default_guide(data, latent_scale=latent_scale)``.
        refine_steps: steps of each later stage, from ``model.default_guide(data, init_values=...)``.
        num_rounds: path refinements (0: plain :func:`fit_svi`).
        learning_rate: Adam step size. path_learning_rate: Adam step size of the mean path ``x_mean`` in the
            refinement stages (:func:`split_step_optimizer`); None: ``learning_rate`` for everything.
        num_draws: posterior draws of each stage's fit; map_iters: L-BFGS iterations at most per path.

    Returns:
        (the last stage's Fit, its guide, history: one dict per stage, ``{"stage": "svi", "steps",
        "final_loss"}`` (mean of the last 100 losses) or ``{"stage": "map_path", ...}`` (:func:`map_path`'s info)).
    """
    _require_latent_sde(model)
    for name, value in dict(num_steps=num_steps, refine_steps=refine_steps).items():
        check_positive_int(value, name)
    num_rounds = check_positive_int(num_rounds, "num_rounds", minimum=0)
    data = data if isinstance(data, SequenceData) else model.prepare(data)
    history = []

    if path_learning_rate is not None:
        path_learning_rate = check_float(path_learning_rate, "path_learning_rate", 0.0)
    refine_optimizer = None if path_learning_rate is None else split_step_optimizer(learning_rate, path_learning_rate)

    def stage(guide, steps, stage_seed, optimizer=None):
        fit = fit_svi(model, data, guide=guide, num_steps=steps, learning_rate=learning_rate, optimizer=optimizer,
                      seed=stage_seed, num_draws=num_draws, progress_bar=progress_bar)
        history.append({"stage": "svi", "steps": steps, "final_loss": float(np.mean(np.asarray(fit.losses)[-100:]))})
        return fit

    guide = model.default_guide(data, latent_scale=latent_scale)
    fit = stage(guide, num_steps, seed)
    for r in range(num_rounds):
        theta = posterior_mean_parameters(guide, fit, data, seed=seed + 1 + r)
        mean_path = np.asarray(fit.samples["x"]).reshape((-1,) + np.shape(fit.samples["x"])[2:]).mean(0)
        path, info = map_path(model, theta, data, mean_path, max_iters=map_iters)
        history.append({"stage": "map_path", **info})
        guide = model.default_guide(data, init_values={**theta, "x": path})
        fit = stage(guide, refine_steps, seed + 1 + r, refine_optimizer)
    return fit, guide, history
