// Codes of MLX's affine packing dequantized two at a time into 16-bit words, the B operand of
// mma (CUDA only). Pair j of a word holds codes j and j + 16 / BITS: one shift and one mask
// take both, and or-ed into the mantissa of 1024 (float16) or 128 (bfloat16) each half reads
// that number plus its code, exactly. One subtraction and one fused multiply-add of both
// halves then give scale * code + bias, rounded once to T as MLX's dequantization rounds it.
// bfloat16 holds 128 + code exactly only below 128: its 8-bit codes take the float16 route
// and then float.

template <typename T, int BITS>
struct mlxp_pairs;

template <int BITS>
struct mlxp_pairs<__half, BITS> {
  static MLXP_DEVICE void get(uint32_t word, __half scale, __half bias, uint32_t (&out)[16 / BITS]) {
    constexpr uint32_t MASK = ((1u << BITS) - 1u) * 0x00010001u;
    const __half2 s2 = __half2half2(scale);
    const __half2 b2 = __half2half2(bias);
    const __half2 base = __half2half2(__ushort_as_half((unsigned short)0x6400));
    _Pragma("unroll")
    for (int j = 0; j < 16 / BITS; ++j) {
      uint32_t h = ((word >> (BITS * j)) & MASK) | 0x64006400u;
      __half2 v = __hfma2(__hsub2(*reinterpret_cast<__half2*>(&h), base), s2, b2);
      out[j] = *reinterpret_cast<uint32_t*>(&v);
    }
  }
};

template <int BITS>
struct mlxp_pairs<__nv_bfloat16, BITS> {
  static MLXP_DEVICE void get(
      uint32_t word, __nv_bfloat16 scale, __nv_bfloat16 bias, uint32_t (&out)[16 / BITS]) {
    constexpr uint32_t MASK = ((1u << BITS) - 1u) * 0x00010001u;
    if (BITS < 8) {
      const __nv_bfloat162 s2 = __bfloat162bfloat162(scale);
      const __nv_bfloat162 b2 = __bfloat162bfloat162(bias);
      const __nv_bfloat162 base = __bfloat162bfloat162(__ushort_as_bfloat16((unsigned short)0x4300));
      _Pragma("unroll")
      for (int j = 0; j < 16 / BITS; ++j) {
        uint32_t h = ((word >> (BITS * j)) & MASK) | 0x43004300u;
        __nv_bfloat162 v = __hfma2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&h), base), s2, b2);
        out[j] = *reinterpret_cast<uint32_t*>(&v);
      }
    } else {
      const float s = __bfloat162float(scale);
      const float b = __bfloat162float(bias);
      const __half2 base = __half2half2(__ushort_as_half((unsigned short)0x6400));
      _Pragma("unroll")
      for (int j = 0; j < 16 / BITS; ++j) {
        uint32_t h = ((word >> (BITS * j)) & MASK) | 0x64006400u;
        const float2 c = __half22float2(__hsub2(*reinterpret_cast<__half2*>(&h), base));
        __nv_bfloat162 v = __floats2bfloat162_rn(fmaf(c.x, s, b), fmaf(c.y, s, b));
        out[j] = *reinterpret_cast<uint32_t*>(&v);
      }
    }
  }
};

// x's elements e .. e + EPW (EPW = 32 / BITS, as words u of two) paired as the codes of a word
// are: pair j is elements j and j + EPW / 2.
template <int BITS>
MLXP_DEVICE void mlxp_pair_x(const uint32_t (&u)[16 / BITS], uint32_t (&out)[16 / BITS]) {
  constexpr int H = 16 / BITS;
  _Pragma("unroll")
  for (int j = 0; j < H; ++j) {
    out[j] = __byte_perm(u[j / 2], u[(j + H) / 2], j % 2 ? 0x7632 : 0x5410);
  }
}
