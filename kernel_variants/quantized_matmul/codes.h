// Codes of MLX's affine packing (BITS bits each, lowest first, in 32-bit words) as floats.

// The 32 / BITS codes of `word`, exact. A code at bit p of a half-word is or-ed into the
// mantissa of the float 2^(23 - p) (biased exponent 150 - p), where its lowest bit is worth 1,
// and 2^(23 - p) is subtracted: two ALU operations a code, no integer-to-float conversion. The
// upper half-word is shifted down first, so that every code stays inside the 23-bit mantissa.
template <int BITS>
MLXP_DEVICE mlxp_vec<float, 32 / BITS> mlxp_codes(uint32_t word) {
  constexpr int HALF = 16 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  mlxp_vec<float, 32 / BITS> out;
  _Pragma("unroll")
  for (int h = 0; h < 2; ++h) {
    const uint32_t part = h == 0 ? word : word >> 16;
    _Pragma("unroll")
    for (int i = 0; i < HALF; ++i) {
      const uint32_t magic = (uint32_t)(150 - BITS * i) << 23;
      const float code = mlxp_from_bits((int)((part & (MASK << (BITS * i))) | magic));
      out.v[h * HALF + i] = code - mlxp_from_bits((int)magic);
    }
  }
  return out;
}
