"""SODA: bottleneck diffusion models for representation learning."""

__version__ = "0.1.0"
