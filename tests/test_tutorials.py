"""Smoke-run every tutorial with tiny sizes (PPL_SWITCH_SMOKE=1), each in a fresh interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    # PYTHONPATH: the tutorial imports this checkout even when the package is not installed
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PPL_SWITCH_SMOKE="1", PPL_SWITCH_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg",
               PYTHONPATH=pythonpath)
    result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
