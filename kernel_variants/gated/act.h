// Gate activations of the gated feed-forward kernels, in float32.
// ACT: 0 silu, 1 exact (erf) GELU, 2 tanh-approximated GELU, 3 sigmoid-approximated GELU.
// FAST uses the hardware's fast exponential (a few ulp less accurate).
template <int ACT, bool FAST>
MLXP_DEVICE float mlxp_gate(float g) {
  if (ACT == 0) {
    return g / (1.0f + (FAST ? mlxp_fast_exp(-g) : mlxp_exp(-g)));
  }
  if (ACT == 1) {
    return 0.5f * g * (1.0f + mlxp_erf(g * 0.7071067811865476f));
  }
  if (ACT == 2) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + mlxp_tanh(inner));
  }
  return g / (1.0f + (FAST ? mlxp_fast_exp(-1.702f * g) : mlxp_exp(-1.702f * g)));
}
