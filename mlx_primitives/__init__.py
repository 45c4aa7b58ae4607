"""mlx-primitives: fast MLX building blocks served through an autotuning kernel registry."""

__version__ = "0.1.0"

from . import recording, registry
from .dialect import inference_mode
from .dispatch import explain
from .moe import (
    ExpertDispatch,
    build_expert_dispatch,
    compute_load_balancing_loss,
    selective_gather,
    selective_scatter_add,
)
from .nn import (
    ChunkedCrossAttention,
    FlashAttention,
    GeGLU,
    LayerNorm,
    QuantizedLinear,
    QuantizedSwitchLinear,
    RMSNorm,
    RoPE,
    SlidingWindowAttention,
    SparseMoE,
    SwiGLU,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)
from .ops import (
    associative_scan,
    chunked_cross_attention,
    flash_attention,
    gated_delta,
    gather_mm,
    gather_qmm,
    geglu,
    layer_norm,
    linear_scan,
    quantized_matmul,
    rms_norm,
    rope,
    scaled_dot_product_attention,
    selective_scan,
    sliding_window_attention,
    swiglu,
)
from .patch import patch_mlx, unpatch_mlx
from .recording import record
from .ssm import gated_delta_update, ssm_attn, ssm_update

recording._from_environment()

__all__ = [
    "ChunkedCrossAttention",
    "ExpertDispatch",
    "QuantizedSwitchLinear",
    "SparseMoE",
    "SwitchGLU",
    "SwitchLinear",
    "SwitchMLP",
    "associative_scan",
    "build_expert_dispatch",
    "compute_load_balancing_loss",
    "selective_gather",
    "selective_scan",
    "ssm_attn",
    "ssm_update",
    "selective_scatter_add",
    "FlashAttention",
    "SlidingWindowAttention",
    "chunked_cross_attention",
    "flash_attention",
    "sliding_window_attention",
    "GeGLU",
    "LayerNorm",
    "QuantizedLinear",
    "RMSNorm",
    "RoPE",
    "SwiGLU",
    "explain",
    "gated_delta",
    "gated_delta_update",
    "gather_mm",
    "gather_qmm",
    "geglu",
    "inference_mode",
    "layer_norm",
    "linear_scan",
    "patch_mlx",
    "quantized_matmul",
    "record",
    "registry",
    "rms_norm",
    "rope",
    "scaled_dot_product_attention",
    "swiglu",
    "unpatch_mlx",
]
