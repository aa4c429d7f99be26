"""Mutation check: does the default test run catch deliberate one-line bugs?

Each mutant replaces one line fragment in a scratch copy of this checkout and runs the tests that should
catch it (default run only, i.e. not ``-m slow``). A mutant is *caught* when those tests fail, *survived*
when they pass. Grow the list with each new model, runner or metric: a bug that survives names a test to
write.

    python benchmarks/mutants.py                 # all mutants (one pytest process each; ~1-3 min each on 2 cores)
    python benchmarks/mutants.py --only nmse knn # names containing these words
    python benchmarks/mutants.py --list

Results (date, caught/survived) go to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the checkout
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k", "expression"
    why: str


MUTANTS = [
    # ----- found surviving by the review of 2026-12-05 (issue 26); each now has a default-run test -----
    Mutant(
        "rslds bernoulli readout without posterior covariance",
        "ppl_switch/infer/rslds_laplace_em.py",
        "Egg = Egg.at[..., :D, :D].add(S)",
        "Egg = Egg",
        ("tests/test_rslds_m_steps.py",),
        "E[x x'] without Cov[x]: the objective still never decreases, but the step is not its maximiser",
    ),
    Mutant(
        "observed steps keep only fully observed steps",
        "ppl_switch/results.py",
        'observed = get_group(idata, "constant_data")["mask"].values.any(axis=-1)',
        'observed = get_group(idata, "constant_data")["mask"].values.all(axis=-1)',
        ("tests/test_results.py",),
        "partly observed multi-dim steps dropped from the per-step loo view",
    ),
    Mutant(
        "gpslds visited cells transposed",
        "ppl_switch/analysis/gpslds_analysis.py",
        "np.histogram2d(pts[:, 1], pts[:, 0], bins=[edges, edges])",
        "np.histogram2d(pts[:, 0], pts[:, 1], bins=[edges, edges])",
        ("tests/test_metrics.py",),
        "the headline gpSLDS NMSE is computed on the wrong cells",
    ),
    Mutant(
        "dynamics nmse normalised by the estimate",
        "ppl_switch/analysis/gpslds_analysis.py",
        "return float(np.sum((f_est - f_true) ** 2) / np.sum(f_true**2))",
        "return float(np.sum((f_est - f_true) ** 2) / np.sum(f_est**2))",
        ("tests/test_metrics.py",),
        "the headline gpSLDS NMSE rewards a drift estimate that is too large",
    ),
    Mutant(
        "gdm knn state accuracy with k = 1",
        "ppl_switch/analysis/gdm_metrics.py",
        "def inferred_state_accuracy(train_soft_states, train_labels, test_soft_states, test_labels, k: int = 10)",
        "def inferred_state_accuracy(train_soft_states, train_labels, test_soft_states, test_labels, k: int = 1)",
        ("tests/test_gdm.py", "-k", "knn_state_accuracy"),
        "the GDM paper's metric is 10-NN; 1-NN reports another number",
    ),
    Mutant(
        "hmm pointwise log-likelihood scaled",
        "ppl_switch/models/hmm.py",
        "return self._per_step(params, self.emission_log_likelihoods(params, data), self.step_mask(data))",
        "return self._per_step(params, 1.01 * self.emission_log_likelihoods(params, data), self.step_mask(data))",
        ("tests/test_conformance.py::TestConformance_hmm_K2",),
        "the log_likelihood group (loo, waic) no longer matches the likelihood the program fits",
    ),
    # ----- this session's code (2026-12-06) -----
    Mutant(
        "nuts r-hat limit loosened",
        "ppl_switch/infer/checks.py",
        "R_HAT_LIMIT = 1.01",
        "R_HAT_LIMIT = 1.1",
        ("tests/test_never_silent.py",),
        "a posterior with R-hat 1.05 would pass without a word",
    ),
    Mutant(
        "hmm em weighted covariance with a wrong normaliser",
        "ppl_switch/infer/hmm_em.py",
        'cov = jnp.einsum("ntk,ntkd,ntke->kde", w, resid, resid) / jnp.maximum(nk, 1e-30)[:, None, None]',
        'cov = jnp.einsum("ntk,ntkd,ntke->kde", w, resid, resid) / jnp.maximum(nk + 1.0, 1e-30)[:, None, None]',
        ("tests/test_baseline_em.py",),
        "the Gaussian M-step is no longer the maximiser (stationarity test)",
    ),
    # ----- kernels and analyses (the oracle tests; caught in the 2026-12-05 review) -----
    Mutant(
        "hmm log normaliser drops the likelihood shift",
        "ppl_switch/ops/hmm.py",
        "    return jnp.sum(jnp.log(c)) + jnp.sum(shift)",
        "    return jnp.sum(jnp.log(c))",
        ("tests/test_ops_hmm.py",),
        "forward algorithm against brute-force enumeration",
    ),
    Mutant(
        "matched state accuracy without matching",
        "ppl_switch/analysis/metrics.py",
        "rows, cols = linear_sum_assignment(-confusion)",
        "rows, cols = np.arange(len(confusion)), np.arange(len(confusion))",
        ("tests/test_metrics.py",),
        "accuracy after label matching against the best permutation by brute force",
    ),
    # ----- added 2026-12-06 (second session): devices=, missing model methods, EM on a user's subclass -----
    Mutant(
        "padding trials for devices= left observed",
        "ppl_switch/infer/sharding.py",
        "return SequenceData(pad(data.y, 0), pad(data.mask, False), pad(data.lengths, 0), inputs)",
        "return SequenceData(pad(data.y, 0), pad(data.mask, True), pad(data.lengths, 0), inputs)",
        ("tests/test_sharding.py",),
        "1 vs 4 host devices give the same EM/SVI numbers, and the placed padding is empty",
    ),
    Mutant(
        "a missing model method is dropped silently again",
        "ppl_switch/infer/fit.py",
        "    missing = unaligned + missing\n    emit(missing)",
        "    missing = []\n    emit(missing)",
        ("tests/test_never_silent.py", "-k", "missing"),
        "the fit's warnings name the method that would fill the absent group",
    ),
    Mutant(
        "HMM EM accepts a subclass with its own emission",
        "ppl_switch/infer/hmm_em.py",
        "    if changed:  # a user's subclass",
        "    if False:  # a user's subclass",
        ("tests/test_baseline_em.py", "-k", "subclass"),
        "EM refuses a subclass whose emission its M-step does not maximise",
    ),
    Mutant(
        "SLDS predictive log-likelihood drops the last step",
        "ppl_switch/models/slds.py",
        "            return self.filter(params, data).step_log_likelihoods\n",
        "            return self.filter(params, data).step_log_likelihoods.at[:, -1].set(0.0)\n",
        ("tests/test_conformance.py", "-k", "TestConformance_slds and log_likelihood"),
        "the log_likelihood group against an independent Kalman filter (shared dynamics) and exact steps 0-1",
    ),
    # ----- added 2026-12-06 (third session) -----
    Mutant(
        "credible ellipse at a fixed 94% instead of prob",
        "ppl_switch/analysis/gpslds_analysis.py",
        'return _mahalanobis_sq(region, x) <= chi2.ppf(prob, len(region["mean"]))',
        'return _mahalanobis_sq(region, x) <= chi2.ppf(0.94, len(region["mean"]))',
        ("tests/test_gpslds.py", "-k", "credible"),
        "the fixed-point ellipses ignoring the library's credible probability (figures say 89% under arviz >= 1)",
    ),
    Mutant(
        "no warning for a model without site_dims",
        "ppl_switch/infer/fit.py",
        'if not implements(model, "site_dims"):',
        'if False:',
        ("tests/test_never_silent.py", "-k", "site_dims"),
        "generic dims and dropped deterministic sites without a word",
    ),
    Mutant(
        "no GDM fallback warning",
        "ppl_switch/infer/gdm_svi.py",
        'if requested_start == "auto" and start == "released":',
        'if False:',
        ("tests/test_recommended_fit.py", "-k", "gru_gdm_says_it_has_none"),
        "a GDM fit from the released start (0.56-0.65 accuracy) reported as if from the data-driven one",
    ),
    Mutant(
        "GDM encoder read at its start",
        "ppl_switch/infer/gdm_svi.py",
        "    return _encode(guide, fit.params, data, seed, num_samples, tau)",
        "    return _encode(guide, guide.init_values(data.obs_dim), data, seed, num_samples, tau)",
        ("tests/test_recommended_fit.py", "-k", "one_fit_type"),
        "new trials encoded with the encoder's start values, not the fitted ones",
    ),
    # ----- the layers (2026-12-06, fourth session) -----
    Mutant(
        "library EM of the farthest built-in class",
        "ppl_switch/infer/em.py",
        "    for cls in model_class.__mro__:",
        "    for cls in reversed(model_class.__mro__):",
        ("tests/test_baseline_em.py", "-k", "nearest_built_in_class"),
        "an rSLDS fitted by the SLDS's EM (RSLDS subclasses SLDS): the recurrent transitions never learned",
    ),
    Mutant(
        "em = None ignored",
        "ppl_switch/infer/em.py",
        "        if method is None or callable(method):",
        "        if callable(method):",
        ("tests/test_baseline_em.py", "-k", "nearest_built_in_class"),
        "a model that says it has no EM (an HMM with another emission) gets the Gaussian Baum-Welch anyway",
    ),
    Mutant(
        "fixed points by model name again",
        "ppl_switch/analysis/fit_fixed_points.py",
        '    kind = getattr(fit.model, "fixed_point_kind", None)',
        '    kind = getattr(fit.model, "fixed_point_kind", None) if fit.model.name in ("lds", "slds", "rslds", "arhmm", "gdm", "clds", "gpslds", "gpsde") else None',
        ("tests/test_cli.py", "-k", "declaring_its_fixed_point_kind"),
        "a new model's declared fixed points ignored unless the analysis is edited (here: an HMM subclass declaring affine dynamics)",
    ),
    Mutant(
        "a model imports inference again",
        "ppl_switch/models/lds.py",
        '        """x -> A x + b per draw (zero input): see :meth:`Model.affine_dynamics`."""',
        '        """x -> A x + b per draw (zero input): see :meth:`Model.affine_dynamics`."""\n        from ppl_switch.infer.lds_em import lds_em  # noqa: F401',
        ("tests/test_import_layers.py",),
        "a function-level import from models up into infer (the hooks this redesign removed)",
    ),
    # ----- HMM full-covariance EM with partly observed steps (2026-12-06, fifth session) -----
    Mutant(
        "hmm partly observed m-step without the conditional covariance",
        "ppl_switch/infer/hmm_em.py",
        '                return {"means": means, "covs": covs + cov_sum / nw[:, None, None]}',
        '                return {"means": means, "covs": covs}',
        ("tests/test_baseline_em.py", "-k", "partly_observed"),
        "E[y y'] of the missing entries without their conditional covariance: Sigma shrinks every iteration",
    ),
    Mutant(
        "hmm conditional fill ignores the observed entries' correlation",
        "ppl_switch/infer/hmm_em.py",
        '        return None, means + jnp.einsum("ckef,cke->ckf", gain_t[ic], r)',
        '        return None, jnp.where(mc[:, None, :] > 0, yc[:, None, :], means)',
        ("tests/test_baseline_em.py", "-k", "conditional_fill or partly_observed"),
        "missing entries filled with the state mean, not the conditional mean given the observed ones",
    ),
    # ----- CLDS residual-form Q and R, the HMM filter's step forms (2026-12-06, fifth session) -----
    Mutant(
        "clds residual Q without the A S A' term",
        "ppl_switch/infer/clds_em.py",
        "E = r[..., :, None] * r[..., None, :] + covs[:, 1:] - AX - _mT(AX) + A_t @ covs[:, :-1] @ _mT(A_t)",
        "E = r[..., :, None] * r[..., None, :] + covs[:, 1:] - AX - _mT(AX)",
        ("tests/test_clds.py", "-k", "residual_form"),
        "the dynamics noise covariance without the smoothed covariance carried through A",
    ),
    Mutant(
        "clds svi runner without the library's em start",
        "ppl_switch/infer/recommended.py",
        "        options[\"guide\"] = data_driven_guide(model, data)",
        "        options[\"guide\"] = model.default_guide(data)",
        ("tests/test_clds_poisson.py", "-k", "svi_runner"),
        "ppl_switch.fit's SVI of a CLDS started at the model's cheap start instead of the EM start (infer/starts.py)",
    ),
    Mutant(
        "hmm broadcast step sums over the wrong axis",
        "ppl_switch/ops/hmm.py",
        "        return (v[:, None] * A).sum(0)",
        "        return (v[:, None] * A).sum(1)",
        ("tests/test_ops_hmm.py", "-k", "step_forms"),
        "v @ A as a broadcast product reduced over the columns: A' v instead of A v on the small-K path",
    ),
    Mutant(
        "impossible step's NaNs left in the sequential filter",
        "ppl_switch/ops/hmm.py",
        "    after = jnp.cumsum(c == 0) > 0\n",
        "    after = jnp.zeros_like(c, bool)\n",
        ("tests/test_ops_hmm.py", "-k", "impossible_step"),
        "after a step that rules out every reachable state the filter returns NaN instead of 0 and -inf",
    ),
    Mutant(
        "impossible step's zeros also where a likelihood is NaN before it",
        "ppl_switch/ops/hmm.py",
        "    after = jnp.cumsum(c == 0) > 0\n",
        "    after = jnp.ones_like(c, bool)\n",
        ("tests/test_ops_hmm.py", "-k", "nan_likelihood"),
        "a NaN log-likelihood (a bug in the user's emission model) hidden as zeros instead of reported as NaN",
    ),
    Mutant(
        "predict-carrying filter emits the next step's prediction",
        "ppl_switch/ops/hmm.py",
        "            return _row_times_matrix(filtered, A), (filtered, c, predicted)",
        "            return _row_times_matrix(filtered, A), (filtered, c, _row_times_matrix(filtered, A))",
        ("tests/test_ops_hmm.py", "-k", "step_forms"),
        "p(z_t | y_{0:t-1}) shifted by one step on jax >= 0.12's loop layout",
    ),
    Mutant(
        "compiled NUTS run not kept for the next dataset",
        "ppl_switch/infer/nuts.py",
        "        run = _RUNS.get_or_make(cache_key, lambda: jax.jit(run))",
        "        run = _RUNS.get_or_make(None, lambda: jax.jit(run))",
        ("tests/test_fixed_cost.py", "-k", "nuts"),
        "every fit_nuts compiles its sampler again, also for a second subject's data of the same shapes",
    ),
    Mutant(
        "a registered model without its conformance configuration",
        "ppl_switch/models/lds.py",
        "    example_config = dict(latent_dim=2, obs_dim=3, input_dim=1)\n",
        "",
        ("tests/test_conformance.py", "-k", "declares_an_example_config"),
        "a model the conformance suite would silently skip (the LDS, here)",
    ),
    # ----- padding trials of devices= in the SLDS-family EMs; EM memory (2026-12-06, sixth session) -----
    Mutant(
        "padding trial initial-state statistics counted",
        "ppl_switch/ops/switching.py",
        "    real = time_mask[:, 0]\n",
        "    real = jnp.ones_like(time_mask[:, 0])\n",
        ("tests/test_sharding.py", "-k", "padding_trials_add_nothing"),
        "a length-0 trial that devices= adds pulls the initial mean and covariance towards its prior",
    ),
    Mutant(
        "padding trial ELBO counted",
        "ppl_switch/ops/switching.py",
        "    return jnp.sum(jnp.where(time_mask[:, 0], per_trial, 0.0))",
        "    return jnp.sum(per_trial)",
        ("tests/test_sharding.py", "-k", "padding_trials_add_nothing"),
        "the objective on N devices differs from one device's by the padding trials' prior terms",
    ),
    Mutant(
        "expected transition counts without the transition matrix",
        "ppl_switch/ops/hmm.py",
        "        counts = inputs.transition * (row.T @ later)",
        "        counts = row.T @ later",
        ("tests/test_ops_hmm.py", "-k", "posterior_stats"),
        "the memory-light EM statistics drop the factor A_ij of p(z_t = i, z_{t+1} = j | y)",
    ),
    Mutant(
        "expected transition counts ignore the pair weights",
        "ppl_switch/ops/hmm.py",
        "        row = row * jnp.asarray(pair_weights, row.dtype)[:, None]",
        "        row = row",
        ("tests/test_ops_hmm.py", "-k", "posterior_stats"),
        "pairs past a trial's end counted in the HMM and SLDS EMs' transition counts",
    ),
    # ----- missing entries: the GDM's regressors and start, the HMM EM's patterns (2026-12-07, second) -----
    Mutant(
        "interpolate_missing holds the last value instead of interpolating",
        "ppl_switch/data.py",
        "            y[trial, :length, n] = (np.interp(steps, steps[seen], y[trial, :length, n][seen]) if seen.any()",
        "            y[trial, :length, n] = (y[trial, :length, n][seen][np.maximum(np.searchsorted(steps[seen], steps, 'right') - 1, 0)] if seen.any()",
        ("tests/test_gdm_start.py", "-k", "interpolate_missing"),
        "a gap filled with the previous observed value (a step function) instead of the line between its ends",
    ),
    Mutant(
        "hard-state EM scores the missing targets",
        "ppl_switch/infer/gdm_start.py",
        '    observed = np.asarray(data.mask)[:, 1:][pair_mask].astype(float)',
        '    observed = np.ones_like(np.asarray(data.mask)[:, 1:][pair_mask], dtype=float)',
        ("tests/test_gdm_start.py", "-k", "path_enumeration"),
        "the interpolated targets counted as data: the likelihood differs from the enumeration over observed entries",
    ),
    Mutant(
        "GDM.prepare leaves zeros in the missing regressors",
        "ppl_switch/models/gdm.py",
        "        if missing_share(data) > 0:",
        "        if False:",
        ("tests/test_gdm_start.py", "-k", "auto_falls_back"),
        "F y_{t-1} reads 0 for a missing entry (the bias the interpolation removes)",
    ),
    Mutant(
        "hmm conditional fill applies the gain untransposed",
        "ppl_switch/infer/hmm_em.py",
        '        return None, means + jnp.einsum("ckef,cke->ckf", gain_t[ic], r)',
        '        return None, means + jnp.einsum("ckef,ckf->cke", gain_t[ic], r)',
        ("tests/test_baseline_em.py", "-k", "conditional_fill"),
        "S~^-1 M S used where its transpose S M S~^-1 belongs",
    ),
    Mutant(
        "mask patterns indexed wrongly",
        "ppl_switch/ops/mask_patterns.py",
        "    return patterns.astype(jnp.result_type(float)), index.reshape(lead)",
        "    return patterns.astype(jnp.result_type(float)), jnp.roll(index, 1).reshape(lead)",
        ("tests/test_baseline_em.py", "-k", "conditional_fill"),
        "each step given its neighbour's pattern",
    ),
    Mutant(
        "per-pattern Gaussian density without the log-determinant",
        "ppl_switch/models/_emissions.py",
        "    return -0.5 * jnp.sum(white**2, -1) - log_det[index] - 0.5 * jnp.sum(mask, -1) * _LOG_2PI",
        "    return -0.5 * jnp.sum(white**2, -1) - 0.5 * jnp.sum(mask, -1) * _LOG_2PI",
        ("tests/test_emissions.py",),
        "the observed block's normaliser dropped on the per-pattern path (D > 4)",
    ),
    Mutant(
        "EM stall rule never fires",
        "ppl_switch/infer/em_loop.py",
        "            stalled = (i >= STALL_WINDOW) & (best_recent - best_before < threshold)",
        "            stalled = (i >= STALL_WINDOW) & (best_recent - best_before < -jnp.inf)",
        ("tests/test_em_loop.py",),
        "a restart whose float32 objective jitters at its fixed point runs to num_iters and holds every restart",
    ),
    # ----- the compiled guide set-up (2026-12-07) -----
    Mutant(
        "compiled init sets the guide up with the model's key",
        "ppl_switch/infer/svi.py",
        "handlers.seed(guide.set_up, jax.random.split(key, 3)[2])(data)",
        "handlers.seed(guide.set_up, jax.random.split(key, 3)[1])(data)",
        ("tests/test_mean_field_guide.py", "-k", "fit_svi"),
        "fit_svi's start is no longer the one svi.init's eager set-up finds (another prior draw)",
    ),
    Mutant(
        "guide median without the deterministic sites",
        "ppl_switch/guides/mean_field.py",
        "model, args, kwargs, locs, return_deterministic=True))",
        "model, args, kwargs, locs, return_deterministic=False))",
        ("tests/test_mean_field_guide.py", "-k", "autonormal"),
        "fit.estimate of a deterministic site (the HMM's scale_tril) from the draws' mean, not the median's",
    ),
    Mutant(
        "guide event dims from the prior alone",
        "ppl_switch/guides/mean_field.py",
        'event_dim = site["fn"].event_dim + jnp.ndim(locs[name]) - jnp.ndim(site["value"])',
        'event_dim = site["fn"].event_dim',
        ("tests/test_mean_field_guide.py", "-k", "autonormal"),
        "a site whose unconstrained value has another rank (LKJ's Cholesky factor) sums the wrong axes",
    ),
    # ----- the mean-field guide's compiled set-up with Python flags (2026-12-07, third) -----
    Mutant(
        "mean-field set-up traces a Python flag",
        "ppl_switch/guides/mean_field.py",
        "    static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}",
        "    static = {}",
        ("tests/test_mean_field_guide.py", "-k", "flags"),
        "record_log_lik passed as a traced array: the program's `if record_log_lik:` cannot run under jit",
    ),
    Mutant(
        "mean-field set-up cache ignores Python flags",
        "ppl_switch/guides/mean_field.py",
        "        key = None if self.cache_key is None else (self.cache_key, static, shapes_key((args, arrays)))",
        "        key = None if self.cache_key is None else (self.cache_key, shapes_key((args, arrays)))",
        ("tests/test_mean_field_guide.py", "-k", "flags"),
        "a set-up compiled with one flag value reused for the other (the wrong sites)",
    ),
    Mutant(
        "path guide's compiled init sets up with the wrong key",
        "ppl_switch/infer/svi.py",
        "handlers.seed(guide.set_up, jax.random.split(key, 3)[2])(data)",
        "handlers.seed(guide.set_up, jax.random.split(key, 3)[1])(data)",
        ("tests/test_clds_poisson.py", "-k", "compiled_init"),
        "the parameter block's prior-median start drawn with the model's key instead of the guide's: another start",
    ),
    Mutant(
        "a model without a key gets a shared labelled key",
        "ppl_switch/compile_cache.py",
        "    return None if key is None else (label, key)",
        "    return (label, key)",
        ("tests/test_fixed_cost.py", "-k", "labelled"),
        "two models without a usable config() share one compiled guide set-up through (label, None)",
    ),
    Mutant(
        "sequential NUTS chains each started op by op and compiled per chain",
        "ppl_switch/infer/nuts.py",
        'chain_method=_chains_in_one_program if chain_method == "sequential" else chain_method,',
        "chain_method=chain_method,",
        ("tests/test_infer.py", "-k", "one_program"),
        "numpyro's own sequential mode: the same draws, but every chain's start run op by op and its loop compiled again",
    ),
    Mutant(
        "one-program chains lose a chain",
        "ppl_switch/infer/nuts.py",
        "    return lambda per_chain_args: jax.lax.map(single_chain, per_chain_args)",
        "    return lambda per_chain_args: jax.lax.map(single_chain, jax.tree.map(lambda a: a.at[1].set(a[0]), per_chain_args))",
        ("tests/test_infer.py", "-k", "one_program"),
        "every chain after the first given the first chain's key: identical chains, R-hat meaningless",
    ),
    Mutant(
        "full-rank guide's vector in the start dict's (sorted) order",
        "ppl_switch/guides/full_rank.py",
        "        return [(name, tuple(np.shape(self.init_locs[name]))) for name, *_ in self.sites]",
        "        return [(name, tuple(np.shape(loc))) for name, loc in self.init_locs.items()]",
        ("tests/test_mean_field_guide.py", "-k", "full_rank"),
        "the vector laid out in the jitted start's key order, not AutoMultivariateNormal's: another start and layout",
    ),
    Mutant(
        "full-rank guide's Jacobian term with the wrong sign",
        "ppl_switch/guides/full_rank.py",
        "                log_density = -sum_rightmost(ldj, jnp.ndim(ldj) - jnp.ndim(value) + support.event_dim)",
        "                log_density = sum_rightmost(ldj, jnp.ndim(ldj) - jnp.ndim(value) + support.event_dim)",
        ("tests/test_mean_field_guide.py", "-k", "full_rank"),
        "q's density of a constrained site off by twice its log |det J|: a biased ELBO",
    ),
    Mutant(
        "one NUTS chain started op by op again",
        "ppl_switch/infer/nuts.py",
        '    one_program = chain_method != "parallel"',
        "    one_program = False",
        ("tests/test_infer.py", "-k", "one_program"),
        "numpyro's own one-chain run: the same draws, its start op by op and its loop lowered as a program of its own",
    ),
    Mutant(
        "vectorized chains report one chain's steps",
        "ppl_switch/infer/nuts.py",
        "        steps = every * state.i.size",
        "        steps = every",
        ("tests/test_infer.py", "-k", "vectorized_chains_report"),
        "the bar of chain_method='vectorized' ends at 1/num_chains of its steps and jumps to the end",
    ),
    Mutant(
        "the compiled NUTS run's progress reports reach no bar",
        "ppl_switch/infer/nuts.py",
        "        bar.update(int(steps))",
        "        pass",
        ("tests/test_infer.py", "-k", "one_program or vectorized_chains_report"),
        "fit_nuts(progress_bar=True) (the CLI's default) shows a bar that never moves",
    ),
    Mutant(
        "the guide's first try draws with the search's other key",
        "ppl_switch/guides/mean_field.py",
        "                _, try_key = jax.random.split(key)",
        "                try_key, _ = jax.random.split(key)",
        ("tests/test_mean_field_guide.py", "-k", "autonormal or failed_first"),
        "a start numpyro's search never draws: not AutoNormal's start, and not where an eager set-up starts",
    ),
    Mutant(
        "a failed first try kept as the start",
        "ppl_switch/guides/mean_field.py",
        "            locs, valid = search(rng_key, args, arrays)",
        "            pass",
        ("tests/test_mean_field_guide.py", "-k", "failed_first"),
        "a start without a finite density refused instead of searched further: a fit that numpyro starts fails",
    ),
    Mutant(
        "the Laplace sites in the jitted dict's sorted order",
        "ppl_switch/infer/joint_laplace.py",
        "    unpacked = {name: unpacked[name] for name in supports}",
        "    pass",
        ("tests/test_joint_laplace.py", "-k", "dense_joint"),
        "the guide's covariance read with another site layout: the mean-field comparison of the Laplace posterior wrong",
    ),
]


def _copy_checkout(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "*.nc", "out")
    shutil.copytree(ROOT, dest, ignore=ignore)


def run_mutant(mutant: Mutant, scratch: Path, timeout: float) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'not applied' | 'timeout', seconds, detail)."""
    path = scratch / mutant.path
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return "not applied", 0.0, f"fragment found {count} times in {mutant.path}"
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", *mutant.tests],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 1:
        return "caught", seconds, last
    if proc.returncode == 0:
        return "survived", seconds, last
    return f"error (exit {proc.returncode})", seconds, last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run mutants whose name contains any of these words")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default: 900)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.name:<55} {m.path}  <- {', '.join(m.tests)}")
        return 0
    # a sanity check that every fragment still exists in the checkout, before anything runs
    missing = [m.name for m in mutants if (ROOT / m.path).read_text().count(m.old) != 1]
    if missing:
        print(f"mutants whose fragment is not found exactly once (update the list): {missing}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="ppl_switch_mutants_") as tmp:
        scratch = Path(tmp) / "checkout"
        _copy_checkout(scratch)
        for m in mutants:
            status, seconds, detail = run_mutant(m, scratch, args.timeout)
            results.append((m, status))
            print(f"{status:<12} {seconds:6.0f} s  {m.name}  ({detail})", flush=True)
    caught = sum(s == "caught" for _, s in results)
    survived = [m.name for m, s in results if s == "survived"]
    print(f"{caught} caught, {len(survived)} survived, {len(results) - caught - len(survived)} other, of {len(results)}")
    if survived:
        print("survived: " + "; ".join(survived))
    return 0


if __name__ == "__main__":
    sys.exit(main())
