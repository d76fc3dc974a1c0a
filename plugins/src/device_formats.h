// Storage formats element by element, for code that runs on the GPU and, compiled as plain C++,
// on the CPU (the tests run it there: kvc_trt_emulate).  The arithmetic is native/src/formats.cc's
// (itself the torch reference's, operation for operation), rewritten without allocation or
// standard containers so that nvcc can compile it for the device.  Both compilations round like
// torch: the host with -ffp-contract=off, the device with -fmad=false.
#pragma once

#include <stdint.h>

#include "e4m3.h"             // native/src: FP8 E4M3 bytes
#include "lloyd_codebooks.h"  // native/src: the Lloyd-Max codebooks

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define KVC_HD __host__ __device__ inline
#else
#include <math.h>
#define KVC_HD inline
#endif

namespace kvc_dev {

enum Kind : int32_t { kFp16 = 0, kInteger = 1, kNf4 = 2, kLloyd = 3, kFp8 = 4 };  // Fmt::levels: a Lloyd-Max codebook index

constexpr int kMaxParts = 3;

// A scheme as the kernels see it (built on the host from kvc::Format).
struct Fmt {
  int32_t kind, bits, group, channel, symmetric, scale_bytes, rotate, double_quant, levels, nparts;
  int64_t d, token_group;
  int64_t part_bytes[kMaxParts], part_width[kMaxParts], rows_per[kMaxParts];
  KVC_HD int64_t row_bytes(int p) const { return part_width[p] * part_bytes[p]; }
};

KVC_HD float fmin_(float a, float b) { return fminf(a, b); }
KVC_HD float fmax_(float a, float b) { return fmaxf(a, b); }
KVC_HD bool finite_(float x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return __builtin_isfinite(x);
#endif
}

KVC_HD uint16_t half_bits(float x) {  // round to nearest even, as torch's float -> float16 cast
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(x));
#else
  _Float16 h = static_cast<_Float16>(x);
  uint16_t b;
  __builtin_memcpy(&b, &h, 2);
  return b;
#endif
}

KVC_HD float half_value(uint16_t b) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(b));
#else
  _Float16 h;
  __builtin_memcpy(&h, &b, 2);
  return static_cast<float>(h);
#endif
}

// Little-endian loads and stores byte by byte: alignment-free, the same on host and device.
KVC_HD uint32_t load_u(const uint8_t* p, int bytes) {
  uint32_t v = 0;
  for (int k = 0; k < bytes; ++k) v |= uint32_t(p[k]) << (8 * k);
  return v;
}
KVC_HD void store_u(uint8_t* p, uint32_t v, int bytes) {
  for (int k = 0; k < bytes; ++k) p[k] = uint8_t(v >> (8 * k));
}
KVC_HD float bits_float(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
KVC_HD uint32_t float_bits(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, 4);
  return b;
}

KVC_HD uint16_t half_round_up(float t) {  // quant.base.round_to_dtype(t, float16, "up")
  uint16_t r = half_bits(t);
  if (half_value(r) < t) {
    if (!(r & 0x8000)) r = uint16_t(r + 1);
    else if (r == 0x8000) r = 1;
    else r = uint16_t(r - 1);
  }
  return r;
}
KVC_HD uint16_t half_round_down(float t) { return uint16_t(half_round_up(-t) ^ 0x8000); }

KVC_HD float store_param(uint8_t* dst, float t, int bytes, bool up) {
  if (bytes == 4) {
    store_u(dst, float_bits(t), 4);
    return t;
  }
  uint16_t b = up ? half_round_up(t) : half_round_down(t);
  store_u(dst, b, 2);
  return half_value(b);
}

KVC_HD float store_scale(uint8_t* dst, float t, int bytes) {
  float s = store_param(dst, t, bytes, true);
  if (s == 0.0f) return store_param(dst, bytes == 4 ? 1.17549435e-38f : 6.103515625e-05f, bytes, true);
  return s;
}

KVC_HD float load_param(const uint8_t* src, int bytes) {
  return bytes == 4 ? bits_float(load_u(src, 4)) : half_value(uint16_t(load_u(src, 2)));
}

KVC_HD int gcd_(int a, int b) { return b ? gcd_(b, a % b) : a; }

// Code c of a packed row: codes fill blocks of lcm(bits, 8) bits, first code in the low bits.
KVC_HD int code_at(const uint8_t* row, int64_t c, int bits) {
  if (bits == 8) return row[c];
  const int block_bits = bits * 8 / gcd_(bits, 8), per = block_bits / bits, nbytes = block_bits / 8;
  const int64_t block = c / per;
  const int i = int(c % per);
  uint32_t acc = load_u(row + block * nbytes, nbytes);
  return int((acc >> (i * bits)) & ((1u << bits) - 1));
}

KVC_HD float nf4_level(int code) {
  // kvcompile.quant.nf4.nf4_codebook (float32), as native/src/formats.cc's kNf4Codebook
  const float levels[16] = {
      -0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd65c0000000p-1f, -0x1.94653c0000000p-2f,
      -0x1.2344960000000p-2f, -0x1.7a6a7a0000000p-3f, -0x1.74f0d20000000p-4f, 0x0.0p+0f,
      0x1.45f6020000000p-4f,  0x1.4995be0000000p-3f,  0x1.f809b40000000p-3f,  0x1.5a066c0000000p-2f,
      0x1.c3496a0000000p-2f,  0x1.200f520000000p-1f,  0x1.7227600000000p-1f,  0x1.0000000000000p+0f};
  return levels[code];
}

// Parts of one (batch row, head) slice: base pointers, row 0 of each.
struct Parts {
  uint8_t* p[kMaxParts];
};

// The stored value of element c of position `row` (the rotated-domain value for -rot formats).
KVC_HD float element(const Fmt& f, const Parts& parts, int64_t row, int64_t c) {
  if (f.kind == kFp16) return half_value(uint16_t(load_u(parts.p[0] + (row * f.d + c) * 2, 2)));
  if (f.kind == kFp8) return kvc::e4m3_value(parts.p[0][row * f.d + c]) * load_param(parts.p[1] + row * 2, 2);
  const int code = code_at(parts.p[0] + row * f.part_width[0], c, f.bits);
  if (f.kind == kNf4) {
    const int64_t groups = f.d / f.group, g = c / f.group;
    float s;
    if (f.double_quant) s = load_param(parts.p[2] + row * 2, 2) * float(parts.p[1][row * groups + g]) / 255.0f;
    else s = load_param(parts.p[1] + (row * groups + g) * 2, 2);
    return nf4_level(code) * s;
  }
  if (f.kind == kLloyd && f.channel) {  // centre + level * half-range, per channel per block of G positions
    const int64_t p = (row / f.group) * f.d + c;
    return load_param(parts.p[2] + p * 2, 2) + kvc::lloyd_level(f.levels, code) * load_param(parts.p[1] + p * 2, 2);
  }
  if (f.kind == kLloyd) return kvc::lloyd_level(f.levels, code) * load_param(parts.p[1] + (row * (f.d / f.group) + c / f.group) * 2, 2);
  const int sb = f.scale_bytes;
  const int64_t width = f.channel ? f.d : f.d / f.group;
  const int64_t prow = f.channel ? row / f.group : row, g = f.channel ? c : c / f.group;
  const float scale = load_param(parts.p[1] + (prow * width + g) * sb, sb);
  if (f.symmetric) return (float(code) - float(f.levels)) * scale;
  return load_param(parts.p[2] + (prow * width + g) * sb, sb) + float(code) * scale;
}

// The orthonormal Hadamard rotation of x[0..d) in place, by one thread: butterflies stage by stage
// (in place: each pair is read before it is written), then the float32 factor 1/sqrt(d).
KVC_HD void rotate_serial(float* x, int64_t d) {
  for (int64_t h = 1; h < d; h *= 2)
    for (int64_t block = 0; block < d; block += 2 * h)
      for (int64_t i = 0; i < h; ++i) {
        const float a = x[block + i], b = x[block + h + i];
        x[block + i] = a + b;
        x[block + h + i] = a - b;
      }
  const float scale = float(1.0 / sqrt(double(d)));
  for (int64_t i = 0; i < d; ++i) x[i] = x[i] * scale;
}

KVC_HD float max_abs_of(const Fmt& f) {
  if (f.kind == kInteger) return (f.scale_bytes == 2 ? 65504.0f : 3.40282347e+38f) / 2;
  return f.kind == kLloyd && f.channel ? 65504.0f / 2 : 65504.0f;  // lm-ch: (max - centre) is a float16 half-range
}

// Whether row x[0..d) can be stored (finite and within the parameters' range); x already rotated.
KVC_HD bool storable(const Fmt& f, const float* x) {
  const float limit = max_abs_of(f);
  for (int64_t c = 0; c < f.d; ++c)
    if (!finite_(x[c]) || fabsf(x[c]) > limit) return false;
  return true;
}

KVC_HD int integer_code(const Fmt& f, float v, float zero, float scale) {
  const float levels = float(f.levels);
  if (f.symmetric) {
    float q = rintf(v / scale);
    q = fmin_(fmax_(q, -levels), levels);
    return int(q + levels);
  }
  float q = rintf((v - zero) / scale);
  return int(fmin_(fmax_(q, 0.0f), levels));
}

// Write the codes of row `row` from x, reading each element's parameters back from the parts
// (they hold exactly the values quantization used).
KVC_HD void pack_codes(const Fmt& f, const float* x, const Parts& parts, int64_t row) {
  uint8_t* dst = parts.p[0] + row * f.part_width[0];
  const int bits = f.kind == kNf4 ? 4 : f.bits;  // (Lloyd-Max: f.bits)
  const int block_bits = bits * 8 / gcd_(bits, 8), per = block_bits / bits, nbytes = block_bits / 8;
  for (int64_t start = 0, o = 0; start < f.d; start += per, o += nbytes) {
    uint32_t acc = 0;
    for (int i = 0; i < per && start + i < f.d; ++i) {
      const int64_t c = start + i;
      int code;
      if (f.kind == kNf4) {
        const int64_t groups = f.d / f.group, g = c / f.group;
        const float s = f.double_quant ? load_param(parts.p[2] + row * 2, 2) * float(parts.p[1][row * groups + g]) / 255.0f
                                       : load_param(parts.p[1] + (row * groups + g) * 2, 2);
        const float y = x[c] / s;
        int best = 0;
        float best_err = fabsf(y - nf4_level(0));
        for (int k = 1; k < 16; ++k) {
          const float e = fabsf(y - nf4_level(k));
          if (e < best_err) best = k, best_err = e;
        }
        code = best;
      } else if (f.kind == kLloyd) {  // the nearest level of y = x / s (lm-ch: (x - m) / h), the first of equal distances
        float y;
        if (f.channel) {
          const int64_t p = (row / f.group) * f.d + c;
          y = (x[c] - load_param(parts.p[2] + p * 2, 2)) / load_param(parts.p[1] + p * 2, 2);
        } else {
          y = x[c] / load_param(parts.p[1] + (row * (f.d / f.group) + c / f.group) * 2, 2);
        }
        int best = 0;
        float best_err = fabsf(y - kvc::lloyd_level(f.levels, 0));
        for (int k = 1; k < (1 << f.bits); ++k) {
          const float e = fabsf(y - kvc::lloyd_level(f.levels, k));
          if (e < best_err) best = k, best_err = e;
        }
        code = best;
      } else {
        const int sb = f.scale_bytes;
        const int64_t width = f.channel ? f.d : f.d / f.group;
        const int64_t prow = f.channel ? row / f.group : row, g = f.channel ? c : c / f.group;
        const float scale = load_param(parts.p[1] + (prow * width + g) * sb, sb);
        const float zero = f.symmetric ? 0.0f : load_param(parts.p[2] + (prow * width + g) * sb, sb);
        code = integer_code(f, x[c], zero, scale);
      }
      acc |= uint32_t(code) << (i * bits);
    }
    store_u(dst + o, acc, nbytes);
  }
}

// Quantize one position of a per-token format (fp16, nf4, lm, integer without -ch) into row `row`.
KVC_HD void quantize_token(const Fmt& f, const float* x, const Parts& parts, int64_t row) {
  if (f.kind == kFp16) {
    for (int64_t c = 0; c < f.d; ++c) store_u(parts.p[0] + (row * f.d + c) * 2, half_bits(x[c]), 2);
    return;
  }
  if (f.kind == kFp8) {  // s = amax / 448 rounded up to float16; bytes of clamp(x / s, +-448)
    float m = 0.0f;
    for (int64_t c = 0; c < f.d; ++c) m = fmax_(m, fabsf(x[c]));
    const float s = store_scale(parts.p[1] + row * 2, m / 448.0f, 2);
    for (int64_t c = 0; c < f.d; ++c) parts.p[0][row * f.d + c] = kvc::e4m3_byte(fmin_(fmax_(x[c] / s, -448.0f), 448.0f));
    return;
  }
  const int64_t groups = f.d / f.group;
  if (f.kind == kLloyd || (f.kind == kNf4 && !f.double_quant)) {  // an absmax scale per group (float16, rounded up)
    for (int64_t g = 0; g < groups; ++g) {
      float m = 0.0f;
      for (int64_t c = 0; c < f.group; ++c) m = fmax_(m, fabsf(x[g * f.group + c]));
      store_scale(parts.p[1] + (row * groups + g) * 2, m, 2);
    }
    pack_codes(f, x, parts, row);
    return;
  }
  if (f.kind == kNf4) {  // double-quantized scales: a float16 super-scale, a byte per group
    float top = 0.0f;
    for (int64_t c = 0; c < f.d; ++c) top = fmax_(top, fabsf(x[c]));  // max of the group maxima
    const float super = store_scale(parts.p[2] + row * 2, top, 2);
    for (int64_t g = 0; g < groups; ++g) {
      float m = 0.0f;
      for (int64_t c = 0; c < f.group; ++c) m = fmax_(m, fabsf(x[g * f.group + c]));
      float code = ceilf(m / super * 255.0f);
      code = fmin_(fmax_(code, 1.0f), 255.0f);
      parts.p[1][row * groups + g] = uint8_t(code);
    }
    pack_codes(f, x, parts, row);
    return;
  }
  const int sb = f.scale_bytes;
  const float levels = float(f.levels);
  for (int64_t g = 0; g < groups; ++g) {
    const float* v = x + g * f.group;
    uint8_t* scale_dst = parts.p[1] + (row * groups + g) * sb;
    if (f.symmetric) {
      float m = 0.0f;
      for (int64_t c = 0; c < f.group; ++c) m = fmax_(m, fabsf(v[c]));
      store_scale(scale_dst, m / levels, sb);
    } else {
      float lo = v[0], hi = v[0];
      for (int64_t c = 1; c < f.group; ++c) lo = fmin_(lo, v[c]), hi = fmax_(hi, v[c]);
      const float zero = store_param(parts.p[2] + (row * groups + g) * sb, lo, sb, false);
      store_scale(scale_dst, (hi - zero) / levels, sb);
    }
  }
  pack_codes(f, x, parts, row);
}

// The parameters of channel c of the per-channel block starting at row `row0` (G positions of x,
// x[t * d + c]).
KVC_HD void quantize_channel_params(const Fmt& f, const float* x, const Parts& parts, int64_t row0, int64_t c) {
  const int sb = f.scale_bytes;
  const int64_t G = f.group, prow = row0 / G;
  const float levels = float(f.levels);
  if (f.kind == kLloyd) {  // lm-ch: centre rounded down to float16, half-range (max - centre) rounded up
    float lo = x[c], hi = lo;
    for (int64_t t = 1; t < G; ++t) lo = fmin_(lo, x[t * f.d + c]), hi = fmax_(hi, x[t * f.d + c]);
    const float centre = store_param(parts.p[2] + (prow * f.d + c) * 2, (lo + hi) / 2.0f, 2, false);
    store_scale(parts.p[1] + (prow * f.d + c) * 2, hi - centre, 2);
    return;
  }
  if (f.symmetric) {
    float m = 0.0f;
    for (int64_t t = 0; t < G; ++t) m = fmax_(m, fabsf(x[t * f.d + c]));
    store_scale(parts.p[1] + (prow * f.d + c) * sb, m / levels, sb);
    return;
  }
  float lo = x[c], hi = lo;
  for (int64_t t = 1; t < G; ++t) lo = fmin_(lo, x[t * f.d + c]), hi = fmax_(hi, x[t * f.d + c]);
  const float zero = store_param(parts.p[2] + (prow * f.d + c) * sb, lo, sb, false);
  store_scale(parts.p[1] + (prow * f.d + c) * sb, (hi - zero) / levels, sb);
}

}  // namespace kvc_dev
