// mlx-primitives dialect, CUDA side. Kernel bodies use only these helpers and the tokens of
// mlx_primitives/dsl/dialect.py; metal.h defines the same names with the same meaning.

#define MLXP_DEVICE __device__ __forceinline__

// N elements of T as one aligned access (16 bytes for N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) mlxp_vec {
  T v[N];
};

// A view with an element offset can start off the vector boundary: then go element by element
// (the test is uniform across a warp, so it costs a compare, not divergence).
template <int N, typename T>
MLXP_DEVICE bool mlxp_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(mlxp_vec<T, N>) == 0;
}

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const T* p, int64_t i) {
  if (mlxp_aligned<N>(p)) {
    return reinterpret_cast<const mlxp_vec<T, N>*>(p)[i];
  }
  mlxp_vec<T, N> out;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out.v[k] = p[i * N + k];
  }
  return out;
}

template <int N, typename T>
MLXP_DEVICE void mlxp_store(T* p, int64_t i, const mlxp_vec<T, N>& v) {
  if (mlxp_aligned<N>(p)) {
    reinterpret_cast<mlxp_vec<T, N>*>(p)[i] = v;
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    p[i * N + k] = v.v[k];
  }
}

// Sum over aligned groups of WIDTH lanes (a power of two up to 32); every lane gets the sum.
template <int WIDTH>
MLXP_DEVICE float mlxp_warp_sum(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Sum over the TPR threads of row r of a group (thread t of that row); every thread of the row
// gets the sum. partial: shared scratch of at least (rows per group) * TPR / 32 floats, unused
// when TPR <= 32. Every thread of the group must call it (it may hold a barrier).
template <int TPR>
MLXP_DEVICE float mlxp_row_sum(float v, float* partial, int r, int t) {
  constexpr int WARPS = TPR > 32 ? TPR / 32 : 1;
  v = mlxp_warp_sum<(TPR < 32 ? TPR : 32)>(v);
  if (WARPS > 1) {
    if (t % 32 == 0) {
      partial[r * WARPS + t / 32] = v;
    }
    __syncthreads();
    v = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      v += partial[r * WARPS + w];
    }
  }
  return v;
}

MLXP_DEVICE float mlxp_rsqrt(float x) { return rsqrtf(x); }
MLXP_DEVICE float mlxp_exp(float x) { return expf(x); }
MLXP_DEVICE float mlxp_fast_exp(float x) { return __expf(x); }
MLXP_DEVICE float mlxp_exp2(float x) { return exp2f(x); }
MLXP_DEVICE float mlxp_log2(float x) { return log2f(x); }
MLXP_DEVICE float mlxp_erf(float x) { return erff(x); }
MLXP_DEVICE float mlxp_tanh(float x) { return tanhf(x); }
MLXP_DEVICE void mlxp_sincos(float x, float& s, float& c) { sincosf(x, &s, &c); }

// Floats reach kernels as the int bits of a template constant (no float template arguments).
MLXP_DEVICE float mlxp_from_bits(int bits) { return __int_as_float(bits); }

template <typename T>
MLXP_DEVICE float mlxp_f32(T v) { return static_cast<float>(v); }

template <typename T>
MLXP_DEVICE T mlxp_cast(float v) { return static_cast<T>(v); }
