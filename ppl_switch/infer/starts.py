"""Data-driven SVI starts that need inference: the library's start per built-in model class.

A model's own ``default_guide(data)`` starts from what the model can compute by itself (``init_values``:
PCA, least squares, a Laplace smoother). Some models start SVI better from a short run of their EM, which
lives in this package (a model may not import it); ``LIBRARY_STARTS`` names those starts, as ``LIBRARY_EM``
(:mod:`ppl_switch.infer.em`) names the EMs, and :func:`data_driven_guide` builds the guide ``ppl_switch.fit``
runs SVI with.
"""

from __future__ import annotations

from ppl_switch.infer.em import library_function

#: the library's data-driven start per built-in model class: class name -> (module, function of (model, data))
#: returning the ``init_values`` of ``model.default_guide(data, init_values=...)``
LIBRARY_STARTS = {
    "CLDS": ("ppl_switch.infer.clds_em", "clds_guide_start"),
}


def library_start(model_class: type):
    """The library's start function for ``model_class`` (its nearest built-in base class in
    ``LIBRARY_STARTS``, only classes of ``ppl_switch.models``), or None."""
    return library_function(LIBRARY_STARTS, model_class)


def data_driven_guide(model, data):
    """``model.default_guide(data, init_values=start(model, data))`` when the library has a start for the
    model's class (:func:`library_start`), else ``model.default_guide(data)``."""
    start = library_start(type(model))
    if start is None:
        return model.default_guide(data)
    return model.default_guide(data, init_values=start(model, data))


__all__ = ["LIBRARY_STARTS", "data_driven_guide", "library_start"]
