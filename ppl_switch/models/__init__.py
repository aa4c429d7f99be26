"""The model zoo: one class per model, looked up by name.

>>> from ppl_switch.models import get_model
>>> model = get_model("hmm", num_states=3, obs_dim=2)
"""

from __future__ import annotations

import inspect

from ppl_switch.models.arhmm import ARHMM
from ppl_switch.models.base import Model
from ppl_switch.models.clds import CLDS
from ppl_switch.models.gdm import GDM
from ppl_switch.models.gdm_mixture import GDMMixture
from ppl_switch.models.gpslds import GPSDE, GPSLDS
from ppl_switch.models.hmm import HMM
from ppl_switch.models.lds import LDS
from ppl_switch.models.rslds import RSLDS
from ppl_switch.models.slds import SLDS

#: name -> model class
MODELS: dict[str, type[Model]] = {"hmm": HMM, "arhmm": ARHMM, "lds": LDS, "slds": SLDS, "gdm": GDM, "gdm_mixture": GDMMixture, "clds": CLDS,
                                 "gpslds": GPSLDS, "gpsde": GPSDE, "rslds": RSLDS}


def model_options(name: str) -> list[str]:
    """The constructor arguments a model accepts."""
    cls = _lookup(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _lookup(name: str) -> type[Model]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model: unknown model {name!r}; valid names are {sorted(MODELS)}") from None


def get_model(name: str, **config) -> Model:
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
