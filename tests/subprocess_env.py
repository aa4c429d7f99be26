"""The environment for tests that run this checkout's code in a fresh interpreter (tutorials, CLI,
a JAX started with a different device count)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict:
    """``os.environ`` with this checkout first on PYTHONPATH (so the subprocess imports it even when the
    package is not installed) and ``extra`` set on top."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=pythonpath, **extra)
