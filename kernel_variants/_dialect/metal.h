// mlx-primitives dialect, Metal side: the names of cuda.h with the same meaning.
// Inputs of fewer than 8 elements arrive in the constant address space, hence two overloads.

#include <metal_stdlib>
using namespace metal;

#define MLXP_DEVICE inline

template <typename T, int N>
struct mlxp_vec {
  T v[N];
};

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const device T* p, int64_t i) {
  mlxp_vec<T, N> out;
  for (int k = 0; k < N; ++k) {
    out.v[k] = p[i * N + k];
  }
  return out;
}

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const constant T* p, int64_t i) {
  mlxp_vec<T, N> out;
  for (int k = 0; k < N; ++k) {
    out.v[k] = p[i * N + k];
  }
  return out;
}

template <int N, typename T>
MLXP_DEVICE void mlxp_store(device T* p, int64_t i, thread const mlxp_vec<T, N>& v) {
  for (int k = 0; k < N; ++k) {
    p[i * N + k] = v.v[k];
  }
}

template <int WIDTH>
MLXP_DEVICE float mlxp_warp_sum(float v) {
  for (ushort o = WIDTH / 2; o > 0; o /= 2) {
    v += simd_shuffle_xor(v, o);
  }
  return v;
}

template <int TPR>
MLXP_DEVICE float mlxp_row_sum(float v, threadgroup float* partial, int r, int t) {
  constexpr int WARPS = TPR > 32 ? TPR / 32 : 1;
  v = mlxp_warp_sum<(TPR < 32 ? TPR : 32)>(v);
  if (WARPS > 1) {
    if (t % 32 == 0) {
      partial[r * WARPS + t / 32] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      v += partial[r * WARPS + w];
    }
  }
  return v;
}

MLXP_DEVICE float mlxp_rsqrt(float x) { return precise::rsqrt(x); }
MLXP_DEVICE float mlxp_exp(float x) { return precise::exp(x); }
MLXP_DEVICE float mlxp_fast_exp(float x) { return fast::exp(x); }
MLXP_DEVICE float mlxp_exp2(float x) { return precise::exp2(x); }
MLXP_DEVICE float mlxp_log2(float x) { return precise::log2(x); }
MLXP_DEVICE float mlxp_tanh(float x) { return precise::tanh(x); }
MLXP_DEVICE void mlxp_sincos(float x, thread float& s, thread float& c) {
  s = precise::sincos(x, c);
}

// Metal has no erf: Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
MLXP_DEVICE float mlxp_erf(float x) {
  const float ax = abs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float y = 1.0f - poly * precise::exp(-ax * ax);
  return x < 0.0f ? -y : y;
}

MLXP_DEVICE float mlxp_from_bits(int bits) { return as_type<float>(bits); }

template <typename T>
MLXP_DEVICE float mlxp_f32(T v) { return static_cast<float>(v); }

template <typename T>
MLXP_DEVICE T mlxp_cast(float v) { return static_cast<T>(v); }
