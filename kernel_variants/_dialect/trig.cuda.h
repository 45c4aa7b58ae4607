// Sine and cosine by the hardware approximations, CUDA side (trig.metal.h has the same name).

// x reduced to [-pi, pi] by a two-part 2 pi (Cody-Waite), then __sincosf: about 1e-6 absolute
// error below |x| = 2^22 and a few instructions, where sincosf carries a long slow path for
// large |x| that a memory-bound kernel pays for in code size.
MLXP_DEVICE void mlxp_fast_sincos(float x, float& s, float& c) {
  const float k = rintf(x * 0.159154943f);
  const float r = fmaf(-k, -1.74845553e-07f, fmaf(-k, 6.28318548f, x));
  __sincosf(r, &s, &c);
}
