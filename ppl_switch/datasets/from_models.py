"""Datasets drawn from the baseline models' own simulators with their default parameters."""

from __future__ import annotations

import jax
import numpy as np

from ppl_switch.datasets._float32_draws import float32_draws


@float32_draws
def _from_model(model, seed: int, num_trials: int, num_timesteps: int) -> dict:
    key_params, key_data = jax.random.split(jax.random.PRNGKey(seed))
    params = model.default_params(key_params)
    data, truth = model.simulate(key_data, num_trials, num_timesteps, params=params)
    out = {"y": np.asarray(data.y), "lengths": np.asarray(data.lengths)}
    if data.inputs is not None:
        out["inputs"] = np.asarray(data.inputs)
    for name in ("states", "latents"):
        if name in truth:
            out[name] = np.asarray(truth[name])
    return out


def simulate_hmm(seed: int = 0, num_trials: int = 3, num_timesteps: int = 200, num_states: int = 3, obs_dim: int = 2):
    from ppl_switch.models.hmm import HMM

    return _from_model(HMM(num_states=num_states, obs_dim=obs_dim), seed, num_trials, num_timesteps)


def simulate_arhmm(seed: int = 0, num_trials: int = 3, num_timesteps: int = 200, num_states: int = 2, obs_dim: int = 2):
    from ppl_switch.models.arhmm import ARHMM

    return _from_model(ARHMM(num_states=num_states, obs_dim=obs_dim), seed, num_trials, num_timesteps)


def simulate_lds(seed: int = 0, num_trials: int = 3, num_timesteps: int = 200, latent_dim: int = 2, obs_dim: int = 5):
    from ppl_switch.models.lds import LDS

    return _from_model(LDS(latent_dim=latent_dim, obs_dim=obs_dim), seed, num_trials, num_timesteps)
