// The names of aligned.cuda.h, Metal side: Metal loads element-wise, so `aligned` is unused.

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const device T* p, int64_t i, bool) {
  return mlxp_load<N>(p, i);
}

template <int N, typename T>
MLXP_DEVICE mlxp_vec<T, N> mlxp_load(const constant T* p, int64_t i, bool) {
  return mlxp_load<N>(p, i);
}

template <int N, typename T>
MLXP_DEVICE void mlxp_store(device T* p, int64_t i, thread const mlxp_vec<T, N>& v, bool) {
  mlxp_store<N>(p, i, v);
}
