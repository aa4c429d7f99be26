"""Stochastic variational inference runner.

The optimisation runs as jitted ``lax.scan`` chunks of SVI steps (about 50 chunks per fit) so that a
progress bar can be updated between chunks without leaving compiled code per step. Each step checks the
loss and the updated parameters; on the first non-finite one the state is frozen at the last good
parameters, the run stops after the chunk, and a :class:`FitError` names the offending sites.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_median
from numpyro.optim import _NumPyroOptim, optax_to_numpyro

from ppl_switch.infer.checks import data_scale_warnings, emit, moving_objective_warnings, require_finite
from ppl_switch.infer.diagnose import describe, nonfinite_sites
from ppl_switch.compile_cache import CompiledCache, labelled_model_key, model_key, shapes_key
from ppl_switch.infer.draws import draws_from_guide
from ppl_switch.errors import FitError
from ppl_switch.guides.mean_field import MeanFieldNormal
from ppl_switch.guides.path_guide import ParameterBlockSetUp
from ppl_switch.infer.fit import Fit, assemble_fit
from ppl_switch.infer.prepare import (
    check_float,
    check_int,
    device_data,
    posterior_site_names,
    prepare_data,
    set_x64,
)
from ppl_switch.infer.sharding import mask_padded_trials, per_trial_latent_sites, replicate, resolve_mesh, shard_trials, unsupported

#: global-norm gradient clipping of the default optimiser
DEFAULT_CLIP_NORM = 10.0
#: the progress bar is updated this many times per fit
NUM_PROGRESS_UPDATES = 50


def default_guide_for(model) -> Callable:
    """``model.default_guide()``; for a model that does not define one, a mean-field
    :class:`~ppl_switch.guides.mean_field.MeanFieldNormal` (AutoNormal's family, compiled set-up) with
    ``init_to_median`` over all latent sites."""
    try:
        return model.default_guide()
    except NotImplementedError:
        return MeanFieldNormal(model.program, init_loc_fn=init_to_median(num_samples=15), cache_key=labelled_model_key("init_to_median(15)", model))


def default_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam after clipping the global gradient norm to ``DEFAULT_CLIP_NORM``."""
    return optax.chain(optax.clip_by_global_norm(DEFAULT_CLIP_NORM), optax.adam(learning_rate))


def _as_numpyro_optim(optimizer, learning_rate: float) -> _NumPyroOptim:
    if optimizer is None:
        return optax_to_numpyro(default_optimizer(learning_rate))
    if isinstance(optimizer, _NumPyroOptim):
        return optimizer
    if isinstance(optimizer, optax.GradientTransformation):
        return optax_to_numpyro(optimizer)
    raise ValueError(f"optimizer: expected an optax.GradientTransformation (or numpyro optimiser), got {optimizer!r}")


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _make_chunk_runner(svi: SVI, chunk: int, num_steps: int):
    """Jitted ``(state, fail_step, first_step, data) -> (state, fail_step, losses[chunk])``.

    Steps at index >= num_steps (the tail of the last chunk) and steps after a failure are skipped.
    ``fail_step`` is -1 until a step gives a non-finite loss or non-finite updated parameters; the state
    is then left at the parameters that step started from.
    """

    def take_step(state, data):
        new_state, loss = svi.update(state, data)
        ok = jnp.isfinite(loss) & _all_finite(svi.optim.get_params(new_state.optim_state))
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_state, loss, ok

    def skip_step(state, data):
        return state, jnp.array(jnp.nan, dtype=jnp.result_type(float)), jnp.array(True)

    @jax.jit
    def run(state, fail_step, first_step, data):
        def body(carry, i):
            state, fail_step = carry
            active = (i < num_steps) & (fail_step < 0)
            state, loss, ok = jax.lax.cond(active, take_step, skip_step, state, data)
            fail_step = jnp.where(active & ~ok, i, fail_step).astype(jnp.int32)
            return (state, fail_step), loss.astype(jnp.result_type(float))

        (state, fail_step), losses = jax.lax.scan(body, (state, fail_step), first_step + jnp.arange(chunk, dtype=jnp.int32))
        return state, fail_step, losses

    return run


#: compiled chunk runners (by :func:`_runner_key`) and inits (that key's init part)
_RUNNERS = CompiledCache("SVI runners and inits")


def _runner_key(model, guide, optimizer, learning_rate, num_particles, chunk, num_steps, dev):
    """What a compiled chunk runner depends on, or None (then nothing is cached): the model's class and
    config, the guide (the model's default guide, or that guide object), the optimiser (the default at
    this learning rate, or that object), the ELBO's particles, the chunk layout and the data's pytree
    structure, shapes and dtypes (they fix the guide's plates). Two fits with equal keys trace the same
    program, so the second reuses the first one's compiled steps."""
    mkey = model_key(model)
    if mkey is None:
        return None
    guide_key = "default" if guide is None else ("id", id(guide))
    optim_key = ("default", float(learning_rate)) if optimizer is None else ("id", id(optimizer))
    return (mkey, guide_key, optim_key, num_particles, chunk, num_steps) + shapes_key(dev)


def _set_up_as_svi_init_would(guide, key, data) -> None:
    """``guide.set_up(data)`` eagerly, with the key its first draw gets inside ``svi.init(key, data)``
    (numpyro's ``SVI.init`` splits ``key`` in three and seeds the guide with the last), so that a compiled
    init that follows starts where the eager one would."""
    handlers.seed(guide.set_up, jax.random.split(key, 3)[2])(data)


def _compiled_path_guide_init(svi: SVI, guide, key, data):
    """``svi.init(key, data)`` compiled for a guide with a compiled-set-up parameter block
    (:class:`~ppl_switch.guides.path_guide.ParameterBlockSetUp`: the path guides, the latent-SDE guide): the block is set up first
    (:func:`_set_up_as_svi_init_would`), then the rest of the init (the guide's parameters, the program, the
    optimiser's state) is one program instead of a few hundred eager operations. The set-up's start is a
    constant of that program, so it is compiled afresh per fit (these guides are built per data set)."""
    _set_up_as_svi_init_would(guide, key, data)
    return jax.jit(svi.init)(key, data)


def _compiled_init(svi: SVI, guide: MeanFieldNormal, key, data, cache_key):
    """``svi.init(key, data)`` as one compiled program instead of op by op (each eager operation is one XLA
    compilation; the init's were most of a first fit's time, benchmarks/results.md, session of 2026-12-07).

    The guide is set up first, eagerly, with the key ``svi.init`` would give it
    (:func:`_set_up_as_svi_init_would`), so the start is the one an eager init finds. Its start
    (``guide.init_locs``) is an argument of the compiled init, so that a later fit with equal ``cache_key``
    reuses the program with its own start; that fit's ``svi`` gets the first one's ``constrain_fn`` (the same
    transforms: the key implies the same guide structure)."""
    if guide.sites is None:
        _set_up_as_svi_init_would(guide, key, data)

    def make():
        def init(key, data, start):
            own = guide.init_locs
            guide.init_locs = start  # traced only here: restored before the trace ends
            try:
                return svi.init(key, data)
            finally:
                guide.init_locs = own

        return jax.jit(init), svi

    init, owner = _RUNNERS.get_or_make(cache_key, make, keep_alive=(guide,))
    state = init(key, data, guide.init_locs)
    svi.constrain_fn = owner.constrain_fn
    return state


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="SVI", unit="step", leave=True)


def _step_keys(svi_state, num_particles: int) -> list:
    """The per-particle keys the failing ``svi.update`` used (mirrors numpyro's key splitting)."""
    _, step_key = jax.random.split(svi_state.rng_key)
    return [step_key] if num_particles == 1 else list(jax.random.split(step_key, num_particles))


def _raise_fit_error(svi, model, guide, state, data, step, losses, num_particles):
    last = losses[step]
    if np.isfinite(last):
        what = f"SVI produced non-finite parameters at step {step} (loss {last:.6g} was finite: the gradient was not)"
    else:
        what = f"SVI loss became {last} at step {step}"
    try:
        with numpyro.validation_enabled(False):
            found = nonfinite_sites(
                model.program,
                guide,
                svi.optim.get_params(state.optim_state),
                svi.constrain_fn,
                _step_keys(state, num_particles) + [jax.random.PRNGKey(step)],
                (data,),
            )
        where = describe(found)
    except Exception as err:  # diagnosis must never hide the original failure
        found, where = {}, f"(could not trace the model to locate the site: {type(err).__name__}: {err})"
    finite = losses[:step][np.isfinite(losses[:step])]
    last_finite = f"; last finite loss {finite[-1]:.6g}" if finite.size else ""
    raise FitError(
        f"{what}{last_finite}. Traced at the last parameters with a finite loss: {where}. "
        "Check the priors/constraints and the data of these sites, or try a smaller learning_rate, "
        "x64=True, or a better-initialised guide.",
        step=step,
        sites=found,
        losses=losses[: step + 1],
    )


def fit_svi(
    model,
    data,
    *,
    mask=None,
    lengths=None,
    inputs=None,
    guide=None,
    num_steps: int = 2000,
    learning_rate: float = 1e-2,
    num_particles: int = 1,
    optimizer=None,
    seed: int = 0,
    num_draws: int = 200,
    progress_bar: bool = True,
    x64: bool = False,
    relabel: bool = True,
    devices=None,
) -> Fit:
    """Fit ``model`` to ``data`` by SVI (Trace_ELBO) and draw from the fitted guide.

    Args:
        model: a :class:`ppl_switch.models.base.Model`.
        data: a SequenceData or raw ``y`` ((trials, time, obs), (time, obs) or a list of trials), then
            validated with ``model.prepare(data, mask=, lengths=, inputs=)`` before anything compiles.
        guide: any callable with the program's signature (an autoguide or a hand-written guide);
            default ``model.default_guide()``, or a mean-field normal (``MeanFieldNormal``) if the model has none.
        num_steps, learning_rate, num_particles: optimisation length, Adam step size, ELBO particles.
        optimizer: any optax GradientTransformation (overrides ``learning_rate``); default Adam with
            global-norm gradient clipping at 10.
        seed: the only source of randomness: same seed, same numbers.
        num_draws: posterior draws taken from the fitted guide (written as one chain).
        progress_bar: show a tqdm bar (False = quiet).
        x64: True turns on float64 for the whole process (see :func:`~ppl_switch.infer.prepare.set_x64`).
        relabel: align state labels across draws (:mod:`ppl_switch.relabel`) before writing.
        devices: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a
            ``jax.sharding.Mesh`` with a ``"trial"`` axis: the trials are padded with empty trials to a
            multiple of the device count and split over the devices, the guide and optimiser state
            replicated; the ELBO's sum over trials and its gradient are reduced across devices inside
            each compiled chunk of steps (:mod:`ppl_switch.infer.sharding`). The guide is initialised on
            the unpadded data and the draws are taken on it, so the result equals the one-device result
            up to float rounding. Only for models without per-trial latent sites (HMM, ARHMM, LDS:
            states and paths marginalised); others raise a ValueError naming ``devices``.

    Returns:
        A :class:`Fit` with ``params`` (the guide's own parameters as ``svi.get_params`` gives them: an
        autoguide's locations are in the model's *unconstrained* space; ``fit.point_estimate()`` gives the
        model's constrained values, the guide's median), ``losses`` (num_steps,), ``samples``
        ``{site: (1, num_draws, ...)}``, ``idata`` and ``warnings``: data far from the priors' scale, a loss
        still moving over its last 10% of steps (:mod:`ppl_switch.infer.checks`).

    Raises:
        FitError: the loss, the parameters or a posterior draw became non-finite; the message names the
            step and sites.
    """
    num_steps = check_int(num_steps, "num_steps")
    num_particles = check_int(num_particles, "num_particles")
    num_draws = check_int(num_draws, "num_draws")
    seed = check_int(seed, "seed", minimum=0)
    if optimizer is None:
        learning_rate = check_float(learning_rate, "learning_rate", 0.0)
    if guide is not None and not callable(guide):
        raise ValueError(f"guide: expected a callable with the model program's signature, got {guide!r}")
    set_x64(x64)
    data = prepare_data(model, data, mask=mask, lengths=lengths, inputs=inputs)
    found = data_scale_warnings(model, data)
    emit(found)
    optim = _as_numpyro_optim(optimizer, learning_rate)
    user_guide = guide
    guide = default_guide_for(model) if guide is None else guide

    dev = device_data(data)
    mesh = resolve_mesh(devices)
    if mesh is not None:
        local = per_trial_latent_sites(model.program, dev)
        if local:
            raise unsupported("fit_svi", f"models with per-trial latent sites ({', '.join(local)})")
    key_init, key_draws, key_post = jax.random.split(jax.random.PRNGKey(seed), 3)
    # sharded: padding trials masked out of the log density (exactly 0, sharding.mask_padded_trials)
    svi = SVI(model.program if mesh is None else mask_padded_trials(model.program), guide, optim,
              Trace_ELBO(num_particles=num_particles))
    chunk = max(1, math.ceil(num_steps / NUM_PROGRESS_UPDATES))
    # Compiled once per model config, guide, optimiser and data shapes: a later fit with equal key reuses
    # the runner (and the init and draw functions) traced with the first fit's svi/guide objects, which
    # have the same structure; this fit's own guide is initialised below from its own seed and data.
    cache_key = _runner_key(model, user_guide, optimizer, learning_rate, num_particles, chunk, num_steps, dev)
    draws_key = None if cache_key is None else cache_key[:2] + cache_key[6:]
    # numpyro validates distribution arguments eagerly during init; an invalid one would raise without
    # naming its site, so validation is off here and a non-finite step-0 loss is diagnosed instead.
    with numpyro.validation_enabled(False):  # on the unpadded data: the same start as on one device
        if isinstance(guide, MeanFieldNormal):
            # the sharded fit's svi runs the masked program: another init program, another key
            init_key = None if cache_key is None else cache_key[:3] + cache_key[6:] + ("init", mesh is not None)
            state = _compiled_init(svi, guide, key_init, dev, init_key)
        elif isinstance(guide, ParameterBlockSetUp):
            state = _compiled_path_guide_init(svi, guide, key_init, dev)
        else:
            state = svi.init(key_init, dev)
    run_dev = dev
    if mesh is not None:  # the steps run on padded, trial-sharded data with a replicated state
        run_dev, state = shard_trials(data, mesh), replicate(state, mesh)

    if cache_key is not None and mesh is not None:  # another program (masked) and padded shapes
        cache_key = cache_key + ("sharded", tuple(np.shape(x) for x in jax.tree.leaves(run_dev)))
    run_chunk = _RUNNERS.get_or_make(cache_key, lambda: _make_chunk_runner(svi, chunk, num_steps), keep_alive=(user_guide, optimizer))
    fail_step = jnp.array(-1, dtype=jnp.int32)
    chunks = []
    with _progress(num_steps, progress_bar) as bar:
        for first in range(0, num_steps, chunk):
            state, fail_step, losses = run_chunk(state, fail_step, jnp.int32(first), run_dev)
            losses = np.asarray(losses)
            chunks.append(losses)
            bar.update(min(chunk, num_steps - first))
            done = losses[np.isfinite(losses)]
            if done.size:
                bar.set_postfix(loss=f"{done[-1]:.4g}")
            if int(fail_step) >= 0:
                break
    losses = np.concatenate(chunks)[:num_steps]
    if int(fail_step) >= 0:
        _raise_fit_error(svi, model, guide, state, run_dev, int(fail_step), losses, num_particles)

    # one program (op by op, each constraint costs compilations), once per runner key
    get_params = _RUNNERS.get_or_make(None if cache_key is None else cache_key + ("get_params",), lambda: jax.jit(svi.get_params))
    params = get_params(state)
    if mesh is not None:  # back to the host: draws and per-trial outputs use the unpadded data
        params = jax.device_get(params)
    names = posterior_site_names(model, dev)
    samples = draws_from_guide(model.program, guide, params, dev, names, key_draws, num_draws, cache_key=draws_key)
    require_finite("SVI posterior draws", samples, losses=losses,
                   hint="The guide's parameters are finite but its draws are not; check the constraints of these sites.")
    estimate = guide_median(guide, params, names)

    config = {
        "num_steps": num_steps,
        "learning_rate": learning_rate if optimizer is None else None,
        "optimizer": "adam+clip_by_global_norm" if optimizer is None else repr(optimizer),
        "num_particles": num_particles,
        "guide": getattr(guide, "__name__", type(guide).__name__),
        "seed": seed,
        "num_draws": num_draws,
        "x64": bool(jax.config.jax_enable_x64),
        "relabel": bool(relabel),
    }
    if mesh is not None:
        config["num_devices"] = int(mesh.devices.size)
    fit = assemble_fit(
        model,
        data,
        "svi",
        samples,
        key=key_post,
        params={k: np.asarray(v) for k, v in params.items()},
        losses=losses,
        config=config,
        relabel=relabel,
    )
    fit.guide = guide
    if estimate is not None:  # sites the guide has no median for (deterministic ones): mean of the draws
        fit.estimate = {**{k: np.asarray(v).mean(axis=(0, 1)) for k, v in fit.samples.items()}, **estimate}
    moving = moving_objective_warnings(losses, what="SVI loss", advice="run more steps (num_steps) or raise the learning_rate")
    fit.warnings = found + fit.warnings + moving  # in the order they were emitted
    emit(moving)
    return fit


def guide_median(guide, params, names) -> "dict[str, np.ndarray] | None":
    """The guide's median of the posterior sites in the model's constrained space (``guide.median``, as
    autoguides define it; only the sites it covers), or None for a guide without one (then
    ``Fit.point_estimate`` averages the draws)."""
    median = getattr(guide, "median", None)
    if not callable(median):
        return None
    try:
        values = median(params)
    except NotImplementedError:  # numpyro's AutoGuide.median when a guide has none: the draws' mean stands in
        return None
    out = {name: np.asarray(values[name]) for name in names if name in values}
    if not out:
        return None
    require_finite("SVI guide median", out)
    return out
