// Warp helpers beyond the prelude, CUDA side (warp.metal.h has the same names). A separate
// header so that only the kernels that include it carry it in their source hash.

// Maximum over aligned groups of WIDTH lanes (a power of two up to 32); every lane gets it.
template <int WIDTH>
MLXP_DEVICE float mlxp_warp_max(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Orders the shared-memory writes of a warp before its lanes read each other's.
MLXP_DEVICE void mlxp_warp_sync() { __syncwarp(); }
