"""Closed-form EM (Baum-Welch) for the HMM and the ARHMM, as functions of (model, data).

E-step: the forward-backward smoother (:func:`ppl_switch.ops.hmm.hmm_posterior_stats`) on the model's own
emission log-likelihoods, so masks, ragged trials and the ARHMM's first-lags convention are exactly the
model's. M-step (weights w_tk = p(z_t = k | y) on observed steps, pairs inside each trial's length):

* transitions: P_ij ∝ sum_t p(z_t=i, z_{t+1}=j | y) (+ sticky pseudo-counts under MAP);
* initial: "learned": pi = mean_n p(z_0 | y_n); "stationary": pi = stationary(P), and P maximises
  the transition term plus sum_n E log pi(P)_{z_0} (a generalised M-step: the counts' maximiser,
  refined by gradient steps on the logits, kept only where it does not lower that term); fixed: kept;
* HMM Gaussian: weighted means and covariances; with partly observed steps, the missing entries are
  latent too: given state k they are Gaussian given the observed ones (:func:`conditional_fill`), and the
  M-step uses their conditional means and covariances (exact EM: the observed-data likelihood never
  decreases); diagonal: per coordinate over observed entries; Poisson: weighted means of the counts;
* ARHMM: weighted least squares of y_t on [y_{t-1}, ..., y_{t-L}, 1, u_t] per state, residual
  covariance. The first L steps' density N(m0, diag(s0^2)) is the same in every state; EM keeps m0,
  s0 at the mean and standard deviation of those steps, so it maximises log p(y_{L:} | y_{<L}).

Under ``map=True`` the updates are conditional maximisers of log-likelihood + log prior (an ECM:
means given the variances, then variances given the means), closed-form for the models' priors
where one exists (Dirichlet, Normal, HalfNormal scales of a diagonal covariance, Gamma rates).

Covariances get ``min_covar`` times the data variance on the diagonal (an empty state would
otherwise be singular); Poisson rates are floored at ``min_covar`` times the mean count.

Everything -- restarts' starting points, the loop, the restarts -- is one jitted program, compiled
once per (model configuration, data shape, options).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln, xlogy

from ppl_switch.compile_cache import CompiledCache
from ppl_switch.data import DataError, SequenceData, check_positive_int, partly_observed_steps
from ppl_switch.infer.em_loop import best_restart, compiled_program, run_em, run_on_devices
from ppl_switch.infer.sharding import real_trials
from ppl_switch.ops.mask_patterns import mask_patterns, observed_block
from ppl_switch.models import arhmm as arhmm_mod
from ppl_switch.models import hmm as hmm_mod
from ppl_switch.ops.hmm import hmm_posterior_stats, stationary_distribution

#: gradient steps on the transition logits in the stationary-initial M-step
STATIONARY_STEPS = 20


# ----------------------------------------------------------------------------------------------
# conversions between EM parameters and the model's sites
# ----------------------------------------------------------------------------------------------


def _cov_to_sites(cov):
    """(K, D, D) covariances -> scales (K, D), corr_cholesky (K, D, D), scale_tril (K, D, D)."""
    tril = jnp.linalg.cholesky(cov)
    scales = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))
    return scales, tril / scales[..., :, None], tril


def _to_sites(model, p):
    """Site-form parameters of ``model`` from the EM parameters ``p``."""
    site = {"transition_matrix": p["P"]}
    site["initial_probs"] = p["pi"] if model.learns_initial else model.initial_probs_of(p["P"])
    if model.name == "arhmm":
        K, D, _ = p["weights"].shape
        L = model.lags
        site["ar_weights"] = jnp.transpose(p["weights"][..., : L * D].reshape(K, D, L, D), (0, 2, 1, 3))
        site["biases"] = p["weights"][..., L * D]
        if model.input_dim:
            site["input_weights"] = p["weights"][..., L * D + 1 :]
        site["scales"], site["corr_cholesky"], site["scale_tril"] = _cov_to_sites(p["covs"])
        site["initial_mean"], site["initial_scales"] = p["initial_mean"], p["initial_scales"]
    elif model.emission == "poisson":
        site["rates"] = p["rates"]
    elif model.emission == "diag_gaussian":
        site["means"], site["scales"] = p["means"], jnp.sqrt(p["vars"])
    else:
        site["means"] = p["means"]
        site["scales"], site["corr_cholesky"], site["scale_tril"] = _cov_to_sites(p["covs"])
    return site


def _from_sites(model, site, dtype):
    """EM parameters from (user-given) site-form parameters."""
    a = lambda name: jnp.asarray(site[name], dtype)  # noqa: E731
    K = model.num_states
    p = {"P": a("transition_matrix")}
    p["pi"] = a("initial_probs") if model.learns_initial else jnp.full((K,), 1.0 / K, dtype)

    def cov():
        scales = a("scales")
        corr = jnp.asarray(site.get("corr_cholesky", jnp.ones(scales.shape + (1,))), dtype)
        tril = scales[..., :, None] * corr
        return tril @ jnp.swapaxes(tril, -1, -2)

    if model.name == "arhmm":
        A = a("ar_weights")  # (K, L, D, D)
        D = A.shape[-1]
        parts = [jnp.transpose(A, (0, 2, 1, 3)).reshape(K, D, -1), a("biases")[..., None]]
        if model.input_dim:
            parts.append(a("input_weights"))
        p.update(weights=jnp.concatenate(parts, -1), covs=cov(), initial_mean=a("initial_mean"), initial_scales=a("initial_scales"))
    elif model.emission == "poisson":
        p["rates"] = a("rates")
    elif model.emission == "diag_gaussian":
        p.update(means=a("means"), vars=a("scales") ** 2)
    else:
        p.update(means=a("means"), covs=cov())
    return p


# ----------------------------------------------------------------------------------------------
# priors (MAP)
# ----------------------------------------------------------------------------------------------


def _log_dirichlet(x, conc):
    """Dirichlet log density over the last axis, with 0 log 0 = 0 (a probability EM set to exactly 0
    under a unit concentration is in the support)."""
    return gammaln(conc.sum(-1)) - gammaln(conc).sum(-1) + xlogy(conc - 1.0, x).sum(-1)


def _log_prior(model, site):
    """log p(theta) of the sites EM updates, under the model's priors (MAP objective)."""
    K = model.num_states
    conc = jnp.ones((K, K)) + model.sticky * jnp.eye(K)
    lp = _log_dirichlet(site["transition_matrix"], conc).sum()
    if model.learns_initial:
        lp = lp + _log_dirichlet(site["initial_probs"], jnp.ones(K))
    if model.name == "arhmm":
        lp = lp + dist.Normal(0.0, arhmm_mod.AR_WEIGHT_PRIOR_SCALE).log_prob(site["ar_weights"]).sum()
        lp = lp + dist.Normal(0.0, arhmm_mod.BIAS_PRIOR_SCALE).log_prob(site["biases"]).sum()
        if model.input_dim:
            lp = lp + dist.Normal(0.0, arhmm_mod.INPUT_WEIGHT_PRIOR_SCALE).log_prob(site["input_weights"]).sum()
        return lp + dist.HalfNormal(hmm_mod.SCALE_PRIOR_SCALE).log_prob(site["scales"]).sum()
    if model.emission == "poisson":
        return lp + dist.Gamma(hmm_mod.RATE_PRIOR_SHAPE, hmm_mod.RATE_PRIOR_RATE).log_prob(site["rates"]).sum()
    lp = lp + dist.Normal(0.0, hmm_mod.MEAN_PRIOR_SCALE).log_prob(site["means"]).sum()
    return lp + dist.HalfNormal(hmm_mod.SCALE_PRIOR_SCALE).log_prob(site["scales"]).sum()


def _map_scale_sq(n, ss, tau):
    """argmax_s of -n log s - ss / (2 s^2) - s^2 / (2 tau^2) (Gaussian scale with a HalfNormal(tau)
    prior), as s^2: the positive root of u^2 / tau^2 + n u - ss = 0."""
    return 0.5 * tau**2 * (jnp.sqrt(n**2 + 4.0 * ss / tau**2) - n)


# ----------------------------------------------------------------------------------------------
# M-step pieces
# ----------------------------------------------------------------------------------------------


def _chain_objective(P, counts, first):
    """sum_ij counts_ij log P_ij + sum_k first_k log stationary(P)_k (the stationary-initial M-step)."""
    pi = stationary_distribution(P)
    return jnp.sum(xlogy(counts, jnp.where(counts > 0, P, 1.0))) + jnp.sum(xlogy(first, jnp.where(first > 0, pi, 1.0)))


def _chain_gain(P, P_ref, counts, first):
    """_chain_objective(P) - _chain_objective(P_ref), summed from per-entry log ratios: the gains EM
    compares are tiny next to the objective, and in float32 a difference of two totals loses them."""
    safe = lambda x, w: jnp.where(w > 0, x, 1.0)  # noqa: E731
    ratio_P = jnp.log(safe(P, counts)) - jnp.log(safe(P_ref, counts))
    ratio_pi = jnp.log(safe(stationary_distribution(P), first)) - jnp.log(safe(stationary_distribution(P_ref), first))
    return jnp.sum(counts * ratio_P) + jnp.sum(first * ratio_pi)


def _stationary_m_step(P_old, counts, first):
    """Generalised M-step for P when pi = stationary(P): start from the counts' maximiser, take
    gradient steps on the logits (step halved on failure, grown on success), never end below P_old."""
    rows = counts.sum(-1, keepdims=True)
    tiny = jnp.finfo(counts.dtype).tiny
    P0 = jnp.where(rows > 0, counts / jnp.maximum(rows, tiny), P_old)
    f = lambda th: _chain_objective(jax.nn.softmax(th, -1), counts, first)  # noqa: E731
    theta0 = jnp.log(jnp.maximum(P0, tiny))
    scale = 1.0 / (rows + 1.0)  # gradients are counts-sized; steps in logit space are O(1)

    def step(_, carry):
        theta, lr = carry
        cand = theta + lr * scale * jax.grad(f)(theta)
        ok = _chain_gain(jax.nn.softmax(cand, -1), jax.nn.softmax(theta, -1), counts, first) > 0
        return jnp.where(ok, cand, theta), jnp.where(ok, lr * 1.5, lr * 0.5)

    theta, _ = jax.lax.fori_loop(0, STATIONARY_STEPS, step, (theta0, jnp.asarray(1.0, counts.dtype)))
    P_new = jax.nn.softmax(theta, -1)
    return jnp.where(_chain_gain(P_new, P_old, counts, first) >= 0, P_new, P_old)


def _weighted_cov(w, resid, ridge):
    """(K, D, D) sum_t w_tk r_tk r_tk' / sum_t w_tk + ridge I; w (N, T, K), resid (N, T, K, D)."""
    nk = w.sum((0, 1))
    cov = jnp.einsum("ntk,ntkd,ntke->kde", w, resid, resid) / jnp.maximum(nk, 1e-30)[:, None, None]
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    return cov + jnp.diag(ridge)


def conditional_fill(w, y0, mask, means, covs):
    """The E-step of a full-covariance Gaussian emission with missing entries, per step and state.

    Given z_t = k, the missing entries y_m of y_t are Gaussian given the observed y_o:
    E[y_m | y_o] = mu_m + S_mo S_oo^-1 (y_o - mu_o), Cov = S_mm - S_mo S_oo^-1 S_om. Written without gathers
    (the pattern varies per step): with M = diag(mask) and S~ = M S M + (I - M) (S_oo on the observed block,
    identity elsewhere), E[y_t | y_o, k] = mu + S M S~^-1 M (y - mu) and Cov[y_t | y_o, k] = S - S M S~^-1 M S
    (zero on observed rows and columns). A fully observed step gives (y, 0).

    Both depend on the step only through its pattern M, so the D x D solves run once per distinct pattern
    and state (:func:`mask_patterns`: at most 2^D of them, 1024 for D = 10, however long the series) and
    each step only applies its pattern's gain; the conditional covariances are summed per pattern.

    Args:
        w: (N, T, K) weights p(z_t = k | y) (zero on steps without an observation).
        y0: (N, T, D) observations, 0 where missing; mask: (N, T, D).
        means: (K, D); covs: (K, D, D) the current emission parameters.

    Returns:
        ``(fill, cov_sum)``: (N, T, K, D) conditional means E[y_t | y_o, z_t = k], and (K, D, D)
        sum_t w_tk Cov[y_t | y_o, z_t = k]. The per-step part runs in chunks, so memory is
        O(chunk K D^2 + U K D^2), not O(N T K D^2).
    """
    N, T, D = y0.shape
    K = means.shape[0]
    dtype = y0.dtype
    n = N * T
    patterns, index = mask_patterns(mask)  # (U, D), (N, T)
    index = index.reshape(n)
    num_patterns = patterns.shape[0]
    # per pattern and state: S~ = M S M + (I - M); gain' = S~^-1 M S (so the gain is S M S~^-1, S~ symmetric)
    m = patterns[:, None, :].astype(dtype)  # (U, 1, D)
    MS = m[..., :, None] * covs  # M S (U, K, D, D)
    gain_t = jnp.linalg.solve(observed_block(m, covs), MS)  # S~^-1 M S (U, K, D, D)
    cond = covs - jnp.einsum("ukde,ukdf->ukef", MS, gain_t)  # S - S M S~^-1 M S
    pattern_weights = jax.ops.segment_sum(w.reshape(n, K), index, num_segments=num_patterns)  # (U, K)
    cov_sum = jnp.einsum("uk,ukde->kde", pattern_weights, cond)

    chunk = int(max(1, min(n, 2**22 // (K * D * D))))
    pad = (-n) % chunk

    def chunks(a):  # (n, ...) -> (n_chunks, chunk, ...)
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk) + a.shape[1:])

    def one_chunk(_, xs):
        yc, mc, ic = xs  # (c, D), (c, D), (c,)
        r = mc[:, None, :] * (yc[:, None, :] - means)  # M (y - mu) (c, K, D)
        return None, means + jnp.einsum("ckef,cke->ckf", gain_t[ic], r)

    steps = (y0.reshape(n, D), mask.reshape(n, D).astype(dtype), index)
    _, fill = jax.lax.scan(one_chunk, None, tuple(chunks(a) for a in steps))
    cov_sum = 0.5 * (cov_sum + jnp.swapaxes(cov_sum, -1, -2))
    return fill.reshape(-1, K, D)[:n].reshape(N, T, K, D), cov_sum


# ----------------------------------------------------------------------------------------------
# the program
# ----------------------------------------------------------------------------------------------


def _features(model, y, mask, step):
    """(N, T, F) standardised features for the restarts' nearest-centre starts."""
    y0 = jnp.where(mask, y, 0.0)
    if model.name == "arhmm":
        prev = jnp.concatenate([y0[:, :1], y0[:, :-1]], 1)
        f, fm = jnp.concatenate([y0, prev], -1), jnp.concatenate([mask, mask], -1)
    elif model.emission == "poisson":
        f, fm = jnp.log1p(y0), mask
    else:
        f, fm = y0, mask
    fm = fm & step[..., None]
    n = jnp.maximum(fm.sum((0, 1)), 1)
    mu = jnp.where(fm, f, 0.0).sum((0, 1)) / n
    sd = jnp.sqrt(jnp.where(fm, (f - mu) ** 2, 0.0).sum((0, 1)) / n) + 1e-12
    return jnp.where(fm, (f - mu) / sd, 0.0)


_PROGRAMS = CompiledCache("HMM/ARHMM EM programs")




def _build_program(model, num_iters: int, tol: float, use_map: bool, min_covar: float, given_start: bool,
                   partly_observed: bool):
    """The jitted EM of one model configuration (cached: one compilation per data shape); ``partly_observed``:
    the full-covariance Gaussian M-step fills missing entries (:func:`conditional_fill`)."""
    K = model.num_states
    is_ar = model.name == "arhmm"
    emission = "gaussian" if is_ar else model.emission
    initial = "learned" if model.learns_initial else ("stationary" if isinstance(model.initial, str) else "fixed")

    def program(keys, y, mask, lengths, inputs, start):
        dtype = y.dtype
        N, T, D = y.shape
        data = SequenceData(y, mask, lengths, inputs)
        time_ok = jnp.arange(T) < lengths[:, None]  # (N, T)
        real = real_trials(lengths)  # (N,) False only for the trials that pad N for devices=
        num_real = real.sum()
        pair_ok = time_ok[:, 1:]  # a transition t -> t+1 inside the trial
        step = model.step_mask(data)
        y0 = jnp.where(mask, y, 0.0)
        nobs = jnp.maximum(mask.sum((0, 1)), 1)
        ymean = y0.sum((0, 1)) / nobs
        yvar = jnp.where(mask, (y0 - ymean) ** 2, 0.0).sum((0, 1)) / nobs
        ridge = min_covar * jnp.maximum(yvar, jnp.finfo(dtype).tiny)
        if is_ar:
            L = model.lags
            regress = step & (jnp.arange(T) >= L)  # (N, T) steps with a state-specific regression
            lagged = arhmm_mod.lagged(y0, L)  # (N, L, T, D)
            cols = [jnp.moveaxis(lagged, 1, 2).reshape(N, T, L * D), jnp.ones((N, T, 1), dtype)]
            if model.input_dim:
                cols.append(inputs)
            X = jnp.concatenate(cols, -1)  # (N, T, F)
            first = mask & (jnp.arange(T) < L)[:, None]
            n0 = jnp.maximum(first.sum((0, 1)), 1)
            m0 = jnp.where(first, y, 0.0).sum((0, 1)) / n0
            s0 = jnp.sqrt(jnp.where(first, (y0 - m0) ** 2, 0.0).sum((0, 1)) / n0)
            s0 = jnp.where(s0 > 0, s0, jnp.sqrt(yvar) + 1.0)  # one observation: its own spread is 0

        def e_step(p):
            site = _to_sites(model, p)
            ll = model.emission_log_likelihoods(site, data)
            pi, P = site["initial_probs"], site["transition_matrix"]
            # expected transition counts without the (N, T-1, K, K) pairwise marginals (memory O(N T K))
            sm = jax.vmap(lambda l, m, w: hmm_posterior_stats(pi, P, l, m, w))(ll, step, pair_ok.astype(dtype))
            gamma = sm.smoothed_probs * step[..., None]
            counts = sm.transition_counts.sum(0)
            loglik = jnp.where(real, sm.log_normalizer, 0.0).sum()  # a padding trial's is 0 only up to rounding
            obj = loglik + _log_prior(model, site) if use_map else loglik
            return (gamma, counts, sm.smoothed_probs[:, 0] * real[:, None]), loglik, obj

        def m_emission(p, w):
            """Emission parameters from weights w (N, T, K) (and, under MAP, the current ones)."""
            if is_ar:
                wr = w * regress[..., None]
                G = jnp.einsum("ntk,ntf,ntg->kfg", wr, X, X)
                c = jnp.einsum("ntk,ntf,ntd->kfd", wr, X, y0)
                F = X.shape[-1]
                jitter = min_covar * jnp.trace(G, axis1=-2, axis2=-1)[:, None, None] / F * jnp.eye(F, dtype=dtype)
                if use_map:  # D = 1: ridge with the prior precisions scaled by the noise variance
                    prec = jnp.concatenate(
                        [
                            jnp.full((model.lags * D,), arhmm_mod.AR_WEIGHT_PRIOR_SCALE**-2.0),
                            jnp.full((1,), arhmm_mod.BIAS_PRIOR_SCALE**-2.0),
                            jnp.full((model.input_dim,), arhmm_mod.INPUT_WEIGHT_PRIOR_SCALE**-2.0),
                        ]
                    ).astype(dtype)
                    jitter = p["covs"][:, 0, 0][:, None, None] * jnp.diag(prec)
                W = jnp.swapaxes(jnp.linalg.solve(G + jitter, c), -1, -2)  # (K, D, F)
                resid = y0[:, :, None, :] - jnp.einsum("kdf,ntf->ntkd", W, X)
                if use_map:
                    nk = wr.sum((0, 1))
                    ss = jnp.einsum("ntk,ntkd->kd", wr, resid**2)
                    covs = _map_scale_sq(nk[:, None], ss, hmm_mod.SCALE_PRIOR_SCALE)[..., None]
                else:
                    covs = _weighted_cov(wr, resid, ridge)
                return {"weights": W, "covs": covs, "initial_mean": m0, "initial_scales": s0}
            wm = w[..., None] * mask[:, :, None, :]  # (N, T, K, D) weight per state and observed entry
            nk = jnp.maximum(wm.sum((0, 1)), 1e-30)  # (K, D)
            s1 = jnp.einsum("ntkd,ntd->kd", wm, y0)
            if emission == "poisson":
                if use_map:
                    rates = (hmm_mod.RATE_PRIOR_SHAPE - 1.0 + s1) / (hmm_mod.RATE_PRIOR_RATE + wm.sum((0, 1)))
                else:
                    rates = s1 / nk
                return {"rates": jnp.maximum(rates, min_covar * jnp.maximum(ymean, 1e-3))}
            if emission == "diag_gaussian" or use_map:  # under MAP, "gaussian" is D = 1
                if use_map:
                    var_old = p["vars"] if emission == "diag_gaussian" else p["covs"][..., 0]
                    means = s1 / (wm.sum((0, 1)) + var_old / hmm_mod.MEAN_PRIOR_SCALE**2)
                else:
                    means = s1 / nk
                ss = jnp.einsum("ntkd,ntkd->kd", wm, (y0[:, :, None, :] - means) ** 2)
                var = _map_scale_sq(wm.sum((0, 1)), ss, hmm_mod.SCALE_PRIOR_SCALE) if use_map else ss / nk + ridge
                return {"means": means, "vars": var} if emission == "diag_gaussian" else {"means": means, "covs": var[..., None]}
            if partly_observed:  # missing entries are latent: their conditional moments given state and y_o
                fill, cov_sum = conditional_fill(w, y0, mask, p["means"], p["covs"])
                nw = jnp.maximum(w.sum((0, 1)), 1e-30)
                means = jnp.einsum("ntk,ntkd->kd", w, fill) / nw[:, None]
                covs = _weighted_cov(w, fill - means, ridge)
                return {"means": means, "covs": covs + cov_sum / nw[:, None, None]}
            means = s1 / nk  # full covariance, every step fully observed or fully missing
            covs = _weighted_cov(w, y0[:, :, None, :] - means, ridge)
            return {"means": means, "covs": covs}

        def m_step(p, stats):
            gamma, counts, first = stats
            if use_map:
                counts = counts + model.sticky * jnp.eye(K, dtype=dtype)
            out = {"pi": p["pi"]}
            if initial == "stationary":
                out["P"] = _stationary_m_step(p["P"], counts, first.sum(0))
            else:
                rows = jnp.maximum(counts.sum(-1, keepdims=True), jnp.finfo(dtype).tiny)
                out["P"] = jnp.where(rows > jnp.finfo(dtype).tiny, counts / rows, p["P"])
            if initial == "learned":
                out["pi"] = first.sum(0) / num_real  # the mean over real trials
            out.update(m_emission(p, gamma))
            return out

        def init(key):
            if given_start:
                return start
            feats = _features(model, y, mask, regress if is_ar else step)
            ok = (regress if is_ar else step).reshape(-1)
            flat = feats.reshape(N * T, -1)
            idx = jax.random.choice(key, N * T, (K,), replace=False, p=ok / ok.sum())
            dist2 = jnp.sum((flat[:, None, :] - flat[idx][None]) ** 2, -1)  # (N T, K)
            hard = jax.nn.one_hot(jnp.argmin(dist2, -1), K, dtype=dtype).reshape(N, T, K)
            stay = 0.9 if K > 1 else 1.0
            P = jnp.full((K, K), (1 - stay) / max(K - 1, 1), dtype) + (stay - (1 - stay) / max(K - 1, 1)) * jnp.eye(K, dtype=dtype)
            p = {"pi": jnp.full((K,), 1.0 / K, dtype), "P": P}
            p.update(_ml_start(hard))  # also the start of the MAP's ECM (it needs current variances)
            return p

        def _ml_start(hard):
            w = hard * (regress if is_ar else step)[..., None]
            if is_ar:
                wr = w * regress[..., None]
                G = jnp.einsum("ntk,ntf,ntg->kfg", wr, X, X)
                c = jnp.einsum("ntk,ntf,ntd->kfd", wr, X, y0)
                F = X.shape[-1]
                jitter = 1e-6 * jnp.trace(G, axis1=-2, axis2=-1)[:, None, None] / F * jnp.eye(F, dtype=dtype)
                W = jnp.swapaxes(jnp.linalg.solve(G + jitter, c), -1, -2)
                resid = y0[:, :, None, :] - jnp.einsum("kdf,ntf->ntkd", W, X)
                return {"weights": W, "covs": _weighted_cov(wr, resid, ridge), "initial_mean": m0, "initial_scales": s0}
            wm = w[..., None] * mask[:, :, None, :]
            nk = jnp.maximum(wm.sum((0, 1)), 1e-30)
            means = jnp.einsum("ntkd,ntd->kd", wm, y0) / nk
            if emission == "poisson":
                return {"rates": jnp.maximum(means, min_covar * jnp.maximum(ymean, 1e-3))}
            var = jnp.einsum("ntkd,ntkd->kd", wm, (y0[:, :, None, :] - means) ** 2) / nk + ridge
            if emission == "diag_gaussian":
                return {"means": means, "vars": var}
            if partly_observed:  # zeros in place of missing entries would bias a full covariance: start diagonal
                return {"means": means, "covs": jax.vmap(jnp.diag)(var)}
            return {"means": means, "covs": _weighted_cov(w, y0[:, :, None, :] - means, ridge)}

        return run_em(init, e_step, m_step, keys, num_iters, tol)

    return jax.jit(program)


def _check(model, data: SequenceData, use_map: bool) -> None:
    """Refuse, before compiling, what the closed-form updates do not cover."""
    builtin = arhmm_mod.ARHMM if isinstance(model, arhmm_mod.ARHMM) else hmm_mod.HMM
    changed = [m for m in ("emission_log_likelihoods", "sample_emission_params")
               if getattr(type(model), m, None) is not getattr(builtin, m, None)]
    if changed:  # a user's subclass with its own emission: the M-step below would not be its maximiser
        raise NotImplementedError(
            f"{type(model).__name__}.em: the closed-form M-step is {builtin.__name__}'s own emission's, and "
            f"{type(model).__name__} overrides {' and '.join(changed)}; fit it with fit_svi or fit_nuts, and set "
            "em = None in the class so that ppl_switch.fit does not choose EM"
        )
    D = data.obs_dim
    full = model.name == "arhmm" or model.emission == "gaussian"
    if model.name == "arhmm" and D > 1 and partly_observed_steps(data.mask):  # missing regressors: no closed form
        raise DataError(
            "mask: the ARHMM's EM needs every step fully observed or fully missing (a missing entry is also a "
            "regressor of the next steps); use fit_svi for partly observed steps"
        )
    if use_map and full and D > 1:
        raise NotImplementedError(
            "map=True: the LKJ prior on a full covariance has no closed-form M-step; use map=False, "
            "emission='diag_gaussian', or fit_svi with an AutoDelta guide"
        )
    if model.name == "arhmm" and not (np.asarray(data.lengths) > model.lags).any():
        raise DataError(f"y: EM needs at least one trial longer than lags={model.lags}")


def chain_em(model, data: SequenceData, *, key=None, params=None, num_iters: int = 500, num_restarts: int = 8,
             tol: float = 1e-6, map: bool = False, min_covar: float = 1e-6, devices=None):
    """EM for an HMM or ARHMM; ``model.em`` delegates here.

    Args:
        model: an :class:`~ppl_switch.models.hmm.HMM` or :class:`~ppl_switch.models.arhmm.ARHMM`.
        data: validated SequenceData ((N, T, D) y and mask, lengths, inputs).
        key: PRNG key for the restarts' starting points (nearest-centre assignments to K random
            observed steps; chain 0.9-sticky, pi uniform).
        params: optional site-form start; then one run from it (``num_restarts`` is ignored).
        num_iters: maximum M-steps per restart.
        num_restarts: starts run side by side (one vmapped program); the highest objective is kept.
        tol: stop when the objective has moved by less than this (nats), or than its float
            resolution, in 3 consecutive iterations.
        map: maximise log-likelihood + log prior (closed-form cases only) instead of the likelihood.
        min_covar: covariance floor, relative to the data variance (and Poisson rate floor, relative
            to the mean count).
        devices: None (JAX's default device), a number of devices, a list of ``jax.Device`` or a Mesh
            with a ``"trial"`` axis: the N trials are padded with empty trials to a multiple of the
            device count and split over the devices (:mod:`ppl_switch.infer.sharding`); the sums over
            trials become cross-device reductions inside the one compiled program. Same result as on one
            device up to float rounding.

    Returns:
        ``(params, history)``: site-form estimate and ``{"log_likelihoods", "objective",
        "restart_objectives", "num_iterations", "converged"}``.
    """
    num_iters = check_positive_int(num_iters, "num_iters")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol: expected a non-negative number of nats, got {tol!r}")
    if not (isinstance(min_covar, (int, float)) and min_covar >= 0):
        raise ValueError(f"min_covar: expected a non-negative number, got {min_covar!r}")
    _check(model, data, bool(map))
    dtype = jnp.result_type(float)
    key = jax.random.PRNGKey(0) if key is None else key
    start = None
    if params is not None:
        start, num_restarts = _from_sites(model, params, dtype), 1
    keys = jax.random.split(key, num_restarts)
    partial = model.name == "hmm" and model.emission == "gaussian" and partly_observed_steps(data.mask)
    run = compiled_program(_PROGRAMS, _build_program, model, num_iters, float(tol), bool(map),
                           float(min_covar), start is not None, partial)
    out = run_on_devices(run, keys, data, dtype, start, devices)
    best, history = best_restart(out)
    p = jax.tree.map(lambda a: a[best], out.params)
    site = {name: np.asarray(v) for name, v in _to_sites(model, p).items()}
    return site, history
