# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Recurrent SLDS on the NASCAR track
#
# In a recurrent SLDS the next regime depends on where the continuous state is:
# p(z_t = j | z_{t-1} = i, x_{t-1}) = softmax_j(R_ij + W_j x_{t-1} + r_j). On the NASCAR track the regime
# is decided by location alone (two turns around (+-2, 0), two straights), so we fit
# `transitions="recurrent_only"` with the fast path (Laplace-type variational EM, `fit_em`), then look
# at the learned fixed points and the partition of latent space. Set `PPL_SWITCH_SMOKE=1` for a quick run
# (T = 300, 5 iterations, one start: its numbers are not the model card's).

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ppl_switch.analysis.fixed_points import STABILITY_TYPES, add_fixed_points_group, fixed_points, stability_types
from ppl_switch.analysis.metrics import affine_align, affine_aligned_r2, matched_state_accuracy
from ppl_switch.datasets.rslds_nascar import simulate_rslds_nascar
from ppl_switch.infer import fit_em
from ppl_switch.models.rslds import RSLDS
from ppl_switch.plots import plot_dynamics
from ppl_switch.results import get_group

SMOKE = os.environ.get("PPL_SWITCH_SMOKE", "0") == "1"
T = 300 if SMOKE else 10000
OUT = os.environ.get("PPL_SWITCH_TUTORIAL_OUT", ".")

# %% [markdown]
# ## 1. Data: 4 location-decided regimes, 10 noisy linear read-outs

# %%
sim = simulate_rslds_nascar(seed=0, num_timesteps=T)
y, z_true, x_true = sim["y"], sim["states"][0], sim["latents"][0]
print("regime fractions:", np.bincount(z_true, minlength=4) / T)

# %% [markdown]
# ## 2. Fast path: Laplace EM, the default call (float32)
#
# Starts: PCA + one AR(1) fit, regime segmentations from k-means on local linear dynamics (two) and one
# random sticky segmentation; each start runs 100 iterations and the highest final objective wins. The
# objective (an ELBO with the transition term at the mean of q(x)) never decreases. `benchmarks/rslds.py --which
# nascar` makes the same call on the same data, so the numbers printed here are the model card's.

# %%
model = RSLDS(num_states=4, latent_dim=2, obs_dim=10, transitions="recurrent_only")
fit = fit_em(model, y, **(dict(num_iters=5, num_restarts=1) if SMOKE else {}))
objective = -fit.losses
print("objective non-decreasing (up to float32 rounding):", bool(np.all(np.diff(objective) >= -1e-5 * np.abs(objective).max())))
x_hat = fit.samples["x"][0, 0, 0]
z_hat = fit.samples["q_state_probs"][0, 0, 0].argmax(-1)
accuracy = matched_state_accuracy(z_true, z_hat, 4)
print("state accuracy:", accuracy)  # model card (full run, float32): 0.9898
print("latent R2 after affine alignment:", affine_aligned_r2(x_hat, x_true))
assert np.isfinite(objective).all()
if not SMOKE:
    assert accuracy >= 0.98, accuracy

# %% [markdown]
# ## 3. Fixed points and the regime partition
#
# The latent space is identified up to an affine map; we map the fixed points x*_k = (I - A_k)^-1 b_k
# into the true coordinates with the alignment of the latent paths. The turns should sit near (+-2, 0).

# %%
_, coef = affine_align(x_hat, x_true)
fp, eig = fixed_points(fit.samples["dynamics_matrix"][0, 0], fit.samples["dynamics_bias"][0, 0])
for k in range(4):
    mapped = np.r_[fp[k], 1.0] @ coef if np.isfinite(fp[k]).all() else fp[k]
    print(f"regime {k}: fixed point {np.round(mapped, 2)}, {STABILITY_TYPES[stability_types(eig[k:k + 1], fp[k:k + 1])[0]]}")
lo, hi = x_hat.min(0), x_hat.max(0)
grid = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], 30), np.linspace(lo[1], hi[1], 30)), -1).reshape(-1, 2)
idata = add_fixed_points_group(fit.idata, model, grid=grid)
print(get_group(idata, "fixed_points"))

# %%
ax = plot_dynamics({k: v[0] for k, v in fit.samples.items()}, model=model, latents=x_hat[:2000], states=z_hat[:2000])
ax.set_title("learned flow, partition and fixed points")
plt.savefig(os.path.join(OUT, "rslds_nascar_dynamics.png"), dpi=100)
