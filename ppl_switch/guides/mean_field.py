"""A mean-field normal guide whose set-up is one compiled program.

q(theta) = prod over the program's latent sites of biject_to(support)(Normal(loc, scale)), the loc and scale in
the unconstrained space: the family of numpyro's ``AutoNormal``, with the same parameter names
(``{site}_{prefix}_loc``, ``{site}_{prefix}_scale``), plates, start and draws, so that a fit with either gives
the same numbers up to rounding.

What differs is the set-up. ``AutoNormal`` finds its start (numpyro's ``initialize_model``: the init strategy's
prior draws, then the potential energy and its gradient to check them) by running the program op by op, and
each operation is one XLA compilation per shape (33-36 ms each on jax 0.9.2): 21-27 s of a first SVI fit of
an HMM or SLDS (benchmarks/results.md, session of 2026-12-07). Here the same computation is jitted: its first
try as straight-line code, numpyro's whole search only when that try fails (``_compile_set_up``). The structure the guide needs later (sites, event dims, supports, plates) is read off that trace as
static Python values, so nothing traced is kept on the guide.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to, constraints
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_uniform, init_to_value
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy

from ppl_switch.compile_cache import CompiledCache, shapes_key

__all__ = ["MeanFieldNormal", "holds_tracer"]

#: compiled set-ups and medians by (cache_key, ["median",] argument shapes)
_SET_UPS = CompiledCache("mean-field guide set-ups and medians")


def holds_tracer(obj: Any) -> bool:
    """Whether a constraint object holds a traced array (e.g. an interval with data-dependent bounds)."""
    if isinstance(obj, jax.core.Tracer):
        return True
    if isinstance(obj, (list, tuple)):
        return any(holds_tracer(o) for o in obj)
    return isinstance(obj, constraints.Constraint) and any(holds_tracer(v) for v in vars(obj).values())


def _split_static(kwargs: dict) -> tuple[dict, tuple]:
    """(array keyword arguments, the others as sorted (name, value) pairs): a Python flag such as
    ``record_log_lik`` steers the program's control flow, so it is part of the compiled program, not an input."""
    static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {k: v for k, v in kwargs.items() if k not in static}, tuple(sorted(static.items()))


def _is_finite(energy, grad) -> jax.Array:
    """numpyro's test of a start: the potential energy and every gradient entry finite."""
    return jnp.isfinite(energy) & jnp.all(jnp.isfinite(ravel_pytree(grad)[0]))


def _is_real(support) -> bool:
    return support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    )


class MeanFieldNormal:
    """Mean-field normal guide over every latent site of ``program``, set up by one compiled program.

    Args:
        program: the NumPyro model (called with the guide's arguments).
        init_loc_fn: a numpyro init strategy for the start (constrained values), as for ``AutoNormal``.
        init_scale: the start scale of every factor (> 0).
        prefix: the parameter names' infix, ``{site}_{prefix}_loc``.
        cache_key: a hashable key that says ``program`` and ``init_loc_fn`` trace to the same set-up as for
            an earlier guide with this key (e.g. the model's class and config with a fixed strategy); that
            guide's compiled set-up is then reused for arguments of the same shapes. None: compile afresh.

    Call it with the program's arguments inside a numpyro handler stack (SVI does); ``median(params)`` gives
    the constrained locs and the deterministic sites the program computes from them.
    """

    #: the scale parameters' constraint (AutoNormal's)
    scale_constraint = AutoNormal.scale_constraint

    def __init__(self, program: Callable, *, init_loc_fn=init_to_uniform, init_scale: float = 0.1, prefix: str = "auto",
                 cache_key=None):
        if not init_scale > 0:
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        self.model = program
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self.prefix = prefix
        self.cache_key = cache_key
        self.sites: list | None = None  # [(name, event_dim, support, frames)] in the program's order
        self.plate_sizes: dict[str, int] = {}
        self.init_locs: dict | None = None  # {site: unconstrained start}
        self.model_args: tuple | None = None  # (args, kwargs) of the set-up, for median

    # ----- set-up
    def set_up(self, *args, **kwargs) -> None:
        """Find the start and the structure from one compiled trace of the program with these arguments."""
        rng_key = numpyro.prng_key()
        if rng_key is None:
            rng_key = jax.random.PRNGKey(0)
        arrays, static = _split_static(kwargs)
        key = None if self.cache_key is None else (self.cache_key, static, shapes_key((args, arrays)))
        first_try, search, structure = _SET_UPS.get_or_make(key, lambda: self._compile_set_up(static))
        locs, valid = first_try(rng_key, args, arrays)
        if not bool(valid) and search is not first_try:
            locs, valid = search(rng_key, args, arrays)
        if not bool(valid):
            raise RuntimeError("Cannot find valid initial parameters. Please check your model again.")
        traced = [name for name, _, support, _ in structure["sites"] if holds_tracer(support)]
        if traced:
            raise ValueError(f"MeanFieldNormal: the support of {traced} depends on traced values; use "
                             "numpyro.infer.autoguide.AutoNormal for this program")
        self.sites, self.plate_sizes, self.init_locs = structure["sites"], structure["sizes"], locs
        leaves = jax.tree.leaves((args, kwargs))
        self.model_args = None if any(isinstance(x, jax.core.Tracer) for x in leaves) else (args, kwargs)

    def _compile_set_up(self, static: tuple):
        """(jitted first try, jitted whole search, the structure dict their traces fill). Each maps
        ``(key, args, array kwargs)`` to ``(unconstrained start, valid)``; ``static``: the other keyword
        arguments (:func:`_split_static`).

        The search is numpyro's ``initialize_model``: draws from the init strategy until the potential energy
        and its gradient are finite, at most 100 tries, in a while loop. The first try is the same computation
        with the same keys, written out as straight-line code: it compiles in about 60% of the loop's time
        (the HMM's set-up 8.33 -> 4.28 s, the SLDS's 11.28 -> 9.70 s: ``benchmarks/first_fit.py MODEL --programs``,
        benchmarks/results.md) and almost always
        succeeds; the loop is compiled only when it does not. Strategies that numpyro's search treats
        specially (uniform draws in the unconstrained space, fixed values) and discrete latent sites always
        take the whole search."""
        structure = {}

        def record(model_trace, locs):
            sites, sizes = [], {}
            for name, site in model_trace.items():
                if site["type"] == "sample" and not site["is_observed"]:
                    event_dim = site["fn"].event_dim + jnp.ndim(locs[name]) - jnp.ndim(site["value"])
                    sites.append((name, int(event_dim), site["fn"].support, tuple(site["cond_indep_stack"])))
                elif site["type"] == "plate":
                    sizes[name] = site["args"][0]
            structure.update(sites=sites, sizes=sizes)

        def search(key, args, kwargs):
            kwargs = {**kwargs, **dict(static)}
            with handlers.block():
                info = initialize_model(key, self.model, init_strategy=self.init_loc_fn, dynamic_args=True,
                                        model_args=args, model_kwargs=kwargs)
            locs = info.param_info.z
            record(info.model_trace, locs)
            return locs, _is_finite(info.param_info.potential_energy, info.param_info.z_grad)

        strategy = self.init_loc_fn if isinstance(self.init_loc_fn, partial) else self.init_loc_fn()
        if strategy.func in (init_to_uniform, init_to_value):
            searched = jax.jit(search)
            return searched, searched, structure  # set_up runs it once

        def first_try(key, args, kwargs):
            kwargs = {**kwargs, **dict(static)}
            with handlers.block():
                # numpyro's search: a trace with the search's key fixes the plates (subsample indices) and param
                # values; each try draws with the next split of the key
                outer = handlers.trace(handlers.substitute(handlers.seed(self.model, key), substitute_fn=strategy))
                outer_trace = outer.get_trace(*args, **kwargs)
                fixed = {name: site["value"] for name, site in outer_trace.items() if site["type"] in ("plate", "param", "mutable")}
                model = handlers.substitute(self.model, data=fixed)
                _, try_key = jax.random.split(key)
                draw = handlers.trace(handlers.substitute(handlers.seed(model, try_key), substitute_fn=strategy))
                model_trace = draw.get_trace(*args, **kwargs)
                latent = {name: site for name, site in model_trace.items() if site["type"] == "sample" and not site["is_observed"]}
                if any(site["fn"].support.is_discrete for site in latent.values()):
                    return search(key, args, kwargs)
                locs = {name: biject_to(site["fn"].support).inv(site["value"]) for name, site in latent.items()}
                energy, grad = jax.value_and_grad(partial(potential_energy, handlers.seed(model, rng_seed=0), args, kwargs))(locs)
            record(outer_trace, locs)
            return locs, _is_finite(energy, grad)

        return jax.jit(first_try), jax.jit(search), structure

    # ----- the guide
    def __call__(self, *args, **kwargs) -> dict:
        if self.sites is None:
            self.set_up(*args, **kwargs)
        plates = {}
        result = {}
        for name, event_dim, support, frames in self.sites:
            init_loc = self.init_locs[name]
            with ExitStack() as stack:
                for frame in frames:
                    if frame.name not in plates:
                        full = self.plate_sizes.get(frame.name, frame.size)
                        plates[frame.name] = numpyro.plate(frame.name, full, dim=frame.dim, subsample_size=frame.size)
                    stack.enter_context(plates[frame.name])
                loc = numpyro.param(f"{name}_{self.prefix}_loc", init_loc, event_dim=event_dim)
                scale = numpyro.param(f"{name}_{self.prefix}_scale", jnp.full(jnp.shape(init_loc), self.init_scale),
                                      constraint=self.scale_constraint, event_dim=event_dim)
                normal = dist.Normal(loc, scale).to_event(event_dim)
                if _is_real(support):
                    result[name] = numpyro.sample(name, normal)
                else:
                    result[name] = numpyro.sample(name, dist.TransformedDistribution(normal, biject_to(support)))
        return result

    def median(self, params: dict) -> dict:
        """{site: constrained loc} for every latent site, and the program's deterministic sites at those values."""
        if self.sites is None or self.model_args is None:
            raise RuntimeError("MeanFieldNormal.median: call the guide once with concrete data first (SVI's init does)")
        args, kwargs = self.model_args
        arrays, static = _split_static(kwargs)
        locs = {name: params[f"{name}_{self.prefix}_loc"] for name, *_ in self.sites}
        key = None if self.cache_key is None else (self.cache_key, "median", static, shapes_key((locs, args, arrays)))
        model = self.model
        # one program: run op by op, the program's deterministic sites cost a compilation each
        compiled = _SET_UPS.get_or_make(key, lambda: jax.jit(lambda locs, args, kwargs: handlers.seed(constrain_fn, rng_seed=0)(
            model, args, {**kwargs, **dict(static)}, locs, return_deterministic=True)))
        return compiled(locs, args, arrays)
