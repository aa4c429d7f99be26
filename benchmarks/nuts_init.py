"""NUTS on the README's example: R-hat with numpyro's prior-uniform start against init="svi", and the wall
time of chain_method "sequential" against "vectorized".

    python benchmarks/nuts_init.py --init prior        # README: max R-hat 9.52, min ESS 2.3 (and the warnings)
    python benchmarks/nuts_init.py --init svi          # README: max R-hat 1.003, min ESS 936
    python benchmarks/nuts_init.py --chain-methods     # README: sequential 7.9-9.1 s, vectorized 14.2-34.4 s

Data: ``ppl_switch.datasets.simulate("hmm", seed=0)`` (what ``ppl-switch simulate hmm`` writes: 3 trials x
200 steps, 2 dims); model HMM(num_states=3, obs_dim=2); NUTS 2 chains x (500 warmup + 500 draws), seed 0,
float32. Times include compilation.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np

from ppl_switch import datasets
from ppl_switch.infer import fit_nuts
from ppl_switch.models import HMM


def init_run(init: str) -> None:
    data = datasets.simulate("hmm", seed=0)
    model = HMM(num_states=3, obs_dim=2)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below from fit.warnings
        fit = fit_nuts(model, data["y"], lengths=data.get("lengths"), num_warmup=500, num_samples=500, num_chains=2,
                       seed=0, init=init, progress_bar=False)
    d = fit.diagnostics
    print(f"init={init}: {time.perf_counter() - start:.1f} s; max R-hat {d['max_r_hat']:.4g} ({d['max_r_hat_site']}), "
          f"min ESS {d['min_ess']:.1f} ({d['min_ess_site']}), chain mean lp {np.round(d['chain_lp_means'], 1).tolist()}")
    print(repr(fit))


def chain_methods() -> None:
    model = HMM(num_states=2, obs_dim=2)
    data, _ = model.simulate(jax.random.PRNGKey(1), 2, 100)
    warnings.simplefilter("ignore")
    for rep in range(2):
        for method in ("vectorized", "sequential"):
            start = time.perf_counter()
            fit_nuts(model, data.y, num_warmup=300, num_samples=300, num_chains=2, chain_method=method, seed=rep,
                     progress_bar=False)
            print(f"repeat {rep}: {method} {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=["prior", "svi"])
    parser.add_argument("--chain-methods", action="store_true")
    args = parser.parse_args()
    if args.init:
        init_run(args.init)
    if args.chain_methods:
        chain_methods()
