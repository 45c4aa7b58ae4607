"""The kernel dialect: one kernel source in ``kernel_variants/`` rendered for Metal and for
CUDA (:mod:`.render`), and built lazily into MLX custom kernels (:mod:`.kernel`)."""

from .kernel import inference_mode, poisoned

__all__ = ["inference_mode", "poisoned"]
