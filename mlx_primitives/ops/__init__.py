"""The ops: each module declares one op's reference, problem key, default and variants."""

from .gated import geglu, swiglu
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .rope import rope

__all__ = ["geglu", "layer_norm", "rms_norm", "rope", "swiglu"]
