"""The command line never shows a traceback: each mistake a new user makes is one line naming the argument
and the fix, exit status 2, found before anything expensive (the error tests pass a --data file that does
not exist wherever the mistake must be found before the data is read); any other exception is one line
with its type, exit status 1, and --debug shows the traceback. Also: --help shows every default, what a
fit reports, the one-chain summary, and `ppl-switch demo` end to end (in a subprocess).

Runs in float32 (the user's precision); nothing here compiles a model except the demo subprocess.
"""

import argparse
import logging
import re
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from ppl_switch import cli
from ppl_switch.infer.checks import objective_movement
from ppl_switch.models import MODELS, get_model
from ppl_switch.results import build_inference_data, save_inference_data


def run(capsys, *argv):
    """``main(argv)`` in-process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, *needles):
    """Exit 2, one line ``ppl-switch CMD: error: ...`` containing every needle, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"ppl-switch \w+: error: ", lines[0]), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def missing(tmp_path):
    """A --data path that does not exist: an error found before loading data must not mention it."""
    return tmp_path / "never_read.npz"


# ----- mistakes the arguments alone reveal: reported before the data is read --------------------------


def test_missing_required_model_options_name_the_flags(tmp_path, capsys, missing):
    code, _, err = run(capsys, "fit", "slds", "--data", missing, "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--num-states", "--latent-dim", "'slds'", "add e.g. --num-states 2 --latent-dim 2")
    code, _, err = run(capsys, "fit", "slds", "--data", missing, "--num-states", 2, "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--latent-dim")
    assert "--num-states" not in err
    # an option given through --option counts as given: the next complaint is about the data file
    code, _, err = run(capsys, "fit", "lds", "--data", missing, "--option", "latent_dim=2", "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--data", "does not exist")


def test_every_required_constructor_argument_is_checked():
    """check_model_options against the constructors themselves: a model built from the checked options
    never fails for a missing argument."""
    for name in MODELS:
        given = {}
        while True:
            try:
                cli.check_model_options(name, given)
                break
            except cli.UsageError as err:
                missing = [p for p in ("num_states", "latent_dim") if cli.MODEL_FLAGS[p] in str(err)]
                assert missing, err
                given.update({p: 2 for p in missing})
        get_model(name, **given)  # no TypeError


def test_method_the_model_lacks_names_its_methods(tmp_path, capsys, missing):
    without_em = sorted(name for name in MODELS if "em" not in cli.supported_methods(name))
    assert without_em, "every model has EM now: pick another unsupported method for this test"
    name = without_em[0]
    code, _, err = run(capsys, "fit", name, "--data", missing, "--method", "em", "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--method", repr(name), "auto, svi, nuts")
    assert cli.supported_methods("slds") == ["auto", "svi", "nuts", "em"]


def test_runner_flags_of_another_method(tmp_path, capsys, missing):
    code, _, err = run(capsys, "fit", "hmm", "--data", missing, "--num-states", 2, "--method", "svi", "--num-warmup", 10,
                       "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--num-warmup", "--method nuts")
    from ppl_switch.infer.recommended import resolve_runner

    runner = resolve_runner(get_model("hmm", num_states=2))[0]
    family = cli.RUNNER_FAMILY[runner]
    flag = next(dest for dest, methods in cli.RUNNER_FLAGS.items() if family not in methods)
    code, _, err = run(capsys, "fit", "hmm", "--data", missing, "--num-states", 2, "--" + flag.replace("_", "-"), 10,
                       "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--" + flag.replace("_", "-"), f"recommended method of 'hmm' ({family})")


def test_only_given_runner_flags_reach_the_runner(monkeypatch):
    parser = cli.make_parser()
    base = ["fit", "hmm", "--data", "x.npz", "--out", "f.nc"]
    args = parser.parse_args(base + ["--method", "svi"])
    assert cli.runner_overrides(args, "svi") == {}
    args = parser.parse_args(base + ["--method", "nuts", "--num-samples", "7"])
    assert cli.runner_overrides(args, "nuts") == {"num_samples": 7, "num_chains": 2}
    args = parser.parse_args(base + ["--method", "nuts", "--num-chains", "4", "--init", "svi"])
    assert cli.runner_overrides(args, "nuts") == {"num_chains": 4, "init": "svi"}
    # --method auto goes to ppl_switch.infer.fit with the given flags only
    seen = {}
    monkeypatch.setattr("ppl_switch.infer.fit", lambda model, y, **kw: seen.update(kw) or "fit")
    data = {"y": np.zeros((1, 3, 2))}
    assert cli.run_fit("model", data, "auto", seed=3, quiet=True, overrides={"num_steps": 5}) == "fit"
    assert seen == {"num_steps": 5, "seed": 3, "x64": False, "progress_bar": False, "mask": None, "lengths": None,
                    "inputs": None}


def test_unknown_model_and_option(tmp_path, capsys, missing):
    code, _, err = run(capsys, "fit", "nosuchmodel", "--data", missing, "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "MODEL", "'nosuchmodel'", "hmm")
    code, _, err = run(capsys, "fit", "hmm", "--data", missing, "--num-states", 2, "--option", "colour=1", "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "--option", "colour", "num_states")
    code, _, err = run(capsys, "fit", "hmm", "--data", missing, "--num-states", 0, "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, "num_states")


@pytest.mark.parametrize("where", ["no_such_dir/f.nc", "a_file/f.nc", "a_dir", "/proc/f.nc"])
def test_unwritable_out_is_found_before_the_data(tmp_path, capsys, missing, where):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    out = where if where.startswith("/") else tmp_path / where
    code, _, err = run(capsys, "fit", "hmm", "--data", missing, "--num-states", 2, "--out", out)
    assert_usage_error(code, err, "--out")
    assert "never_read" not in err


def test_unwritable_out_dir_of_the_demo_and_out_of_simulate(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out_dir in (tmp_path / "a_file", tmp_path / "a_file" / "sub", "/proc/ppl_switch_demo"):
        code, _, err = run(capsys, "demo", "--out-dir", out_dir)
        assert_usage_error(code, err, "--out-dir")
    code, _, err = run(capsys, "simulate", "hmm", "--out", tmp_path / "nope" / "d.npz")
    assert_usage_error(code, err, "--out", "does not exist")
    code, _, err = run(capsys, "simulate", "hmm", "--out", tmp_path / "d.npz", "--option", "colour=1")
    assert_usage_error(code, err, "--option", "colour", "num_timesteps")


# ----- data files that load but hold no usable observations -------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, needles",
    [
        (dict(y=np.zeros((0, 10, 2))), ["--data", "no observations", "(0, 10, 2)"]),
        (dict(y=np.zeros((2, 0, 2))), ["--data", "no observations"]),
        (dict(y=np.array([np.zeros((3, 2)), np.zeros((4, 2))], dtype=object)), ["--data", "object arrays ('y')", "lengths"]),
        (dict(y=np.array({"a": 1}, dtype=object), mask=np.ones(3, bool)), ["--data", "object arrays ('y')"]),
        (dict(y=np.array(["a", "b"])), ["--data", "dtype <U1", "numeric"]),
        (dict(y=np.zeros((1, 3, 2)), lengths=np.array(["3"])), ["--data", "lengths", "numeric"]),
        (dict(x=np.zeros((10, 2))), ["--data", "no array named 'y'", "arrays: x", "savez"]),
    ],
    ids=["zero-trials", "zero-steps", "ragged-object", "dict", "strings", "string-lengths", "no-y"],
)
def test_bad_npz_files(tmp_path, capsys, arrays, needles):
    path = _npz(tmp_path / "d.npz", **arrays)
    code, _, err = run(capsys, "fit", "hmm", "--data", path, "--num-states", 2, "--out", tmp_path / "f.nc")
    assert_usage_error(code, err, *needles)


@pytest.mark.parametrize(
    "text, extra, needles",
    [
        ("a,b\n1,2\n", [], ["--trial-column", "'trial'", "columns: a, b"]),
        ("id,a\n1,2\n", ["--trial-column", "trial_id"], ["--trial-column", "'trial_id'", "columns: id, a"]),
        ("trial,a\n1,2\n", ["--time-column", "t"], ["--time-column", "'t'"]),
        ("trial,a\n1,2\n", ["--input-columns", "u", "a"], ["--input-columns", "'u'"]),
        ("trial,a,b\n", [], ["--data", "no observations"]),
        ("", [], ["--data", "empty"]),
    ],
    ids=["no-trial-column", "named-trial-column", "time-column", "input-columns", "header-only", "empty"],
)
def test_bad_csv_files(tmp_path, capsys, text, extra, needles):
    path = tmp_path / "d.csv"
    path.write_text(text)
    code, _, err = run(capsys, "fit", "hmm", "--data", path, "--num-states", 2, "--out", tmp_path / "f.nc", *extra)
    assert_usage_error(code, err, *needles)


# ----- summary and plot of a fit file -----------------------------------------------------------------


def _fit_file(path, num_chains: int, num_draws: int = 20, num_trials: int = 2):
    """A small fit file of an HMM written from hand-made draws (no fitting)."""
    rng = np.random.default_rng(num_chains)
    model = get_model("hmm", num_states=2, obs_dim=2)
    data = model.prepare(rng.standard_normal((num_trials, 6, 2)))
    samples = {"transition_matrix": rng.dirichlet(np.ones(2), size=(num_chains, num_draws, 2)),
               "means": rng.standard_normal((num_chains, num_draws, 2, 2))}
    save_inference_data(build_inference_data(model, data, samples), path)
    return path


def test_summary_and_plot_of_a_missing_or_unreadable_file(tmp_path, capsys):
    for command in (["summary"], ["plot", "--out", tmp_path / "p.png"]):
        code, _, err = run(capsys, *command, tmp_path / "missing.nc")
        assert_usage_error(code, err, "FIT", "missing.nc does not exist", "ppl-switch fit --out")
        not_netcdf = tmp_path / "d.npz"
        np.savez(not_netcdf, y=np.zeros((1, 2, 2)))
        code, _, err = run(capsys, *command, not_netcdf)
        assert_usage_error(code, err, "FIT", "cannot read")


def test_plot_trial_out_of_range(tmp_path, capsys):
    path = _fit_file(tmp_path / "fit.nc", num_chains=2, num_trials=2)
    for trial in (2, -1):
        code, _, err = run(capsys, "plot", path, "--out", tmp_path / "p.png", "--trial", trial)
        assert_usage_error(code, err, "--trial", "2 trial(s)", "0 to 1", f"got {trial}")
    assert not (tmp_path / "p.png").exists()
    code, _, err = run(capsys, "plot", path, "--out", tmp_path / "nope" / "p.png")
    assert_usage_error(code, err, "--out", "does not exist")


@pytest.fixture
def arviz_log():
    """The messages ArviZ logs (its own logger, which drops a message it logged before in the process)."""
    import arviz as az

    logger = az._log  # ArviZ's module logger: where "Shape validation failed" goes
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    cache, logger.cache = logger.cache, []
    yield records
    logger.removeHandler(handler)
    logger.cache = cache


def test_summary_of_one_chain_shows_statistics_and_a_note(tmp_path, capsys, arviz_log):
    import arviz as az
    import xarray as xr

    one, two = _fit_file(tmp_path / "one.nc", num_chains=1), _fit_file(tmp_path / "two.nc", num_chains=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ArviZ or NumPy warning either
        code, out, err = run(capsys, "summary", one)
    assert code == 0 and arviz_log == []
    assert "r_hat" not in out and "ess_bulk" not in out
    assert err.startswith("note: ") and "one chain" in err and "--num-chains 2" in err
    # the table's means are the draws' means (computed here from the file)
    posterior = xr.open_dataset(one, group="posterior")
    rows = [line.split() for line in out.splitlines()[1:]]
    row = next(r for r in rows if r[:2] == ["means[0,", "1]"])
    assert float(row[2]) == pytest.approx(float(posterior["means"].values[..., 0, 1].mean()), abs=6e-4)
    # the detector works: ArviZ's full summary of the same file logs the shape warning
    az.summary(az.from_netcdf(one), kind="all")
    assert any("Shape validation failed" in m for m in arviz_log)

    code, out, err = run(capsys, "summary", two)
    assert code == 0 and "r_hat" in out and err == ""
    code, out, err = run(capsys, "summary", two, "--var-names", "nope")
    assert_usage_error(code, err, "--var-names", "nope", "transition_matrix")


def test_summary_of_a_point_estimate_shows_its_values(tmp_path, capsys):
    path = _fit_file(tmp_path / "em.nc", num_chains=1, num_draws=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(capsys, "summary", path)
    assert code == 0 and "one draw" in err
    assert out.split()[0] == "value"


# ----- unexpected errors, --debug and --help ----------------------------------------------------------


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr("ppl_switch.cli.parser.cmd_list", boom)  # where make_parser looks it up
    code, _, err = run(capsys, "list")
    assert code == 1
    assert err == "ppl-switch list: error: RuntimeError: first line [...] (rerun with --debug for the traceback)\n"
    for argv in (["list", "--debug"], ["--debug", "list"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "Traceback" in err and "second line" in err


def test_argparse_errors_return_2(capsys):
    assert cli.main(["fit", "hmm"]) == 2  # --data and --out missing
    assert "required" in capsys.readouterr().err
    assert cli.main(["fit", "hmm", "--data", "x", "--out", "y", "--method", "mcmc"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_of_every_subcommand_shows_every_default(capsys):
    parser = cli.make_parser()
    assert set(parser.subcommands) == {"demo", "simulate", "fit", "summary", "plot", "list"}
    for name, sub in parser.subcommands.items():
        formatter = sub.formatter_class(prog=name)
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            if not action.option_strings:
                continue  # positionals: required, no default
            if action.required:
                assert "required" in text, (name, action.dest)
            elif action.option_strings:
                assert "default:" in text, (name, action.dest, text)
        assert cli.main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert "usage: ppl-switch " + name in text
    assert cli.main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: auto)" in text and "(default: 2," in text and "fit_svi's 2000" in text


# ----- what a fit reports -----------------------------------------------------------------------------


def _fake_fit(method, **fields):
    base = dict(method=method, diagnostics={}, samples={"a": np.zeros((2, 50))}, losses=None, warnings=[], config={})
    return types.SimpleNamespace(**{**base, **fields})


def test_diagnostic_summary_of_each_method():
    nuts = _fake_fit("nuts", diagnostics={"max_r_hat": 1.0123, "min_ess": 345.6, "num_divergences": 3})
    assert cli.diagnostic_summary(nuts) == "diagnostics: nuts, 2 chain(s) x 50 draws, max R-hat 1.012, min bulk ESS 346, 3 divergences"
    for r_hat in ({}, {"max_r_hat": None}):
        one_chain = _fake_fit("nuts", samples={"a": np.zeros((1, 50))}, diagnostics={"min_ess": 40.0, "num_divergences": 0, **r_hat})
        assert cli.diagnostic_summary(one_chain) == ("diagnostics: nuts, 1 chain(s) x 50 draws, no R-hat (needs >= 2 "
                                                     "chains: --num-chains), min bulk ESS 40, 0 divergences")

    rng = np.random.default_rng(0)
    flat = 100.0 + 0.01 * rng.standard_normal(200)
    falling = np.linspace(200.0, 100.0, 200)
    assert objective_movement(flat)["change"] <= objective_movement(flat)["threshold"]
    assert objective_movement(falling)["change"] > objective_movement(falling)["threshold"]
    line = cli.diagnostic_summary(_fake_fit("svi", losses=flat))
    assert line.startswith(f"diagnostics: svi, final negative ELBO {flat[-1]:.6g} after 200 steps, converged")
    assert "not converged" in cli.diagnostic_summary(_fake_fit("svi", losses=falling))
    assert "not assessed" in cli.diagnostic_summary(_fake_fit("svi", losses=flat[:5]))
    em = _fake_fit("em", diagnostics={"log_likelihoods": -falling})
    assert cli.diagnostic_summary(em).startswith("diagnostics: em, final log-likelihood -100 after 200 iterations, not converged")
    em = _fake_fit("em", diagnostics={"log_likelihoods": -falling, "converged": True})
    assert cli.diagnostic_summary(em).endswith("converged (tolerance reached)")


def test_report_prints_every_warning_once(capsys):
    fit = _fake_fit("svi", losses=np.ones(100), warnings=["SVI loss still moving: ...", "y: far from\n the priors"])
    caught = [types.SimpleNamespace(message=UserWarning("SVI loss still moving: ...")), types.SimpleNamespace(message="other")]
    cli.report_fit(fit, caught)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == ["warning: SVI loss still moving: ...", "warning: y: far from the priors", "warning: other"]
    assert lines[3].startswith("diagnostics: svi") and len(lines) == 4


# ----- the demo, end to end -----------------------------------------------------------------------------


def test_demo_end_to_end(tmp_path):
    """`ppl-switch demo --quick` (2 trials x 100 steps, 2 chains x 100 draws after 100 warmup, started from the
    prior): writes fit.nc and fit.png, and recovers the simulated states."""
    start = time.perf_counter()
    script = Path(sys.executable).with_name("ppl-switch")  # the installed command, else the module
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ppl_switch.cli"]
    result = subprocess.run(command + ["demo", "--quick", "--quiet", "--out-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    accuracy = float(re.search(r"state accuracy \(after matching labels\) ([0-9.]+)", result.stdout).group(1))
    assert accuracy >= 0.9
    assert re.search(r"diagnostics: nuts, 2 chain\(s\) x 100 draws, max R-hat [0-9.]+", result.stderr)
    assert (tmp_path / "demo" / "fit.nc").stat().st_size > 10_000 and (tmp_path / "demo" / "fit.png").stat().st_size > 10_000
    from ppl_switch.results import get_group, load_inference_data

    posterior = get_group(load_inference_data(tmp_path / "demo" / "fit.nc"), "posterior")
    assert posterior.sizes["chain"] == 2 and posterior.sizes["draw"] == 100
    print(f"demo --quick: {seconds:.1f} s")
