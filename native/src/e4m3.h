// OCP FP8 E4M3 (the "fn" variant: no inf, 0x7F / 0xFF NaN, max 448) as torch converts it, for the
// fp8 format of kvcompile/quant/floating.py: shared by the native library (formats.cc) and the
// TensorRT plugin's kernels (plugins/src/device_formats.h, compiled for host and device).  The same
// arithmetic as the format's ONNX lowering (_e4m3_bytes), so all three store the same bytes.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KVC_E4M3_INLINE __host__ __device__ inline
#else
#define KVC_E4M3_INLINE inline
#endif

namespace kvc {

// The value of an E4M3 byte: 2^-9 m (exponent field 0), else (1 + m / 8) 2^(E - 7).
KVC_E4M3_INLINE float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const float v = e ? ldexpf(1.0f + float(m) / 8.0f, e - 7) : ldexpf(float(m), -9);
  return (b & 0x80) ? -v : v;
}

// The binade count of a >= 0: how many of 2^-6 .. 2^8 it reaches (0: subnormal range).
KVC_E4M3_INLINE int e4m3_binades(float a) {
  int e = 0;
  for (int k = -6; k <= 8; ++k) e += a >= ldexpf(1.0f, k);
  return e;
}

// y (|y| <= 448) rounded to nearest even on the E4M3 grid, as its byte; -0.0 keeps its sign.
KVC_E4M3_INLINE uint8_t e4m3_byte(float y) {
  const float a = fabsf(y);
  const int e = e4m3_binades(a);
  const float spacing = ldexpf(1.0f, (e > 1 ? e : 1) - 10);
  const float q = rintf(a / spacing) * spacing;  // exact: a power-of-two division; may start the next binade
  const int eq = e4m3_binades(q);
  const float m = eq >= 1 ? q * ldexpf(1.0f, 10 - eq) - 8.0f : q * 512.0f;
  return uint8_t(eq * 8 + int(m)) | (signbit(y) ? 0x80 : 0);
}

}  // namespace kvc
