# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # The baseline workflow: HMM and LDS
#
# This tutorial walks through what every model in ppl-switch shares: data in `(trials, time, obs)` layout
# with ragged trials and missing entries, a NumPyro program whose discrete states (HMM) or continuous
# latents (LDS) are marginalised exactly, fits with NUTS and SVI, and ArviZ output with named dims.
# Set the environment variable `PPL_SWITCH_SMOKE=1` (the test suite does) for a seconds-long run.

# %%
import os

import arviz as az
import jax
import matplotlib

matplotlib.use("Agg")
import numpy as np

from ppl_switch.analysis.metrics import affine_aligned_r2, matched_state_accuracy
from ppl_switch.infer import fit_nuts, fit_svi, load
from ppl_switch.models import HMM, LDS
from ppl_switch.plots import plot_fit
from ppl_switch.results import get_group

SMOKE = os.environ.get("PPL_SWITCH_SMOKE", "0") == "1"
T = 60 if SMOKE else 300
WARMUP, SAMPLES = (30, 30) if SMOKE else (500, 500)
OUT = os.environ.get("PPL_SWITCH_TUTORIAL_OUT", ".")

# %% [markdown]
# ## 1. Simulate a 3-state Gaussian HMM with ragged trials and missing entries
#
# Three trials of different lengths; a block of observations in trial 0 is missing. A list of arrays is
# the ragged form; NaN entries are treated as missing (the mask is inferred), and nothing else is dropped.

# %%
hmm = HMM(num_states=3, obs_dim=2)
key_params, key_data = jax.random.split(jax.random.PRNGKey(0))
true_params = hmm.default_params(key_params)
data, truth = hmm.simulate(key_data, num_trials=3, num_timesteps=T, params=true_params)
lengths = [T, T - T // 4, T // 2]
trials = [np.array(data.y[i, :n]) for i, n in enumerate(lengths)]
trials[0][T // 3 : T // 3 + 10, 0] = np.nan  # ten missing values of the first coordinate
print("trial lengths:", [len(y) for y in trials])

# %% [markdown]
# ## 2. NUTS with the state path summed out
#
# The program samples initial probabilities, the transition matrix and the emission parameters; the state
# path is marginalised by the forward algorithm, so NUTS runs on a continuous posterior. States are
# decoded afterwards for every draw (smoothed marginals, Viterbi path, one sampled path).

# %%
fit = fit_nuts(hmm, trials, num_warmup=WARMUP, num_samples=SAMPLES, num_chains=2, seed=1, progress_bar=False)
print(fit)
print(az.summary(fit.idata, var_names=["transition_matrix"], kind="stats"))

# %%
probs = np.asarray(get_group(fit.idata, "posterior_states")["state_probs"])
valid = np.arange(T)[None, :] < np.array(lengths)[:, None]
accuracy = matched_state_accuracy(np.asarray(truth["states"])[valid], probs.argmax(-1)[valid], num_states=3)
print(f"state accuracy after matching labels: {accuracy:.3f}")
# expected: 1.000 (full run and smoke run); the test suite's smoke run checks the claim's direction
assert accuracy >= 0.95, accuracy

# %% [markdown]
# The pointwise log-likelihood is per (trial, time step), marginal over states, and zero on padded or
# fully missing steps, so PSIS-LOO works directly:

# %%
print(az.loo(fit.idata))

# %% [markdown]
# ## 3. Save, reload, plot
#
# `fit.save` writes the InferenceData as netCDF plus a small JSON sidecar (model name and options, runner
# settings, library versions); nothing is pickled.

# %%
path = os.path.join(OUT, "hmm_fit.nc")
fit.save(path)
reloaded = load(path)
print(reloaded)
plot_fit(reloaded.idata, os.path.join(OUT, "hmm_fit.png"), true_states=np.asarray(truth["states"]))

# %% [markdown]
# ## 4. A linear dynamical system, fitted with SVI
#
# The LDS program integrates the latent path out with the Kalman filter; SVI (a mean-field normal guide over the
# parameters) fits the dynamics and emissions, and the smoothed latents are compared with the truth after
# an affine alignment (latents are identified only up to an invertible linear map).

# %%
lds = LDS(latent_dim=2, obs_dim=5)
lds_params = lds.default_params(jax.random.PRNGKey(2))
lds_data, lds_truth = lds.simulate(jax.random.PRNGKey(3), num_trials=2, num_timesteps=T, params=lds_params)
lds_fit = fit_svi(lds, lds_data, num_steps=50 if SMOKE else 3000, learning_rate=0.02, seed=4, progress_bar=False)
print(lds_fit, "final loss", float(lds_fit.losses[-1]))

# %%
point = {name: np.asarray(draws).mean(axis=(0, 1)) for name, draws in lds_fit.samples.items()}
smoothed = np.asarray(lds.latent_posterior(point, lds_data)["means"])
r2 = affine_aligned_r2(smoothed.reshape(-1, 2), np.asarray(lds_truth["latents"]).reshape(-1, 2))
print(f"latent R^2 after affine alignment: {r2:.3f}")
# expected: about 0.88 after the smoke run's 50 SVI steps (0.883 measured, float32); higher after the full 3000
assert r2 >= (0.8 if SMOKE else 0.9), r2
