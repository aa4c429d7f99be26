"""Smoke-run every tutorial with tiny sizes (PPL_SWITCH_SMOKE=1), each in a fresh interpreter.

One test class per tutorial: under ``pytest --dist loadscope`` each class is its own scheduling unit, so
the tutorials spread over the workers instead of running one after another on a single worker.
"""

import subprocess
import sys
from pathlib import Path

from subprocess_env import ROOT, checkout_env
import pytest

# oracle comparisons at 1e-8 and below need float64 (tests/conftest.py: float32 is the default)
pytestmark = pytest.mark.float64

TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


def run_tutorial(path: Path, tmp_path: Path) -> None:
    env = checkout_env(PPL_SWITCH_SMOKE="1", PPL_SWITCH_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def _tutorial_class(path: Path) -> type:
    def test_runs(self, tmp_path):
        run_tutorial(path, tmp_path)

    return type(f"TestTutorial_{path.stem}", (), {"test_runs": test_runs, "__doc__": f"tutorials/{path.name}"})


for _path in TUTORIALS:
    _cls = _tutorial_class(_path)
    globals()[_cls.__name__] = _cls

assert TUTORIALS, "no tutorials found"
