"""Normalization layers, drop-ins for ``mlx.nn.RMSNorm`` and ``mlx.nn.LayerNorm``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops import layer_norm, rms_norm


class RMSNorm(nn.Module):
    """Root mean square normalization with a learned scale.

    Args:
        dims: the feature dimension (the input's last axis).
        eps: added to the mean square for numerical stability.
    """

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)


class LayerNorm(nn.Module):
    """Layer normalization with an optional learned scale and shift.

    Args:
        dims: the feature dimension (the input's last axis).
        eps: added to the variance for numerical stability.
        affine: learn a scale (``weight``).
        bias: learn a shift (``bias``) too, when ``affine``.
    """

    def __init__(self, dims: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        if affine:
            self.weight = mx.ones((dims,))
            if bias:
                self.bias = mx.zeros((dims,))
        self.dims = dims
        self.eps = eps

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, affine={'weight' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x, self.get("weight"), self.get("bias"), self.eps)
