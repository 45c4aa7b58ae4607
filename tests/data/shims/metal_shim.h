// Stand-in for what a Metal kernel of mx.fast.metal_kernel sees before its header: the Metal
// standard library and MLX's Metal utils (float16_t, bfloat16_t), declared as C++17 so that a
// host compiler can syntax-check rendered kernels. Only what the kernels use is declared, with
// Metal's real signatures, so a call with the wrong argument types fails here as it would there.

#pragma once

// Address spaces. device and constant are distinct so that overloads on them stay distinct and
// a pointer cannot silently move between them; threadgroup and thread are left empty because a
// C++ compiler rejects an address space on a local (threadgroup) array.
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup
#define thread

typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

// Metal's half and bfloat are arithmetic types converting to and from float; built-in type
// names, not typedefs, so that no kernel may name a variable after them.
#define half _Float16
#define bfloat __bf16

namespace metal {

template <typename T>
struct vec3 {
  T x, y, z;
};

}  // namespace metal

typedef metal::vec3<uint> uint3;
typedef metal::vec3<ushort> ushort3;

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

float simd_shuffle_xor(float data, ushort mask);
half simd_shuffle_xor(half data, ushort mask);
int simd_shuffle_xor(int data, ushort mask);
uint simd_shuffle_xor(uint data, ushort mask);

float abs(float x);
half abs(half x);
int abs(int x);
float rint(float x);
float fma(float a, float b, float c);

template <typename T, typename U>
T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of one size");
  return __builtin_bit_cast(T, x);
}

namespace precise {
float rsqrt(float x);
float exp(float x);
float exp2(float x);
float log2(float x);
float tanh(float x);
float sincos(float x, thread float& cosval);
}  // namespace precise

namespace fast {
float rsqrt(float x);
float exp(float x);
float exp2(float x);
float log2(float x);
float tanh(float x);
float sincos(float x, thread float& cosval);
}  // namespace fast

}  // namespace metal

// MLX's Metal utils (mlx/backend/metal/kernels/utils.h, bf16.h).
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
