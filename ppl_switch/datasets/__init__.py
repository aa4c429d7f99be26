"""Built-in datasets (simulators of the papers' benchmarks) and loaders for user data.

``simulate(name, seed=0, **options)`` returns a dict with ``y`` (trials, time, obs) and, where known,
``inputs``, ``states`` (trials, time) and ``latents`` (trials, time, latent); ``DATASETS`` lists the names
with the model each is meant for.
"""

from __future__ import annotations

import importlib

import numpy as np

from ppl_switch.datasets.loaders import load_csv, load_data, load_npz

# name -> (module, function, the model it suits, one-line description)
DATASETS = {
    "hmm": ("ppl_switch.datasets.from_models", "simulate_hmm", "hmm", "3-state Gaussian HMM, 2-D observations"),
    "arhmm": ("ppl_switch.datasets.from_models", "simulate_arhmm", "arhmm", "2-state AR(1) HMM, 2-D observations"),
    "lds": ("ppl_switch.datasets.from_models", "simulate_lds", "lds", "2-D rotating latent, 5-D Gaussian observations"),
    "slds_tutorial": ("ppl_switch.datasets.slds_tutorial", "simulate_slds_tutorial", "slds",
                      "the SLDS tutorial's 2-state rotating/contracting system, 2-D observations"),
    "nascar": ("ppl_switch.datasets.nascar", "simulate_nascar", "gdm", "NASCAR track, 4 relaxed states, 10-D observations"),
    "head_direction": ("ppl_switch.datasets.head_direction", "simulate_head_direction", "clds",
                       "ring-attractor head-direction benchmark (CLDS), 10 neurons, condition = heading"),
    "gpslds_synthetic": ("ppl_switch.datasets.gpslds_synthetic", "simulate_gpslds_synthetic", "gpslds",
                         "two rotations (Hu et al. 2024 Sec. 4.1), 50 neurons, binary events on a 1 ms grid"),
    "gpslds_limit_cycle": ("ppl_switch.datasets.gpslds_synthetic", "simulate_gpslds_limit_cycle", "gpslds",
                           "limit cycle (App. D, reconstructed generator), quadratic boundary of radius 2"),
    "rslds_nascar": ("ppl_switch.datasets.rslds_nascar", "simulate_rslds_nascar", "rslds",
                     "NASCAR track (rSLDS paper), 4 location-decided discrete regimes, 10-D observations"),
    "lorenz": ("ppl_switch.datasets.lorenz", "simulate_lorenz_bernoulli", "rslds",
               "Lorenz attractor, 100 Bernoulli neurons, all neurons masked at t in [750, 850)"),
}


def register(name: str, module: str, function: str, model: str, description: str) -> None:
    """Add a dataset to the registry (used by model modules and by users' own simulators)."""
    DATASETS[name] = (module, function, model, description)


def simulate(name: str, seed: int = 0, **options) -> dict:
    """Simulate the built-in dataset ``name``; see ``DATASETS`` for the names."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; built-in datasets are {sorted(DATASETS)}")
    module, function, _, _ = DATASETS[name]
    out = getattr(importlib.import_module(module), function)(seed=seed, **options)
    return {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in out.items() if v is not None}


__all__ = ["DATASETS", "register", "simulate", "load_csv", "load_data", "load_npz"]
