"""pointvl: the Generative-Refined 3D vision-language benchmark and GRCA training."""

__version__ = "0.1.0"
