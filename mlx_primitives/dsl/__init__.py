"""The kernel dialect layer: one kernel source rendered for Metal and for CUDA."""

from .kernel import poisoned

__all__ = ["poisoned"]
