// Stand-in for what NVRTC gives a kernel of mx.fast.cuda_kernel without any include: the CUDA
// keywords, built-in variables and device functions, declared as C++17 so that a host compiler
// can syntax-check rendered kernels. Only what the kernels use is declared, with CUDA's real
// signatures, so a call with the wrong argument types fails here as it would under NVRTC.

#pragma once

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__
#define __constant__
#define __grid_constant__

typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __UINTPTR_TYPE__ uintptr_t;

struct uint3 {
  unsigned int x, y, z;
};

struct uint4 {
  unsigned int x, y, z, w;
};

struct dim3 {
  unsigned int x, y, z;
};

extern const uint3 threadIdx;
extern const uint3 blockIdx;
extern const dim3 blockDim;
extern const dim3 gridDim;
extern const int warpSize;

__device__ void __syncthreads();
__device__ void __syncwarp(unsigned int mask = 0xffffffffu);

__device__ int __shfl_xor_sync(unsigned int mask, int var, int laneMask, int width = 32);
__device__ unsigned int __shfl_xor_sync(
    unsigned int mask, unsigned int var, int laneMask, int width = 32);
__device__ float __shfl_xor_sync(unsigned int mask, float var, int laneMask, int width = 32);
__device__ double __shfl_xor_sync(unsigned int mask, double var, int laneMask, int width = 32);

__device__ int __any_sync(unsigned int mask, int predicate);

__device__ float rsqrtf(float x);
__device__ float fmaxf(float x, float y);
__device__ float expf(float x);
__device__ float __expf(float x);
__device__ float exp2f(float x);
__device__ float log2f(float x);
__device__ float erff(float x);
__device__ float tanhf(float x);
__device__ void sincosf(float x, float* sptr, float* cptr);
__device__ void __sincosf(float x, float* sptr, float* cptr);
__device__ float rintf(float x);
__device__ float fmaf(float a, float b, float c);
__device__ float __int_as_float(int x);
__device__ int __float_as_int(float x);

// cuda_fp16.h and cuda_bf16.h: storage types converting to and from float.
struct __half {
  unsigned short __x;
  __half() = default;
  __host__ __device__ __half(float f);
  __host__ __device__ __half(double f);
  __host__ __device__ operator float() const;
};

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __host__ __device__ __nv_bfloat16(float f);
  __host__ __device__ __nv_bfloat16(double f);
  __host__ __device__ operator float() const;
};

struct __half2 {
  __half x, y;
};

struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

__device__ __half2 __floats2half2_rn(float a, float b);
__device__ __nv_bfloat162 __floats2bfloat162_rn(float a, float b);

// Paired 16-bit arithmetic and bit moves (quantized_matmul/pairs.cuda.h).
__device__ __half __ushort_as_half(unsigned short x);
__device__ __nv_bfloat16 __ushort_as_bfloat16(unsigned short x);
__device__ __half2 __half2half2(__half a);
__device__ __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a);
__device__ __half2 __hsub2(__half2 a, __half2 b);
__device__ __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b);
__device__ __half2 __hfma2(__half2 a, __half2 b, __half2 c);
__device__ __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c);
struct float2 {
  float x, y;
};
__device__ float2 __half22float2(__half2 a);
__device__ float __bfloat162float(__nv_bfloat16 a);
__device__ unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s);
