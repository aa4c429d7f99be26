"""Memory of the HMM EM on long series: XLA's own count of the compiled program's scratch memory.

For one trial of T steps and K states, compiles the HMM EM program (diagonal Gaussian, D = 2, one restart,
float32) without running it and prints ``memory_analysis()`` of the compiled executable: temp (scratch
buffers, the peak the program needs beyond its arguments and outputs) and arguments, beside the size of
the (T-1, K, K) pairwise marginals that an E-step holding them would need. The E-step sums expected
transition counts inside the smoother (:func:`ppl_switch.ops.hmm.hmm_posterior_stats`), so temp should
grow like T K, not T K^2.

    python benchmarks/em_memory.py                    # T = 1e5, K = 20 and 50
    python benchmarks/em_memory.py --T 1000000 --K 50
"""

from __future__ import annotations

import argparse


def compiled_memory(num_timesteps: int, num_states: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ppl_switch.infer import hmm_em
    from ppl_switch.models import HMM

    model = HMM(num_states, obs_dim=2, emission="diag_gaussian")
    program = hmm_em._build_program(model, 5, 1e-6, False, 1e-6, False, False)  # 5 iterations, ML, no start
    T = num_timesteps
    y, mask, lengths = jnp.zeros((1, T, 2)), jnp.ones((1, T, 2), bool), jnp.array([T])
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    analysis = program.lower(keys, y, mask, lengths, None, None).compile().memory_analysis()
    mib = 2.0**-20
    return {"T": T, "K": num_states, "temp_mib": analysis.temp_size_in_bytes * mib,
            "argument_mib": analysis.argument_size_in_bytes * mib,
            "pairwise_mib": (T - 1) * num_states**2 * 4 * mib, "jax": jax.__version__}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[100_000])
    parser.add_argument("--K", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args(argv)
    print("| T | K | temp MiB | arguments MiB | (T-1) K^2 float32 MiB |")
    print("|---|---|---|---|---|")
    for T in args.T:
        for K in args.K:
            r = compiled_memory(T, K)
            print(f"| {T} | {K} | {r['temp_mib']:.1f} | {r['argument_mib']:.1f} | {r['pairwise_mib']:.1f} |", flush=True)
    print(f"# jax {r['jax']}")


if __name__ == "__main__":
    main()
