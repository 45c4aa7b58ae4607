"""mlx-lm integration (the ``lm`` extra): serve an mlx-lm model through the tuned ops."""

from .patch import PatchReport, patch, unpatch

__all__ = ["PatchReport", "patch", "unpatch"]
