"""NUTS runner (numpyro's NUTS on the model program, discrete states marginalised by the model)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS
from numpyro.infer.initialization import init_to_value

from ppl_switch.compile_cache import CompiledCache, freeze, model_key, shapes_key
from ppl_switch.infer.checks import chain_log_density_gap, data_scale_warnings, emit, mcmc_warnings, require_finite
from ppl_switch.infer.fit import Fit, assemble_fit
from ppl_switch.infer.prepare import check_float, check_int, device_data, posterior_site_names, prepare_data, set_x64
from ppl_switch.infer.sharding import resolve_mesh

CHAIN_METHODS = ("sequential", "parallel", "vectorized")
INITS = ("prior", "svi")
#: default number of chains: R-hat needs at least two
DEFAULT_NUM_CHAINS = 2
#: SVI steps of ``init="svi"``
INIT_SVI_STEPS = 1000
#: numpyro's NUTS default maximum tree depth
MAX_TREE_DEPTH = 10
_EXTRA_FIELDS = ("diverging", "num_steps", "adapt_state.step_size", "accept_prob", "energy", "potential_energy")
#: compiled NUTS runs by model, sampler settings and data shapes: a later fit of equally shaped data (another
#: subject, session or seed) runs the compiled sampler again instead of compiling it again
_RUNS = CompiledCache("NUTS runs", max_size=8)


#: the bar of the NUTS run in progress (host side); the compiled run's steps report to whichever bar is here, so a
#: compiled run kept in ``_RUNS`` reports to the bar of the fit that runs it now
_ACTIVE_BAR: list = [None]


def _advance_bar(steps) -> None:
    bar = _ACTIVE_BAR[0]
    if bar is not None:
        bar.update(int(steps))


class _ReportingNUTS(NUTS):
    """numpyro's NUTS whose steps report to the host every ``report_every`` iterations (``jax.debug.callback``), so
    that a run compiled as one program can show a progress bar. numpyro's own bar steps the loop from Python for one
    chain (and is switched off for several chains run by a callable chain method)."""

    def __init__(self, model, *, report_every: int, **kwargs):
        super().__init__(model, **kwargs)
        self._report_every = report_every

    def sample(self, state, model_args, model_kwargs):
        state = super().sample(state, model_args, model_kwargs)
        every = self._report_every
        # "vectorized" chains step together: state.i is then one count per chain, all equal
        steps = every * state.i.size
        lax.cond(jnp.ravel(state.i)[0] % every == 0, lambda: jax.debug.callback(_advance_bar, steps), lambda: None)
        return state


@contextmanager
def _progress(total: int, num_chains: int, enabled: bool):
    """A tqdm bar over ``total`` steps of every chain, active for the compiled run's reports."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = _ACTIVE_BAR[0] = tqdm(total=total, desc=f"NUTS, {num_chains} chain(s)", unit="step", leave=True)
    try:
        yield
        bar.update(total - bar.n)  # the last steps after the last report
    finally:
        bar.close()
        _ACTIVE_BAR[0] = None


def _chains_in_one_program(single_chain):
    """numpyro ``chain_method`` for "sequential": the chains one after another as one loop (``jax.lax.map`` over
    the chains' keys and starts) inside the run's compiled program, so one chain's program is compiled once for all.
    numpyro's own sequential mode loops over the chains in Python: run eagerly it started each chain op by op and
    compiled the sampling loop once per chain (a first 2-chain fit of a small HMM took 33 s there and 15 s here,
    benchmarks/results.md); inside a compiled run it would trace one copy of the chain per chain. The same
    algorithm and keys: the draws equal numpyro's sequential mode's (tests/test_infer.py, float64); two
    compilations of it differ in the last bits, which a chain can amplify over many steps (seen in float32, and
    after ~10 float64 draws of an SLDS)."""
    return lambda per_chain_args: jax.lax.map(single_chain, per_chain_args)


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


def _diagnostics(stats: Mapping[str, np.ndarray], max_tree_depth: int = MAX_TREE_DEPTH) -> dict[str, Any]:
    diverging = stats["diverging"]
    return {
        "num_divergences": int(diverging.sum()),
        "divergences_per_chain": diverging.sum(axis=1).tolist(),
        "mean_acceptance_rate": float(np.mean(stats["acceptance_rate"])),
        "step_size_per_chain": stats["step_size"][:, -1].tolist(),
        # against this fit's cap (the tree depth of a draw is at most max_tree_depth)
        "num_max_tree_depth": int((stats["tree_depth"] >= max_tree_depth).sum()),
    }


def _convergence(samples: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """min bulk ESS and max split R-hat over all scalar entries of (chain, draw, ...) draws, and the
    sites where they occur (``min_ess_site``, ``max_r_hat_site``).

    Computed on the draws as written, i.e. after relabelling, so label switching between chains does
    not show up as non-convergence.
    """
    r_hats, ess = [], []
    for name, value in samples.items():
        value = np.asarray(value, dtype=float)
        value = value.reshape(value.shape[:2] + (-1,))
        # entries constant by construction (e.g. the unit diagonal of a correlation Cholesky factor)
        # have no ESS or R-hat; skipping them keeps the 0/0 out of the diagnostics
        value = value[..., np.ptp(value, axis=(0, 1)) > 0]
        if value.shape[1] >= 4 and value.shape[-1] > 0:
            # numpyro's estimator can go below 0 on a handful of strongly autocorrelated draws: no
            # effective samples, reported as 0
            low = float(np.min(effective_sample_size(value)))
            ess.append((0.0 if low < 0 else low, name))
            if value.shape[0] > 1:
                r_hats.append((float(np.max(split_gelman_rubin(value))), name))
    out: dict[str, Any] = {}
    if ess:
        out["min_ess"], out["min_ess_site"] = min(ess, key=lambda e: (np.nan_to_num(e[0], nan=-np.inf), e[1]))
    if r_hats:
        out["max_r_hat"], out["max_r_hat_site"] = max(r_hats, key=lambda r: (np.nan_to_num(r[0], nan=np.inf), r[1]))
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
    num_chains: int = DEFAULT_NUM_CHAINS,
    chain_method: str = "sequential",
    target_accept: float = 0.8,
    seed: int = 0,
    progress_bar: bool = True,
    x64: bool = False,
    relabel: bool = True,
    init_params: Optional[Mapping[str, Any]] = None,
    init: str = "prior",
    dense_mass=False,
    max_tree_depth: int = 10,
    devices=None,
) -> Fit:
    """Sample the posterior of ``model`` given ``data`` with NUTS.

    Args:
        data, mask, lengths, inputs: as in :func:`fit_svi` (validated before compilation).
        num_warmup, num_samples: per chain. num_chains: default 2 (R-hat compares chains; one chain
            gets a warning that R-hat is not available).
        chain_method: "sequential" (default: the chains one after another in one compiled program,
            start included (:func:`_chains_in_one_program`); measured faster than "vectorized" on a 2-core
            CPU for a small HMM, 7.9-9.1 s against 14.2-34.4 s for 2 chains x 600 steps, compiling included;
            vectorized chains also step in lockstep through the larger of their trees; README "Fitting your
            own data"), "vectorized"
            or "parallel" (one device per chain: the choice on a GPU or several devices). On a CPU, "parallel" needs one XLA device
            per chain, set before JAX's first computation (e.g. ``numpyro.set_host_device_count(num_chains)``
            at the top of the script); with fewer devices numpyro runs the chains one after another.
        target_accept: target acceptance probability of step-size adaptation, in (0, 1).
        seed: same seed, same draws.
            A later fit of the same model and settings on data of the same shapes (another subject or session)
            reuses the compiled sampler, whose arguments the data are (not with chain_method "parallel").
        init_params: optional ``{site: value}`` in the constrained space to start every chain from
            (``init_to_value``); sites not given start as ``init`` says.
        init: "prior" (numpyro's default: uniform in (-2, 2) in the unconstrained space, a different
            point per chain) or "svi": every chain starts at the point estimate of a short SVI fit
            (``INIT_SVI_STEPS`` steps, the model's default guide, same seed): for multimodal posteriors
            such as an HMM's this keeps chains out of poor local modes (README: max R-hat 9.5 -> below
            1.01 on the simulated HMM).
        dense_mass: False (diagonal mass matrix), True (one dense matrix over every latent
            coordinate), or a list of tuples of site names, each adapted as one dense block (the other
            sites diagonal), e.g. ``[("dynamics_matrix", "dynamics_scales")]`` for a model's parameters
            next to a long path.
        max_tree_depth: cap on the NUTS tree depth (at most 2**max_tree_depth - 1 leapfrog steps).
        x64, relabel: as in :func:`fit_svi`. progress_bar: a tqdm bar over every chain's steps, fed from inside
            the compiled run (about 100 updates per chain; with "parallel", numpyro's own bar).
        devices: None, a number of devices, a list of ``jax.Device`` or a Mesh: one chain per device,
            by numpyro's ``chain_method="parallel"`` (set for you; "vectorized" is refused). Needs
            ``len(devices) >= num_chains``, and numpyro's pmap puts chain i on ``jax.local_devices()[i]``,
            so those first ``num_chains`` local devices must be among ``devices``; otherwise a
            ValueError naming ``devices``. The trials are not split: every chain sees all of them.

    Returns:
        A :class:`Fit` with ``samples`` ``{site: (chain, draw, ...)}``, ``diagnostics`` (number of
        divergences, per chain, mean acceptance, final step sizes, tree depth saturation, min bulk ESS
        and max split R-hat with their sites, the chains' mean log densities and their largest gap)
        and sample_stats ``diverging, step_size, n_steps, tree_depth, acceptance_rate, energy, lp`` in
        ``idata``. ``fit.warnings`` (also emitted as FitWarning) reports R-hat > 1.01, bulk ESS < 100
        per chain, divergences, tree-depth saturation and chains stuck in different modes
        (:mod:`ppl_switch.infer.checks`).

    Raises:
        FitError: a draw or the log density is non-finite (the message names the sites).
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
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    if devices is not None:
        chain_method = _chains_on_devices(devices, num_chains, chain_method)
    set_x64(x64)
    data = prepare_data(model, data, mask=mask, lengths=lengths, inputs=inputs)
    dev = device_data(data)
    names = posterior_site_names(model, dev)
    if init_params is not None:
        unknown = sorted(set(init_params) - set(names))
        if unknown:
            raise ValueError(f"init_params: {unknown} are not latent sites of the model (sites: {names})")
    dense_mass = _check_dense_mass(dense_mass, names)
    found = data_scale_warnings(model, data)
    emit(found)
    if init == "svi":
        init_params = {**_svi_start(model, data, seed, names), **(init_params or {})}

    kernel = {"target_accept_prob": target_accept, "dense_mass": dense_mass, "max_tree_depth": max_tree_depth}
    # the whole run as one compiled program, kept for the next dataset of these shapes (an SLDS's second dataset
    # 10.0 -> 0.3-0.5 s, benchmarks/results.md), its progress bar fed by the steps' reports; "parallel" runs
    # numpyro's way (its pmap places the chains; its own bar)
    one_program = chain_method != "parallel"
    total_steps = num_chains * (num_warmup + num_samples)
    report_every = max(1, (num_warmup + num_samples) // 100) if (progress_bar and one_program) else 0  # ~100 per chain
    settings = (num_warmup, num_samples, num_chains, chain_method, bool(progress_bar) and not one_program, report_every)
    run = _sampler_run(model.program, kernel, *settings)
    # jax arrays: numpy ones break numpyro's inverse transforms when chains run under shard_map ("parallel")
    init_values = None if init_params is None else {k: jnp.asarray(v) for k, v in init_params.items()}
    if one_program:
        mkey = model_key(model)
        cache_key = None if mkey is None else (
            (mkey, freeze(kernel)) + settings + shapes_key((dev, init_values)))
        run = _RUNS.get_or_make(cache_key, lambda: jax.jit(run))
    key_run, key_post = jax.random.split(jax.random.PRNGKey(seed))
    with _progress(total_steps, num_chains, report_every > 0):
        draws, extra = jax.block_until_ready(run(key_run, dev, init_values))
    samples = {name: np.asarray(draws[name]) for name in names if name in draws}
    require_finite("NUTS draws", samples, hint="Check the priors/constraints of these sites, or try x64=True.")
    require_finite("NUTS log density", {"potential_energy": extra["potential_energy"]},
                   hint="The model's log density is not finite at the draws; check its likelihood and priors.")
    stats = _sample_stats(extra)
    diagnostics = _diagnostics(stats, max_tree_depth)
    gap = chain_log_density_gap(stats["lp"])
    if gap is not None:
        diagnostics.update(chain_lp_gap=gap["gap"], chain_lp_within_sd=gap["within_sd"], chain_lp_means=gap["chain_means"])
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
        "init": init,
        "max_tree_depth": max_tree_depth,
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
    if num_chains < 2:
        fit.diagnostics["max_r_hat"] = None
        fit.diagnostics["r_hat_note"] = "not available with 1 chain"
    chains = mcmc_warnings(fit.diagnostics, num_chains, max_tree_depth)
    fit.warnings = found + fit.warnings + chains  # in the order they were emitted
    emit(chains)
    return fit


def _sampler_run(program, kernel: Mapping[str, Any], num_warmup: int, num_samples: int, num_chains: int,
                 chain_method: str, progress_bar: bool, report_every: int):
    """``run(key, data, init_values) -> (draws, extra)``: numpyro's NUTS over ``program`` with these settings
    (``progress_bar``: numpyro's own; ``report_every`` > 0: the steps report to ``_ACTIVE_BAR`` every so many);
    ``init_values`` None or ``{site: constrained value}`` (every chain starts there, ``init_to_value``); ``draws``
    ``{site: (chain, draw, ...)}`` and ``extra`` ``{field: (chain, draw)}`` (``_EXTRA_FIELDS``). The data and the
    start are arguments, so that ``jax.jit(run)`` serves every dataset of the same shapes."""

    def run(key, data, init_values):
        kwargs = dict(kernel)
        if init_values is not None:
            kwargs["init_strategy"] = init_to_value(values=init_values)
        mcmc = MCMC(
            _ReportingNUTS(program, report_every=report_every, **kwargs) if report_every else NUTS(program, **kwargs),
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            chain_method=_chains_in_one_program if chain_method == "sequential" else chain_method,
            progress_bar=progress_bar,
        )
        with warnings.catch_warnings():
            # numpyro warns when there are fewer devices than chains and falls back to sequential
            warnings.filterwarnings("ignore", message="There are not enough devices")
            mcmc.run(key, data, extra_fields=_EXTRA_FIELDS)
        return mcmc.get_samples(group_by_chain=True), mcmc.get_extra_fields(group_by_chain=True)

    return run


def _chains_on_devices(devices, num_chains: int, chain_method: str) -> str:
    """``"parallel"`` after checking that ``devices`` can hold one chain each where numpyro puts them."""
    chosen = list(resolve_mesh(devices).devices.flat)
    if chain_method == "vectorized":
        raise ValueError("devices: chains are placed one per device (chain_method='parallel'); chain_method='vectorized' "
                         "runs them on one device: pass one or the other")
    if len(chosen) < num_chains:
        raise ValueError(f"devices: fit_nuts places one chain per device; {num_chains} chains need at least {num_chains} "
                         f"devices, got {len(chosen)} (lower num_chains or pass more devices)")
    used = jax.local_devices()[:num_chains]  # where numpyro's pmap runs the chains
    if len(used) < num_chains or any(d not in chosen for d in used):
        raise ValueError(f"devices: numpyro runs parallel chains on jax.local_devices()[:{num_chains}] = {used}; "
                         f"devices must include them, got {chosen}")
    return "parallel"


def _svi_start(model, data, seed: int, names) -> dict[str, np.ndarray]:
    """Point estimate of a short SVI fit (the model's default guide) as NUTS start values."""
    from ppl_switch.infer.svi import fit_svi  # lazy: svi imports this module's siblings only

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short fit is expected to be still moving
        start = fit_svi(model, data, num_steps=INIT_SVI_STEPS, num_draws=10, seed=seed, progress_bar=False, relabel=False)
    return {name: value for name, value in start.point_estimate().items() if name in names}
