// Codes of MLX's affine packing dequantized two at a time into 16-bit words, the B operand of
// mma (CUDA only). Pair j of a word holds codes j and j + 16 / BITS: one shift and one mask
// take both, and or-ed into the mantissa of 1024 (float16) or 128 (bfloat16) each half reads
// that number plus its code, exactly. One subtraction and one fused multiply-add of both
// halves then give scale * code + bias, rounded once to T as MLX's dequantization rounds it.
// bfloat16 holds 128 + code exactly only below 128: its 8-bit codes take the float16 route
// and then float.

// A 16-bit T's pair type, the bits of the number whose mantissa takes a code (BASE) and the
// widest code that mantissa holds.
template <typename T>
struct mlxp_half_pair;
template <>
struct mlxp_half_pair<__half> {
  using T2 = __half2;
  static constexpr unsigned short BASE = 0x6400;  // 1024
  static constexpr int MAX_BITS = 10;
  static MLXP_DEVICE T2 splat(__half v) { return __half2half2(v); }
  static MLXP_DEVICE __half base() { return __ushort_as_half(BASE); }
};
template <>
struct mlxp_half_pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned short BASE = 0x4300;  // 128
  static constexpr int MAX_BITS = 7;
  static MLXP_DEVICE T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static MLXP_DEVICE __nv_bfloat16 base() { return __ushort_as_bfloat16(BASE); }
};

// Pair j of `word`'s codes as a pair of U, exact (BITS at most U's MAX_BITS).
template <typename U, int BITS>
MLXP_DEVICE typename mlxp_half_pair<U>::T2 mlxp_code_pair(uint32_t word, int j) {
  using P = mlxp_half_pair<U>;
  constexpr uint32_t MASK = ((1u << BITS) - 1u) * 0x00010001u;
  uint32_t h = ((word >> (BITS * j)) & MASK) | (P::BASE * 0x00010001u);
  return __hsub2(*reinterpret_cast<typename P::T2*>(&h), P::splat(P::base()));
}

template <typename T, int BITS>
MLXP_DEVICE void mlxp_pairs(uint32_t word, T scale, T bias, uint32_t (&out)[16 / BITS]) {
  using P = mlxp_half_pair<T>;
  _Pragma("unroll")
  for (int j = 0; j < 16 / BITS; ++j) {
    if (BITS <= P::MAX_BITS) {
      typename P::T2 v =
          __hfma2(mlxp_code_pair<T, BITS>(word, j), P::splat(scale), P::splat(bias));
      out[j] = *reinterpret_cast<uint32_t*>(&v);
    } else {  // bfloat16's 8-bit codes: made in float16, then float
      const float2 c = __half22float2(mlxp_code_pair<__half, BITS>(word, j));
      const float s = mlxp_f32(scale);
      const float b = mlxp_f32(bias);
      __nv_bfloat162 v = __floats2bfloat162_rn(fmaf(c.x, s, b), fmaf(c.y, s, b));
      out[j] = *reinterpret_cast<uint32_t*>(&v);
    }
  }
}

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
