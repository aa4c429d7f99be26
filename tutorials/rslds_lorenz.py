# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Recurrent SLDS on the Lorenz attractor seen through Bernoulli neurons
#
# 100 neurons fire with probability sigmoid(c_n . x_t + d_n) where x_t is the (standardised) Lorenz
# attractor. A two-regime rSLDS with D = 3 approximates the attractor by two linear spirals, one per lobe;
# the recurrent transitions learn where in latent space the switch happens. All neurons are hidden for
# t in [750, 850): we check how well the posterior firing probabilities reconstruct that block.
# Set `PPL_SWITCH_SMOKE=1` for a quick run.

# %%
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

jax.config.update("jax_enable_x64", True)

from ppl_switch.analysis.metrics import affine_aligned_r2, matched_state_accuracy
from ppl_switch.datasets.lorenz import simulate_lorenz_bernoulli
from ppl_switch.infer import fit_em
from ppl_switch.models.rslds import RSLDS

SMOKE = os.environ.get("PPL_SWITCH_SMOKE", "0") == "1"
T = 900 if SMOKE else 10000
N = 20 if SMOKE else 100
OUT = os.environ.get("PPL_SWITCH_TUTORIAL_OUT", ".")

# %%
sim = simulate_lorenz_bernoulli(seed=0, num_timesteps=T, num_neurons=N)
print("mean firing rate:", sim["y"][sim["mask"]].mean())

# %% [markdown]
# ## Fast path: Laplace EM with the Jaakkola–Jordan bound for the Bernoulli likelihood
#
# The start smooths the spikes (Gaussian kernel, 5 steps), fits PCA + an SLDS-style start to that, and
# regresses the spikes on the resulting latents; the EM objective never decreases.

# %%
model = RSLDS(num_states=2, latent_dim=3, obs_dim=N, emission="bernoulli", transitions="recurrent")
fit = fit_em(model, sim["y"], mask=sim["mask"], num_iters=5 if SMOKE else 40, num_restarts=1 if SMOKE else 2, x64=True)
params = {k: v[0, 0] for k, v in fit.samples.items()}
prob_hat = np.asarray(model.firing_probabilities(params))[0]
prob = sim["params"]["firing_probs"]
hidden = ~sim["mask"][0].any(-1)
print("firing-probability correlation, hidden block:", np.corrcoef(prob_hat[hidden].ravel(), prob[hidden].ravel())[0, 1])
print("firing-probability correlation, observed steps:", np.corrcoef(prob_hat[~hidden].ravel(), prob[~hidden].ravel())[0, 1])
print("lobe segmentation accuracy:", matched_state_accuracy(sim["states"][0], params["q_state_probs"][0].argmax(-1), 2))
print("latent R2 after affine alignment:", affine_aligned_r2(params["x"][0], sim["latents"][0]))

# %%
fig, axes = plt.subplots(2, 1, figsize=(8, 4), sharex=True)
window = slice(650, 900)
axes[0].imshow(prob[window].T, aspect="auto", vmin=0, vmax=1)
axes[0].set_title("true firing probabilities (t = 650..900)")
axes[1].imshow(prob_hat[window].T, aspect="auto", vmin=0, vmax=1)
axes[1].set_title("posterior (all neurons hidden at t = 750..850)")
plt.savefig(os.path.join(OUT, "rslds_lorenz_reconstruction.png"), dpi=100)
