"""The model zoo: one class per model, looked up by name.

>>> from ppl_switch.models import get_model
>>> model = get_model("hmm", num_states=3, obs_dim=2)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import MutableMapping

#: name -> (module, class) of the built-in models; a module is imported when its class is first asked
#: for, so that listing the names (``ppl-switch list``, ``import ppl_switch.models``) imports no JAX
_BUILTIN = {
    "hmm": ("hmm", "HMM"),
    "arhmm": ("arhmm", "ARHMM"),
    "lds": ("lds", "LDS"),
    "slds": ("slds", "SLDS"),
    "gdm": ("gdm", "GDM"),
    "gdm_mixture": ("gdm_mixture", "GDMMixture"),
    "clds": ("clds", "CLDS"),
    "gpslds": ("gpslds", "GPSLDS"),
    "gpsde": ("gpslds", "GPSDE"),
    "rslds": ("rslds", "RSLDS"),
}
#: class name -> module, for ``from ppl_switch.models import HMM`` (and ``Model`` from base)
_CLASSES = {cls: module for module, cls in _BUILTIN.values()} | {"Model": "base"}


def _import_class(name: str):
    return getattr(importlib.import_module(f"ppl_switch.models.{_CLASSES[name]}"), name)


class _Registry(MutableMapping):
    """``{name: model class}`` that imports a built-in model's module on first access of its class.
    Keys (and ``in``, ``len``, ``sorted``) need no import; assigning registers a class directly."""

    def __init__(self, builtin):
        self._names = dict.fromkeys(builtin)
        self._classes: dict = {}

    def __getitem__(self, name):
        if name not in self._classes:
            if name not in self._names:
                raise KeyError(name)
            self._classes[name] = _import_class(_BUILTIN[name][1])
        return self._classes[name]

    def __setitem__(self, name, cls):
        self._names[name] = None
        self._classes[name] = cls

    def __delitem__(self, name):
        del self._names[name]
        self._classes.pop(name, None)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __contains__(self, name):
        return name in self._names

    def __repr__(self):
        return f"MODELS({sorted(self._names)})"


#: name -> model class
MODELS = _Registry(_BUILTIN)


def __getattr__(name):
    # lazy: ``from ppl_switch.models import HMM`` imports only the HMM's module
    if name in _CLASSES:
        return _import_class(name)
    raise AttributeError(f"module 'ppl_switch.models' has no attribute {name!r}")


def model_options(name: str) -> list[str]:
    """The constructor arguments a model accepts."""
    cls = _lookup(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _lookup(name: str):
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model: unknown model {name!r}; valid names are {sorted(MODELS)}") from None


def get_model(name: str, **config):
    """Build model ``name`` from keyword options (as the CLI passes them, e.g. num_states, latent_dim).

    An option the model does not take is an error naming it and the options that are valid.
    """
    cls = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of model {name!r}; valid options are {valid}")
    return cls(**config)


__all__ = ["MODELS", "Model", "HMM", "ARHMM", "LDS", "SLDS", "GDM", "GDMMixture", "CLDS", "GPSLDS", "GPSDE", "RSLDS", "get_model", "model_options"]
