"""The ops: each module declares one op's reference, problem key, default and variants."""

from .associative_scan import associative_scan
from .chunked_attention import chunked_cross_attention
from .flash_attention import flash_attention
from .gated import geglu, swiglu
from .gated_delta import gated_delta
from .gather_mm import gather_mm
from .gather_qmm import gather_qmm
from .layer_norm import layer_norm
from .linear_scan import linear_scan
from .quantized_matmul import quantized_matmul
from .rms_norm import rms_norm
from .rope import rope
from .sdpa import scaled_dot_product_attention
from .selective_scan import selective_scan
from .sliding_window import sliding_window_attention

__all__ = [
    "associative_scan",
    "chunked_cross_attention",
    "flash_attention",
    "gated_delta",
    "gather_mm",
    "gather_qmm",
    "geglu",
    "layer_norm",
    "linear_scan",
    "quantized_matmul",
    "rms_norm",
    "rope",
    "scaled_dot_product_attention",
    "selective_scan",
    "sliding_window_attention",
    "swiglu",
]
