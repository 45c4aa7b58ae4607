// Vector loads and stores for bodies compiled twice (GpuKernel's `aligned`), CUDA side. With
// `aligned` a compile-time true, no access tests its address: mlxp_load's test per access keeps
// a thread's loads from being issued together (rope ran at 2.7 TB/s with it, 3.1 without).

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const T* p, int64_t i, bool aligned) {
  return aligned ? reinterpret_cast<const mlxp_vec<T, N>*>(p)[i] : mlxp_load<N>(p, i);
}

template <int N, typename T>
MLXP_DEVICE void mlxp_store(T* p, int64_t i, const mlxp_vec<T, N>& v, bool aligned) {
  if (aligned) {
    reinterpret_cast<mlxp_vec<T, N>*>(p)[i] = v;
  } else {
    mlxp_store<N>(p, i, v);
  }
}
