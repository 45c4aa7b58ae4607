// Warp helpers beyond the prelude, Metal side (warp.cuda.h has the same names; a warp is a
// simdgroup of 32 threads).

template <int WIDTH>
MLXP_DEVICE float mlxp_warp_max(float v) {
  for (ushort o = WIDTH / 2; o > 0; o /= 2) {
    const float other = simd_shuffle_xor(v, o);
    v = other > v ? other : v;
  }
  return v;
}

MLXP_DEVICE void mlxp_warp_sync() { simdgroup_barrier(mem_flags::mem_threadgroup); }
