// The names of trig.cuda.h, Metal side.

MLXP_DEVICE void mlxp_fast_sincos(float x, thread float& s, thread float& c) {
  const float k = rint(x * 0.159154943f);
  const float r = fma(-k, -1.74845553e-07f, fma(-k, 6.28318548f, x));
  s = fast::sincos(r, c);
}
