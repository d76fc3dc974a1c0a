// e^x for x <= 0, shared by the ONNX Runtime library's attention (kv_attention.cc) and the
// TensorRT plugin's kernels (plugins/src/programs.h; there compiled for host and device).
//
// x = n ln2 + r with |r| <= ln2 / 2, e^r by the degree-7 polynomial of Cephes' expf (S. L. Moshier,
// public domain), 2^n built in the exponent bits.  Relative error ~1e-7; below -87 (and for NaN)
// it returns 0: the softmax weight of a score 87 nats under the maximum.  Branch-free apart from
// that test, so the CPU loops vectorize.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KVC_EXP_INLINE __host__ __device__ inline
#else
#define KVC_EXP_INLINE inline
#endif

namespace kvc {

KVC_EXP_INLINE float exp_nonpositive(float x) {
  const float n = rintf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^n for the n of an x >= -87 (n >= -126); other x select 0 below, so clamp n first to keep
  // the integer conversion defined
  const int32_t bits = (int32_t(n < -126.0f || !(n == n) ? -126.0f : n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return x >= -87.0f ? y * scale : 0.0f;
}

}  // namespace kvc
