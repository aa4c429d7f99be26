"""Runners (the recommended ``fit``, SVI, NUTS, EM), the Fit result, and per-draw decoding.

>>> fit = fit(model, y)                           # the model's recommended method   # doctest: +SKIP
>>> fit = fit_svi(model, y, num_steps=2000)       # doctest: +SKIP

Note: ``ppl_switch.infer.fit`` is the function :func:`ppl_switch.infer.recommended.fit`; the module that
defines :class:`Fit` is imported as ``from ppl_switch.infer.fit import Fit``.
>>> fit.idata                                     # ArviZ output   # doctest: +SKIP
>>> fit.save("fit.nc"); fit = load("fit.nc")      # doctest: +SKIP
"""

from ppl_switch.infer.decode import pointwise_log_likelihood, posterior_predictive_draws, posterior_states
from ppl_switch.infer.em import fit_em
from ppl_switch.errors import FitError, FitWarning
from ppl_switch.infer.fit import Fit, load, sidecar_path
from ppl_switch.infer.nuts import fit_nuts
from ppl_switch.infer.prepare import set_x64
from ppl_switch.infer.svi import default_guide_for, default_optimizer, fit_svi
from ppl_switch.infer.recommended import fit  # noqa: E402 - after the runners it dispatches to

__all__ = [
    "Fit",
    "FitError",
    "FitWarning",
    "fit",
    "default_guide_for",
    "default_optimizer",
    "fit_em",
    "fit_nuts",
    "fit_svi",
    "load",
    "pointwise_log_likelihood",
    "posterior_predictive_draws",
    "posterior_states",
    "set_x64",
    "sidecar_path",
]
