// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh: the Shape and Strides that kernel
// arguments named <input>_shape and <input>_strides have.
#pragma once

#define MAX_NDIM 10

namespace cuda::std {

template <typename T, size_t N>
struct array {
  T __elems_[N];
  __host__ __device__ constexpr T& operator[](size_t i) { return __elems_[i]; }
  __host__ __device__ constexpr const T& operator[](size_t i) const { return __elems_[i]; }
  __host__ __device__ constexpr size_t size() const { return N; }
};

}  // namespace cuda::std

namespace mlx::core::cu {

using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

}  // namespace mlx::core::cu
