// Tensor-core helpers, CUDA only (sm_80+): Metal's simdgroup matrices hide their fragment
// layout, so kernels built on these have no Metal rendering.

// 8 elements of a 16-bit type as four 32-bit words (pairs, lower index in the low half).
template <typename T>
MLXP_DEVICE void mlxp_words(const mlxp_vec<T, 8>& x, uint32_t (&w)[4]) {
  union {
    mlxp_vec<T, 8> v;
    uint32_t w[4];
  } u;
  u.v = x;
  w[0] = u.w[0];
  w[1] = u.w[1];
  w[2] = u.w[2];
  w[3] = u.w[3];
}

// A compile-time bool as a type (to instantiate a generic lambda twice).
template <bool B>
struct mlxp_bool {
  static constexpr bool value = B;
};

// Vector i of 8 elements of p as four words; ALIGNED: p starts on a 16-byte boundary.
template <typename T, bool ALIGNED>
MLXP_DEVICE void mlxp_load_words(const T* p, int64_t i, uint32_t (&w)[4]) {
  if (ALIGNED) {
    const uint4 x = reinterpret_cast<const uint4*>(p)[i];
    w[0] = x.x;
    w[1] = x.y;
    w[2] = x.z;
    w[3] = x.w;
  } else {
    mlxp_words<T>(mlxp_load<8>(p, i), w);
  }
}

// Two floats rounded to a 16-bit T and packed into a word (a in the low half).
template <typename T>
MLXP_DEVICE uint32_t mlxp_pack2(float a, float b);
template <>
MLXP_DEVICE uint32_t mlxp_pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
MLXP_DEVICE uint32_t mlxp_pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment), float accumulators
// (PTX mma.m16n8k16: lane l holds rows l / 4 and l / 4 + 8, columns 2 * (l % 4) + {0, 1}).
template <typename T>
MLXP_DEVICE void mlxp_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
MLXP_DEVICE void mlxp_mma<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
MLXP_DEVICE void mlxp_mma<__nv_bfloat16>(
    float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The transpose of an 8 x 8 matrix of 16-bit values held one word per lane (lane l: row l / 4,
// columns 2 * (l % 4) + {0, 1}), in the same layout.
MLXP_DEVICE uint32_t mlxp_transpose8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
