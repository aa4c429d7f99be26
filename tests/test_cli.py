"""The command line and the user-data loaders: simulate -> fit -> summary -> plot, and clear errors."""

import json

import numpy as np
import pytest

from ppl_switch import cli, datasets
from ppl_switch.data import DataError
from ppl_switch.results import get_group, load_inference_data


def test_simulate_fit_summary_plot(tmp_path, capsys):
    data_path, fit_path, fig_path = tmp_path / "d.npz", tmp_path / "fit.nc", tmp_path / "fit.png"
    assert cli.main(["simulate", "hmm", "--out", str(data_path), "--option", "num_timesteps=40"]) == 0
    with np.load(data_path) as f:
        assert f["y"].shape == (3, 40, 2) and f["states"].shape == (3, 40)
    args = ["fit", "hmm", "--data", str(data_path), "--num-states", "3", "--latent-dim", "2", "--method", "svi",
            "--num-steps", "30", "--seed", "0", "--out", str(fit_path), "--quiet"]
    assert cli.main(args) == 0
    assert "--latent-dim does not apply" in capsys.readouterr().out
    idata = load_inference_data(fit_path)
    probs = get_group(idata, "posterior_states")["state_probs"]
    assert probs.dims == ("trial", "time", "state") and probs.shape == (3, 40, 3)
    np.testing.assert_allclose(probs.sum("state").values, 1.0, atol=1e-5)
    sidecar = json.loads((tmp_path / "fit.nc.json").read_text())
    assert sidecar["model"] == "hmm" and sidecar["model_config"]["num_states"] == 3
    assert cli.main(["summary", str(fit_path), "--var-names", "transition_matrix", "--stats-only"]) == 0
    assert "transition_matrix" in capsys.readouterr().out
    assert cli.main(["plot", str(fit_path), "--out", str(fig_path)]) == 0
    assert fig_path.stat().st_size > 10_000


def test_fit_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 2)))
    assert cli.main(["fit", "hmm", "--data", str(bad), "--num-states", "2", "--out", str(tmp_path / "f.nc")]) == 2
    assert "no array named 'y'" in capsys.readouterr().err
    assert cli.main(["fit", "nosuchmodel", "--data", "hmm", "--out", str(tmp_path / "f.nc")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["fit", "hmm", "--data", "hmm", "--num-states", "0", "--out", str(tmp_path / "f.nc")]) == 2
    assert "num_states" in capsys.readouterr().err


def test_csv_loader_ragged_and_missing(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("trial,t,a,b,u\n1,1,0.5,1.0,0\n1,0,0.1,,1\n2,0,3,4,0\n")
    out = datasets.load_csv(path, time_column="t", input_columns=["u"])
    assert [y.shape for y in out["y"]] == [(2, 2), (1, 2)]
    np.testing.assert_allclose(out["y"][0][0], [0.1, np.nan])  # sorted by t; the empty cell is missing
    np.testing.assert_allclose(out["inputs"][0][:, 0], [1, 0])


@pytest.mark.parametrize(
    "text, message",
    [("trial,a\n1,x\n", "expected a number"), ("a,b\n1,2\n", "no trial column"), ("trial,a\n1,2,3\n", "expected 2 cells")],
)
def test_csv_loader_errors(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        datasets.load_csv(path)
