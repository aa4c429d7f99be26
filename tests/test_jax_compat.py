"""The install's range of jax and arviz generations: the jaxlib 0.10 LAPACK deadlock workaround and the one
credible-interval convention (ArviZ's default of the installed generation) that figures and summaries share.

Runs in float32 (nothing here depends on the precision); the deadlock check runs in a subprocess.
"""

import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
import xarray as xr

from ppl_switch.plots import credible_interval, interval_label, plot_fit
from ppl_switch.results import credible_interval_convention
from subprocess_env import ROOT, checkout_env

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _xla_flags_after_import(xla_flags):
    """XLA_FLAGS as a fresh interpreter sees it after ``import ppl_switch`` (None: unset before)."""
    env = checkout_env()
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", "import os, ppl_switch; print(os.environ['XLA_FLAGS'])"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_scheduler_workaround_is_set_on_jaxlib_0_10_only():
    flags = _xla_flags_after_import(None)
    assert "--xla_cpu_multi_thread_eigen=false" in flags
    assert (f"{SCHEDULER_FLAG}=false" in flags) == version("jaxlib").startswith("0.10.")


def test_a_scheduler_flag_the_user_set_is_kept():
    flags = _xla_flags_after_import(f"{SCHEDULER_FLAG}=true")
    assert flags.count(SCHEDULER_FLAG) == 1 and f"{SCHEDULER_FLAG}=true" in flags


def test_concurrent_batched_choleskys_finish():
    """benchmarks/lapack_hang.py, one trial of 100 calls, each running eight independent batched Choleskys
    (4096 x 8 x 8): on jaxlib 0.10.2 without the workaround this hangs (no result after 60 s)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "lapack_hang.py"), "--trials", "1", "--calls", "100",
               "--timeout", "240"]
    result = subprocess.run(command, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "trial 0: ok" in result.stdout


# ----- the credible-interval convention -----------------------------------------------------------------


def _summary_interval(draws):
    """(lower, upper, column names) of the interval az.summary reports for one scalar variable."""
    import arviz as az

    table = az.summary({"a": draws}, kind="stats", round_to="none")
    columns = [c for c in table.columns if c not in ("mean", "sd")]
    assert len(columns) == 2, table.columns
    return float(table[columns[0]].iloc[0]), float(table[columns[1]].iloc[0]), columns


def test_convention_is_what_arviz_summary_reports():
    draws = np.random.default_rng(0).gamma(2.0, size=(2, 500))  # skewed: HDI and ETI differ by ~0.2
    prob, kind = credible_interval_convention()
    lower, upper, columns = _summary_interval(draws)
    assert credible_interval(draws.ravel()) == pytest.approx((lower, upper), rel=1e-12)
    if kind == "hdi":  # arviz < 1: hdi_3%, hdi_97%
        assert columns == [f"hdi_{100 * (1 - prob) / 2:g}%", f"hdi_{100 * (1 + prob) / 2:g}%"]
    else:  # arviz >= 1: eti89_lb, eti89_ub
        assert columns == [f"{kind}{100 * prob:.0f}_lb", f"{kind}{100 * prob:.0f}_ub"]
    other = "eti" if kind == "hdi" else "hdi"
    assert credible_interval(draws.ravel(), kind=other) != pytest.approx((lower, upper), abs=0.05)


@pytest.mark.parametrize("n", [7, 37, 100])
def test_hdi_is_the_narrowest_interval_holding_enough_draws(n):
    x = np.random.default_rng(n).lognormal(size=n)
    prob = 0.8
    s = np.sort(x)
    need = int(np.floor(prob * n)) + 1  # draws inside [s_i, s_j]: j - i + 1
    brute = min((s[j] - s[i], s[i], s[j]) for i in range(n) for j in range(i, n) if j - i + 1 >= need)
    lo, hi = credible_interval(x, prob=prob, kind="hdi")
    assert (hi - lo, lo, hi) == pytest.approx(brute)


def test_eti_leaves_equal_tails_and_keeps_the_other_axes():
    x = np.random.default_rng(1).standard_t(3, size=(4001, 3))
    lo, hi = credible_interval(x, axis=0, prob=0.9, kind="eti")
    assert lo.shape == hi.shape == (3,)
    np.testing.assert_allclose((x < lo).mean(0), 0.05, atol=1 / 4001)
    np.testing.assert_allclose((x > hi).mean(0), 0.05, atol=1 / 4001)
    lo_t, hi_t = credible_interval(x.T, axis=1, prob=0.9, kind="eti")
    np.testing.assert_array_equal((lo, hi), (lo_t, hi_t))
    lo_h, hi_h = credible_interval(x, axis=0, prob=0.9, kind="hdi")
    for k in range(3):
        assert (lo_h[k], hi_h[k]) == credible_interval(x[:, k], prob=0.9, kind="hdi")


@pytest.mark.parametrize("kwargs, message", [({"prob": 1.0}, "prob"), ({"prob": 0.0}, "prob"),
                                             ({"kind": "hpd"}, "kind")])
def test_bad_interval_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        credible_interval(np.arange(10.0), **kwargs)


def test_the_predictive_band_of_plot_fit_follows_the_convention():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(2)
    T = 6
    predictive = rng.gamma(2.0, size=(2, 50, 1, T, 1))
    tree = xr.DataTree.from_dict({
        "observed_data": xr.Dataset({"y": (("trial", "time", "obs"), rng.normal(size=(1, T, 1)))}),
        "posterior_predictive": xr.Dataset({"y": (("chain", "draw", "trial", "time", "obs"), predictive)}),
    })
    fig = plot_fit(tree)
    ax = fig.axes[0]
    prob, kind = credible_interval_convention()
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == f"{interval_label(prob, kind)} predictive"
    lo, hi = credible_interval(predictive[..., 0, :, 0].reshape(-1, T), axis=0)
    band = ax.collections[0].get_paths()[0].vertices
    for t in range(T):
        ys = band[np.isclose(band[:, 0], t), 1]
        assert np.isclose(ys, lo[t]).any() and np.isclose(ys, hi[t]).any()
    plt.close(fig)
