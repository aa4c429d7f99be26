"""NUTS runner (numpyro's NUTS on the model program, discrete states marginalised by the model)."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS
from numpyro.infer.initialization import init_to_value

from ppl_switch.infer.fit import Fit, assemble_fit
from ppl_switch.infer.prepare import check_float, check_int, device_data, posterior_site_names, prepare_data, set_x64

CHAIN_METHODS = ("sequential", "parallel", "vectorized")
#: numpyro's NUTS default maximum tree depth
MAX_TREE_DEPTH = 10
_EXTRA_FIELDS = ("diverging", "num_steps", "adapt_state.step_size", "accept_prob", "energy", "potential_energy")


def _sample_stats(extra: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ArviZ-named sample stats, each (chain, draw)."""
    num_steps = np.asarray(extra["num_steps"])
    return {
        "diverging": np.asarray(extra["diverging"], dtype=bool),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "n_steps": num_steps,
        # a NUTS tree of depth d has at most 2**d - 1 leapfrog steps
        "tree_depth": np.floor(np.log2(np.maximum(num_steps, 1))).astype(np.int64) + 1,
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "energy": np.asarray(extra["energy"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }


def _diagnostics(stats: Mapping[str, np.ndarray]) -> dict[str, Any]:
    diverging = stats["diverging"]
    return {
        "num_divergences": int(diverging.sum()),
        "divergences_per_chain": diverging.sum(axis=1).tolist(),
        "mean_acceptance_rate": float(np.mean(stats["acceptance_rate"])),
        "step_size_per_chain": stats["step_size"][:, -1].tolist(),
        "num_max_tree_depth": int((stats["tree_depth"] >= MAX_TREE_DEPTH).sum()),
    }


def _convergence(samples: Mapping[str, np.ndarray]) -> dict[str, float]:
    """min bulk ESS and max split R-hat over all scalar entries of (chain, draw, ...) draws.

    Computed on the draws as written, i.e. after relabelling, so label switching between chains does
    not show up as non-convergence.
    """
    r_hats, ess = [], []
    for value in samples.values():
        value = np.asarray(value, dtype=float)
        value = value.reshape(value.shape[:2] + (-1,))
        # entries constant by construction (e.g. the unit diagonal of a correlation Cholesky factor)
        # have no ESS or R-hat; skipping them keeps the 0/0 out of the diagnostics
        value = value[..., np.ptp(value, axis=(0, 1)) > 0]
        if value.shape[1] >= 4 and value.shape[-1] > 0:
            ess.append(np.min(effective_sample_size(value)))
            if value.shape[0] > 1:
                r_hats.append(np.max(split_gelman_rubin(value)))
    out = {}
    if ess:
        out["min_ess"] = float(np.nanmin(ess))
    if r_hats:
        out["max_r_hat"] = float(np.nanmax(r_hats))
    return out


def _check_dense_mass(dense_mass, names):
    """``dense_mass`` as NUTS takes it: a bool, or a list of tuples of latent site names."""
    if isinstance(dense_mass, bool):
        return dense_mass
    if isinstance(dense_mass, (list, tuple)) and all(isinstance(b, (list, tuple)) and b for b in dense_mass):
        blocks = [tuple(b) for b in dense_mass]
        unknown = sorted({n for b in blocks for n in b} - set(names))
        if not unknown:
            return blocks
        raise ValueError(f"dense_mass: {unknown} are not latent sites of the model (sites: {names})")
    raise ValueError(f"dense_mass: expected True, False or a list of tuples of site names, got {dense_mass!r}")


def fit_nuts(
    model,
    data,
    *,
    mask=None,
    lengths=None,
    inputs=None,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 1,
    chain_method: str = "sequential",
    target_accept: float = 0.8,
    seed: int = 0,
    progress_bar: bool = True,
    x64: bool = False,
    relabel: bool = True,
    init_params: Optional[Mapping[str, Any]] = None,
    dense_mass=False,
    max_tree_depth: int = 10,
) -> Fit:
    """Sample the posterior of ``model`` given ``data`` with NUTS.

    Args:
        data, mask, lengths, inputs: as in :func:`fit_svi` (validated before compilation).
        num_warmup, num_samples, num_chains: per chain.
        chain_method: "sequential", "parallel" (one device per chain) or "vectorized". On a CPU,
            "parallel" needs one XLA device per chain, set before JAX's first computation (e.g.
            ``numpyro.set_host_device_count(num_chains)`` at the top of the script); with fewer
            devices numpyro runs the chains one after another.
        target_accept: target acceptance probability of step-size adaptation, in (0, 1).
        seed: same seed, same draws.
        init_params: optional ``{site: value}`` in the constrained space to start every chain from
            (``init_to_value``); sites not given start from numpyro's default (uniform in (-2, 2)
            unconstrained).
        dense_mass: False (diagonal mass matrix), True (one dense matrix over every latent
            coordinate), or a list of tuples of site names, each adapted as one dense block (the other
            sites diagonal), e.g. ``[("dynamics_matrix", "dynamics_scales")]`` for a model's parameters
            next to a long path.
        max_tree_depth: cap on the NUTS tree depth (at most 2**max_tree_depth - 1 leapfrog steps).
        x64, relabel, progress_bar: as in :func:`fit_svi`.

    Returns:
        A :class:`Fit` with ``samples`` ``{site: (chain, draw, ...)}``, ``diagnostics`` (number of
        divergences, per chain, mean acceptance, final step sizes, tree depth saturation, min ESS,
        max split R-hat) and sample_stats ``diverging, step_size, n_steps, tree_depth,
        acceptance_rate, energy, lp`` in ``idata``. Divergences also raise a RuntimeWarning.
    """
    num_warmup = check_int(num_warmup, "num_warmup", minimum=0)
    num_samples = check_int(num_samples, "num_samples")
    num_chains = check_int(num_chains, "num_chains")
    seed = check_int(seed, "seed", minimum=0)
    target_accept = check_float(target_accept, "target_accept", 0.0, 1.0)
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method: expected one of {CHAIN_METHODS}, got {chain_method!r}")
    if init_params is not None and not isinstance(init_params, Mapping):
        raise ValueError(f"init_params: expected a dict {{site: value}}, got {type(init_params).__name__}")
    max_tree_depth = check_int(max_tree_depth, "max_tree_depth")
    set_x64(x64)
    data = prepare_data(model, data, mask=mask, lengths=lengths, inputs=inputs)
    dev = device_data(data)
    names = posterior_site_names(model, dev)
    if init_params is not None:
        unknown = sorted(set(init_params) - set(names))
        if unknown:
            raise ValueError(f"init_params: {unknown} are not latent sites of the model (sites: {names})")
    dense_mass = _check_dense_mass(dense_mass, names)

    kwargs = {"target_accept_prob": target_accept, "dense_mass": dense_mass, "max_tree_depth": max_tree_depth}
    if init_params is not None:
        # jax arrays: numpy ones break numpyro's inverse transforms when chains run under shard_map ("parallel")
        kwargs["init_strategy"] = init_to_value(values={k: jnp.asarray(v) for k, v in init_params.items()})
    mcmc = MCMC(
        NUTS(model.program, **kwargs),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=progress_bar,
    )
    key_run, key_post = jax.random.split(jax.random.PRNGKey(seed))
    with warnings.catch_warnings():
        # numpyro warns when there are fewer devices than chains and falls back to sequential
        warnings.filterwarnings("ignore", message="There are not enough devices")
        mcmc.run(key_run, dev, extra_fields=_EXTRA_FIELDS)
    draws = mcmc.get_samples(group_by_chain=True)
    samples = {name: np.asarray(draws[name]) for name in names if name in draws}
    stats = _sample_stats(mcmc.get_extra_fields(group_by_chain=True))
    diagnostics = _diagnostics(stats)
    if diagnostics["num_divergences"]:
        warnings.warn(
            f"NUTS: {diagnostics['num_divergences']} divergent transitions after warmup "
            f"(per chain {diagnostics['divergences_per_chain']}); try a higher target_accept or a "
            "reparameterised model before trusting these draws",
            RuntimeWarning,
            stacklevel=2,
        )
    config = {
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "num_chains": num_chains,
        "chain_method": chain_method,
        "target_accept": target_accept,
        "seed": seed,
        "x64": bool(jax.config.jax_enable_x64),
        "relabel": bool(relabel),
        "init_params": None if init_params is None else sorted(init_params),
    }
    fit = assemble_fit(
        model,
        data,
        "nuts",
        samples,
        key=key_post,
        sample_stats=stats,
        diagnostics=diagnostics,
        config=config,
        relabel=relabel,
    )
    fit.diagnostics.update(_convergence(fit.samples))
    return fit
