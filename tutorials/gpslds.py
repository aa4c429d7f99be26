# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # gpSLDS: smoothly switching linear dynamics from spikes, with fixed-point uncertainty
#
# The gpSLDS (Hu et al. 2024) models latent neural dynamics as a stochastic differential equation
#
#     dx = f(x) dt + dW,      spikes ~ Poisson process with rate softplus(C x + d),
#
# with a Gaussian-process prior on f whose kernel makes f *locally linear*: J linear systems
# A_j (x - c_j) + e_j blended by a soft partition pi(x) = softmax(W' phi(x) / tau). In weight space the
# prior is exact and finite (J K (K+1) Gaussian weights), so the model is an ordinary NumPyro program
# that SVI and NUTS can fit. We fit the paper's two-rotation benchmark, compare with the RBF GP-SDE, and
# read off fixed points with credible ellipses (from SVI, then with the path sampled by
# Metropolis-within-Gibbs), the slow-point probability map and the posterior variance of the dynamics.
#
# Set `PPL_SWITCH_SMOKE=1` (the test suite does) for a seconds-long run.

# %%
import os
import time

import jax
import matplotlib

matplotlib.use("Agg")
import numpy as np

from ppl_switch.analysis import gpslds_analysis as ga
from ppl_switch.analysis.metrics import affine_aligned_r2
from ppl_switch.datasets.gpslds_synthetic import simulate_gpslds_synthetic, two_rotation_drift
from ppl_switch.infer import fit_nuts, fit_svi
from ppl_switch.infer.path_gibbs import guide_means, sample_path_gibbs
from ppl_switch.models.gpslds import GPSDE, GPSLDS
from ppl_switch.plots import plot_gpslds_summary

SMOKE = os.environ.get("PPL_SWITCH_SMOKE", "0") == "1"
OUT = os.environ.get("PPL_SWITCH_TUTORIAL_OUT", ".")
# smoke: 300 time steps (0.3 s), so that the latents move within a trial (in 100 they barely leave their start
# and nothing about the dynamics can be learned), and 100 SVI steps; the smoke run is compile-bound, so this
# takes the same CPU time as 100 time steps and 30 SVI steps did (73 s against 72 s)
NUM_TRIALS, T = (3, 300) if SMOKE else (30, 2500)
STEPS = 100 if SMOKE else 1500
NUM_PARAM_DRAWS = 20 if SMOKE else 200

# %% [markdown]
# ## 1. The paper's synthetic data
#
# Two rotations (clockwise for x1 < 0, counter-clockwise for x1 > 0) around (-3, 0) and (3, 0), blended
# by sigmoid(x1 / 0.4); 50 neurons emit binary events on a 1 ms grid (Poisson-process limit). Half the
# trials start at (-7, 0), half at (7, 0). The blended field's true fixed points are (+-3.003, 0.0005).

# %%
sim = simulate_gpslds_synthetic(seed=0, num_trials=NUM_TRIALS, num_timesteps=T)
dt = sim["truth"]["dt"]
print("events:", sim["y"].shape, f"mean rate {sim['y'].mean() / dt:.1f} Hz")

# %% [markdown]
# ## 2. Model and SVI
#
# `GPSLDS(num_states=2)` with linear partition features [1, x1, x2]. The default guide is a joint normal
# over all parameters plus, per trial, the paper's Gauss–Markov q(x) (an Euler-discretised linear SDE
# with time-varying A_t, b_t), initialised from PCA of smoothed binned spikes.

# %%
model = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=dt)
data = model.prepare(sim["y"])
guide = model.default_guide(data)  # path started from the data (PCA of smoothed activity), parameters at prior medians
t0 = time.perf_counter()
fit = fit_svi(model, data, guide=guide, num_steps=STEPS, learning_rate=0.02, num_draws=10, progress_bar=False)
print(f"SVI: {STEPS} steps in {time.perf_counter() - t0:.1f} s, final loss {fit.losses[-1]:.1f}")
extra = guide.sample_parameters(jax.random.PRNGKey(1), fit.params, NUM_PARAM_DRAWS)
loss_drop = float(np.mean(fit.losses[:5]) - np.mean(fit.losses[-5:]))
print(f"loss drop (mean of the first 5 steps minus the last 5): {loss_drop:.1f}")
assert loss_drop > 1000, loss_drop  # smoke: 2011 (2542 -> 531)

# %% [markdown]
# ## 3. Latents and dynamics after affine alignment
#
# Latents are identified only up to an affine map; we align the posterior-mean path to the truth,
# x_true ~ P x_hat + o, and compare dynamics in the true coordinates, f_true(x) ~ P f_hat(P^-1 (x - o)).

# %%
x_hat = np.asarray(fit.samples["x"])[0].mean(0)
latent_r2 = affine_aligned_r2(x_hat.reshape(-1, 2), sim["latents"].reshape(-1, 2))
print("latent R² after affine alignment:", round(latent_r2, 3))
P, o = ga.align_latents(x_hat, sim["latents"])
cells, visited = ga.visited_cells(sim["latents"], -10, 10, 20, 5 if SMOKE else 20)
f_hat = ga.drift_draws(model, extra, (cells - o) @ np.linalg.inv(P).T) @ P.T
f_true = np.asarray(two_rotation_drift(cells))
nmse = ga.dynamics_nmse(f_hat.mean(0)[visited], f_true[visited])
print("normalised dynamics MSE on visited cells:", round(nmse, 3))
var = f_hat.var(0).sum(-1)
print(f"posterior var of f: visited {var[visited].mean():.3g}, unvisited {var[~visited].mean():.3g}")
# Expected: smoke (seed 0, float32) R² 0.607, NMSE 0.757, var ratio visited / unvisited 0.064; full
# (benchmarks/results.md, seed 0, 1500 steps) R² 0.950, NMSE 0.090, var 0.41 / 1.29. The NMSE of the zero drift
# is 1: the fit must beat it. x1 alone (trials start at -7 or +7) gives R² 0.5; with the spikes shuffled in
# time the smoke run gives R² 0.485 and NMSE 14.5.
assert latent_r2 >= (0.55 if SMOKE else 0.9), latent_r2
assert nmse < (1.0 if SMOKE else 0.2), nmse
assert var[visited].mean() < (0.2 if SMOKE else 0.6) * var[~visited].mean(), (var[visited].mean(), var[~visited].mean())

# %% [markdown]
# ## 4. Fixed points with credible ellipses, slow points, flow field
#
# For every posterior draw, Newton's method from a grid of starts finds the roots of f in the data
# region; pooled over draws they form clusters whose ellipses are the credible regions of the fixed
# points (at the library's credible probability, as in every figure: 89% under arviz >= 1, 94% before). `add_gpslds_summaries` writes the flow field (mean, variance, slow-point probability,
# partition) and the per-draw roots into the InferenceData. Read SVI's ellipses as too small: on the
# benchmark they hold 19 of 28 true fixed points (model card, "Calibration over more seeds"), because the
# factorised q(x) q(theta) treats the estimated path as if it were known. Section 5 samples p(x, theta | y)
# instead, starting from this fit.

# %%
starts = (ga.grid_points(-8, 8, 6)[0] - o) @ np.linalg.inv(P).T
fp = ga.fixed_points(model, extra, starts)
roots = fp["points"] @ P.T + o
regions = ga.fixed_point_regions(roots)
for r in regions[:3]:
    print(f"fixed point {np.round(r['mean'], 2)} in {r['fraction']:.0%} of draws, sd {np.round(np.sqrt(np.diag(r['cov'])), 2)}")
TRUE_FIXED_POINTS = np.array([[-3.003, 0.0005], [3.003, 0.0005]])


def fixed_point_errors(found):
    """Distance from each true fixed point to the nearest region found in at least half of the draws."""
    means = np.array([r["mean"] for r in found if r["fraction"] >= 0.5]).reshape(-1, 2)
    return np.linalg.norm(TRUE_FIXED_POINTS[:, None] - means[None], axis=-1).min(1) if len(means) else np.full(2, np.inf)


if not SMOKE:  # the smoke fit (100 SVI steps on 0.9 s of data) finds no fixed points near the truth
    # full (benchmarks/results.md, seed 0, 1500 steps): 0.466 / 0.464
    assert np.all(fixed_point_errors(regions) < 0.75), fixed_point_errors(regions)
idata = ga.add_gpslds_summaries(fit, samples=extra, num=20 if SMOKE else 40)
flow = idata["flow_field"]
fig = plot_gpslds_summary(flow, None)
fig.savefig(os.path.join(OUT, "gpslds_flow.png"), dpi=80)

# %% [markdown]
# ## 5. Fixed points with the path sampled: Metropolis-within-Gibbs
#
# `sample_path_gibbs` starts from the fit and alternates the path given the parameters (a Laplace proposal
# at the path's mode, accepted or rejected per trial), the partition and prior scales given the path (the
# weights integrated out) and the weights given both (exact). The readout is held, so the frame is fixed by
# the data -- but the sampled paths are not the guide's shrunk mean path, so align the chain's own mean path
# again. On the benchmark this moves the fixed points onto the truth with ellipses that hold it (model card,
# "Sampling the path"); a full run takes about 1.3-1.5 s per sweep on 2 CPU cores.

# %%
start, path = guide_means(model, guide, fit.params, data)
gibbs = sample_path_gibbs(model, data, start, path, num_draws=3 if SMOKE else 150, burn_in=2 if SMOKE else 100,
                          thin=1 if SMOKE else 2)
print(f"path acceptance {gibbs.path_acceptance.mean():.2f}, partition acceptance {gibbs.partition_acceptance.mean():.2f}")
P_g, o_g = ga.align_latents(gibbs.path_mean, sim["latents"])
roots_g = ga.fixed_points(model, gibbs.samples, (ga.grid_points(-8, 8, 6)[0] - o_g) @ np.linalg.inv(P_g).T)["points"]
regions_g = ga.fixed_point_regions(roots_g @ P_g.T + o_g)
for r in regions_g[:3]:
    print(f"fixed point {np.round(r['mean'], 2)} in {r['fraction']:.0%} of draws, sd {np.round(np.sqrt(np.diag(r['cov'])), 2)}")
# expected path acceptance: smoke 0.27 (4 of 15 trial updates), benchmark 0.59-0.71 per trial
assert gibbs.path_acceptance.mean() >= (0.1 if SMOKE else 0.3), gibbs.path_acceptance.mean()
if not SMOKE:  # benchmark (from refined fits): 0.054-0.233 from the truth
    assert np.all(fixed_point_errors(regions_g) < 0.6), fixed_point_errors(regions_g)

# %% [markdown]
# ## 6. The RBF baseline (GP-SDE) and NUTS at a coarse step
#
# The GP-SDE with an RBF kernel (HSGP basis) has no partition and extrapolates smoothly; on the
# benchmark its dynamics error is larger (see the model card for the measured numbers). NUTS samples
# the exact posterior of the same program; it is practical only for short data at a coarse dt.

# %%
# (skipped in the smoke run: the conformance suite covers both runners for both models)
if not SMOKE:
    rbf = GPSDE(latent_dim=2, obs_dim=50, dt=dt, num_basis=6 if SMOKE else 10)
    fit_rbf = fit_svi(rbf, data, guide=rbf.default_guide(data), num_steps=STEPS,
                      learning_rate=0.02, num_draws=10, progress_bar=False)
    print("RBF GP-SDE final loss", round(float(fit_rbf.losses[-1]), 1))

    coarse = GPSLDS(num_states=2, latent_dim=2, obs_dim=50, dt=0.02, emission="poisson")
    counts = sim["y"][:2, : (T // 20) * 20].reshape(2, T // 20, 20, 50).sum(2)
    nuts = fit_nuts(coarse, counts, num_warmup=10 if SMOKE else 300, num_samples=10 if SMOKE else 300, progress_bar=False)
    print("NUTS divergences:", nuts.num_divergences)
