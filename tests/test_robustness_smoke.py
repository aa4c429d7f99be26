"""Smoke-sized robustness suite: tiny cells through benchmarks/robustness.py's own functions (the data
generator, the default-path fit and its measurements, the subprocess wrapper, the report), float32."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import robustness as rb  # noqa: E402


def _cell(model, **axes):
    base = dict(noise=0.1, T=100, K=2, latent=0, obs=2, missing=0.0, ragged=False, dtype="float32")
    return {"model": model, **base, **axes}


def test_generator_sets_the_noise_the_mask_and_the_ragged_lengths():
    cell = _cell("hmm", noise=0.01, missing=0.2, ragged=True)
    sim = rb.simulate_cell(cell, seed=3)
    assert sim["y"].shape == (3, 100, 2) and list(sim["lengths"]) == [100, 70, 40]
    inside = np.arange(100)[None, :] < sim["lengths"][:, None]
    mask = sim["mask"]
    assert not mask[~inside].any() and np.isnan(sim["y"][~mask]).all() and np.isfinite(sim["y"][mask]).all()
    assert abs(1 - mask[inside].mean() - 0.2) < 0.03  # 20% hidden inside the trials (hidden share of 420 entries)
    # the observation noise around the true state's mean is the cell's sd
    from ppl_switch.models.hmm import HMM

    import jax

    with jax.enable_x64(False):
        means = np.asarray(HMM(2, 2).default_params(jax.random.split(jax.random.PRNGKey(3))[0])["means"])
    resid = (sim["y"] - means[sim["states"]])[mask]
    assert abs(resid.std() - 0.01) < 0.001
    # a seed names one data set
    again = rb.simulate_cell(cell, seed=3)
    np.testing.assert_array_equal(np.nan_to_num(again["y"]), np.nan_to_num(sim["y"]))


@pytest.fixture(scope="module")
def hmm_records():
    return [rb.run_fit(_cell("hmm", missing=m), seed=0) for m in (0.0, 0.2)]


def test_hmm_default_path_meets_the_bar_or_refuses_by_name(hmm_records):
    full, missing = hmm_records
    assert full["status"] == "ok" and full["runner"] == "em"
    assert full["state_accuracy"] >= rb.BARS["hmm"]
    # 20% missing entries: the default (full-covariance EM) either fits at the bar or names the argument
    if missing["status"] == "ok":
        assert missing["state_accuracy"] >= rb.BARS["hmm"]
    else:
        assert missing["status"] == "rejected" and missing["error"].startswith("DataError: mask:")


def test_lds_default_path_recovers_the_latent_with_missing_entries():
    rec = rb.run_fit(_cell("lds", K=1, latent=2, obs=5, missing=0.2), seed=0)
    assert rec["status"] == "ok" and rec["nonfinite_sites"] == []
    assert rec["latent_r2"] >= 0.95 and "state_accuracy" not in rec


def test_subprocess_timeout_is_a_record_not_a_hang():
    rec = rb.fit_in_subprocess(_cell("hmm"), 0, timeout=0.05)
    assert rec["status"] == "timeout" and rec["seed"] == 0 and rec["cell"] == rb.cell_key(_cell("hmm"))


def test_report_counts_refusals_failures_and_the_bar(tmp_path):
    ok = dict(_cell("hmm"), cell=rb.cell_key(_cell("hmm")), status="ok", wall_s=1.0)
    recs = [dict(ok, seed=0, state_accuracy=0.99), dict(ok, seed=1, state_accuracy=0.93),
            dict(ok, seed=2, status="refused", error="FitError: EM M-step: Q not positive definite"),
            dict(ok, seed=3, status="nonfinite")]
    (row,) = rb.summarise(recs)
    assert (row["ok"], row["refused"], row["failed"]) == (3 - 1, 1, 1)
    assert row["acc_mean"] == pytest.approx(0.96) and row["acc_min"] == 0.93 and row["at_bar"] is True
    assert "| 2 / 1 / 1 |" in rb.report(recs) and "| hmm | 4 | 3 (75%) | 1 | 1 / 1 |" in rb.report(recs)
    # resumable: the pairs already written are skipped
    out = tmp_path / "r.jsonl"
    out.write_text("".join(__import__("json").dumps(r) + "\n" for r in recs))
    assert rb.done_pairs(str(out)) == {(ok["cell"], s) for s in range(4)}


def test_targets_follow_the_issue():
    assert rb.is_target(_cell("slds", noise=0.447)) and not rb.is_target(_cell("slds", noise=0.1))
    assert rb.is_target(_cell("gdm", noise=0.01)) and not rb.is_target(_cell("gdm", noise=1.0))
    assert rb.is_target(_cell("hmm", noise=1.0)) and not rb.is_target(_cell("lds"))
    cells = rb.expand(rb.QUICK, ["lds", "hmm"], {"noise": [0.5], "K": [3]})
    assert [c["model"] for c in cells[:1]] == ["hmm"] and {c["noise"] for c in cells} == {0.5}
    assert {c["K"] for c in cells if c["model"] == "hmm"} == {3} and {c["K"] for c in cells if c["model"] == "lds"} == {1}
