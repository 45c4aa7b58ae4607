"""The dispatched functional ops (the ``mx.fast`` of mlx-primitives).

Each call is routed to the variant tuned for this chip and problem (``mlxp-tune``), or to the
op's safe default where nothing is tuned.
"""

from ..ops import (
    chunked_cross_attention,
    flash_attention,
    geglu,
    layer_norm,
    rms_norm,
    rope,
    sliding_window_attention,
    swiglu,
)

__all__ = [
    "chunked_cross_attention",
    "flash_attention",
    "geglu",
    "layer_norm",
    "rms_norm",
    "rope",
    "sliding_window_attention",
    "swiglu",
]
