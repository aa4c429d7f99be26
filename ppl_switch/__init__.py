"""ppl-switch: switching and latent dynamical systems in NumPyro."""

__version__ = "0.1.0"
