"""The kernel dialect layer: one kernel source rendered for Metal and for CUDA."""

from .kernel import inference_mode, poisoned

__all__ = ["inference_mode", "poisoned"]
