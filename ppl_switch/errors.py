"""The two things a fit reports: FitError (it failed; nothing is returned) and FitWarning (it finished
with something to look at). Raised by every runner and by the models' own EMs, so they sit below both."""

from __future__ import annotations

from typing import Optional


class FitError(RuntimeError):
    """A fit went numerically wrong (e.g. the SVI loss became NaN/inf).

    Attributes:
        step: the optimisation step at which it happened (None if not step-based).
        sites: ``{"log_density": [...], "value": [...], "gradient": [...], "params": [...]}`` names of the
            sites (or guide params) found non-finite when the model and guide were traced at the last
            parameters with a finite loss.
        losses: the loss history up to and including the failing step.
    """

    def __init__(self, message: str, *, step: Optional[int] = None, sites=None, losses=None):
        super().__init__(message)
        self.step = step
        self.sites = sites or {}
        self.losses = losses


class FitWarning(RuntimeWarning):
    """A fit finished but its checks found something to look at (non-convergence, restarts that
    disagree, data far from the priors' scale). The same text is in ``fit.warnings`` and ``repr(fit)``."""
