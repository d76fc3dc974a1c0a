// Storage formats: see formats.h.  Every float operation mirrors the torch reference's order.
#include "formats.h"

#include "e4m3.h"
#include "lloyd_codebooks.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace kvc {

const float kNf4Codebook[16] = {
    -0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd65c0000000p-1f, -0x1.94653c0000000p-2f,
    -0x1.2344960000000p-2f, -0x1.7a6a7a0000000p-3f, -0x1.74f0d20000000p-4f, 0x0.0p+0f,
    0x1.45f6020000000p-4f,  0x1.4995be0000000p-3f,  0x1.f809b40000000p-3f,  0x1.5a066c0000000p-2f,
    0x1.c3496a0000000p-2f,  0x1.200f520000000p-1f,  0x1.7227600000000p-1f,  0x1.0000000000000p+0f};

namespace {

constexpr float kFp16Max = 65504.0f;
constexpr float kFp16Tiny = 0x1p-14f;  // smallest normal float16, the reference's scale for a constant group

uint16_t half_bits(float x) {  // round to nearest even, as torch's float -> float16 cast
  _Float16 h = static_cast<_Float16>(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

float half_value(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

// quant.base.round_to_dtype(t, float16, "up"): the float16 nearest t, stepped up if below t.
uint16_t half_round_up(float t) {
  uint16_t r = half_bits(t);
  if (half_value(r) < t) {
    if (!(r & 0x8000)) r = r + 1;
    else if (r == 0x8000) r = 1;  // -0 -> smallest positive subnormal
    else r = r - 1;
  }
  return r;
}

uint16_t half_round_down(float t) { return half_round_up(-t) ^ 0x8000; }

// Store a scale or zero point: float16 (directed rounding) or float32; returns the value used.
float store_param(uint8_t* dst, float t, int bytes, bool up) {
  if (bytes == 4) {
    std::memcpy(dst, &t, 4);
    return t;
  }
  uint16_t b = up ? half_round_up(t) : half_round_down(t);
  std::memcpy(dst, &b, 2);
  return half_value(b);
}

// A scale rounded up, a zero scale (constant group) replaced by the dtype's smallest normal value.
float store_scale(uint8_t* dst, float t, int bytes) {
  float s = store_param(dst, t, bytes, true);
  if (s == 0.0f) {
    float tiny = bytes == 4 ? std::numeric_limits<float>::min() : kFp16Tiny;
    return store_param(dst, tiny, bytes, true);
  }
  return s;
}

float load_param(const uint8_t* src, int bytes) {
  if (bytes == 4) {
    float v;
    std::memcpy(&v, src, 4);
    return v;
  }
  uint16_t b;
  std::memcpy(&b, src, 2);
  return half_value(b);
}

void pack_row(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  int block_bits = std::lcm(bits, 8), per = block_bits / bits, nbytes = block_bits / 8;
  for (int64_t start = 0, o = 0; start < n; start += per, o += nbytes) {
    uint64_t acc = 0;
    for (int i = 0; i < per && start + i < n; ++i) acc |= uint64_t(codes[start + i]) << (i * bits);
    for (int k = 0; k < nbytes; ++k) out[o + k] = uint8_t(acc >> (8 * k));
  }
}

void unpack_row(const uint8_t* packed, int64_t n, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, packed, n);
    return;
  }
  if (bits == 4 && n % 2 == 0) {
    for (int64_t i = 0; i < n / 2; ++i) codes[2 * i] = packed[i] & 0xF, codes[2 * i + 1] = packed[i] >> 4;
    return;
  }
  if (bits == 2 && n % 4 == 0) {
    for (int64_t i = 0; i < n / 4; ++i) {
      const uint8_t b = packed[i];
      codes[4 * i] = b & 3, codes[4 * i + 1] = (b >> 2) & 3, codes[4 * i + 2] = (b >> 4) & 3, codes[4 * i + 3] = b >> 6;
    }
    return;
  }
  int block_bits = std::lcm(bits, 8), per = block_bits / bits, nbytes = block_bits / 8;
  uint64_t mask = (uint64_t(1) << bits) - 1;
  for (int64_t start = 0, o = 0; start < n; start += per, o += nbytes) {
    uint64_t acc = 0;
    for (int k = 0; k < nbytes; ++k) acc |= uint64_t(packed[o + k]) << (8 * k);
    for (int i = 0; i < per && start + i < n; ++i) codes[start + i] = uint8_t((acc >> (i * bits)) & mask);
  }
}

// Codes of each byte as floats: 4 two-bit codes or 2 four-bit codes, first code in the low bits.
struct CodeTables {
  float two[256][4];
  float four[256][2];
  CodeTables() {
    for (int b = 0; b < 256; ++b) {
      for (int i = 0; i < 4; ++i) two[b][i] = float((b >> (2 * i)) & 3);
      for (int i = 0; i < 2; ++i) four[b][i] = float((b >> (4 * i)) & 15);
    }
  }
};
const CodeTables kCodeTables;

// The codes of one packed row as floats (exact: codes are small integers).
void unpack_row_float(const uint8_t* packed, int64_t n, int bits, float* out) {
  if (bits == 2 && n % 4 == 0) {
    for (int64_t i = 0; i < n / 4; ++i) std::memcpy(out + 4 * i, kCodeTables.two[packed[i]], 16);
    return;
  }
  if (bits == 4 && n % 2 == 0) {
    for (int64_t i = 0; i < n / 2; ++i) std::memcpy(out + 2 * i, kCodeTables.four[packed[i]], 8);
    return;
  }
  uint8_t codes[4096];
  unpack_row(packed, n, bits, codes);
  for (int64_t i = 0; i < n; ++i) out[i] = float(codes[i]);
}

bool parse_int(const std::string& s, int64_t* out) {
  if (s.empty() || s.size() > 6 || s[0] == '0') return false;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *out = v;
  return true;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (char c : s) {
    if (c == sep) out.emplace_back();
    else out.back() += c;
  }
  return out;
}

bool fail(std::string* error, const std::string& why) {
  if (error) *error = why;
  return false;
}

}  // namespace

int64_t packed_length(int64_t n, int bits) {
  int block_bits = std::lcm(bits, 8), per = block_bits / bits, nbytes = block_bits / 8;
  return (n + per - 1) / per * nbytes;
}

void rotate_row(float* x, int64_t d) {
  float tmp[4096];
  for (int64_t h = 1; h < d; h *= 2) {
    for (int64_t block = 0; block < d; block += 2 * h) {
      for (int64_t i = 0; i < h; ++i) {
        float a = x[block + i], b = x[block + h + i];
        tmp[block + i] = a + b;
        tmp[block + h + i] = a - b;
      }
    }
    std::memcpy(x, tmp, d * sizeof(float));
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t i = 0; i < d; ++i) x[i] = x[i] * scale;
}

bool parse_format(const std::string& name, int64_t d, Format* out, std::string* error) {
  Format f;
  f.name = name;
  f.head_dim = d;
  if (d < 1 || d > 4096) return fail(error, name + ": head dim must be from 1 to 4096, got " + std::to_string(d));
  std::vector<std::string> tokens = split(name, '-');
  if (name == "fp16") {
    f.parts = {{"values", 2, d, 1}};
    *out = f;
    return true;
  }
  if (name == "fp8") {  // E4M3 bytes, a float16 scale per position
    f.kind = kFp8;
    f.bits = 8;
    f.group = 0;
    f.symmetric = 1;
    f.scale_bytes = 2;
    f.parts = {{"codes", 1, d, 1}, {"scale", 2, 1, 1}};
    *out = f;
    return true;
  }
  if (tokens[0] == "nf4") {
    f.kind = kNf4;
    f.bits = 4;
    f.group = 16;
    f.symmetric = 1;
    f.double_quant = 1;
    size_t i = 1;
    int64_t g;
    if (i < tokens.size() && tokens[i].size() > 1 && tokens[i][0] == 'g') {
      if (!parse_int(tokens[i].substr(1), &g) || g == 16) return fail(error, name + ": not a canonical nf4 name");
      f.group = int(g);
      ++i;
    }
    if (i < tokens.size() && tokens[i] == "nodq") {
      f.double_quant = 0;
      ++i;
    }
    if (i != tokens.size()) return fail(error, name + ": not a canonical nf4 name");
    if (d % f.group) return fail(error, name + ": head dim " + std::to_string(d) + " is not a multiple of the group");
    f.scale_bytes = f.double_quant ? 1 : 2;
    f.parts = {{"codes", 1, packed_length(d, 4), 1}};
    if (f.double_quant) {
      f.parts.push_back({"scale_codes", 1, d / f.group, 1});
      f.parts.push_back({"super_scale", 2, 1, 1});
    } else {
      f.parts.push_back({"scale", 2, d / f.group, 1});
    }
    *out = f;
    return true;
  }
  if (tokens[0].size() == 3 && tokens[0].compare(0, 2, "lm") == 0) {  // lm<bits>[-ch][-g<G>][-rot]
    f.kind = kLloyd;
    f.bits = tokens[0][2] - '0';
    f.group = 32;
    f.scale_bytes = 2;
    size_t i = 1;
    int64_t g;
    if (i < tokens.size() && tokens[i] == "ch") {
      f.channel = 1;
      ++i;
    }
    if (i < tokens.size() && tokens[i].size() > 1 && tokens[i][0] == 'g') {
      if (!parse_int(tokens[i].substr(1), &g) || g == 32) return fail(error, name + ": not a canonical lm name");
      f.group = int(g);
      ++i;
    }
    if (i < tokens.size() && tokens[i] == "rot") {
      f.rotate = 1;
      ++i;
    }
    if (i != tokens.size() || f.bits < 2 || f.bits > 4 || (f.channel && f.rotate))
      return fail(error, name + ": not a canonical lm name");
    f.levels = lloyd_book(f.bits, f.group, f.channel);
    if (f.levels < 0)
      return fail(error, name + ": the native library has Lloyd-Max codebooks for groups 16, 32, 64 and 128 only");
    if (f.rotate && (d & (d - 1))) return fail(error, name + ": -rot needs a power-of-two head dim");
    if (f.channel) {  // per channel: a half-range and a centre per channel per block of G positions
      f.token_group = f.group;
      f.parts = {{"codes", 1, packed_length(d, f.bits), 1}, {"scale", 2, d, f.group}, {"centre", 2, d, f.group}};
      *out = f;
      return true;
    }
    if (d % f.group) return fail(error, name + ": head dim " + std::to_string(d) + " is not a multiple of the group");
    f.parts = {{"codes", 1, packed_length(d, f.bits), 1}, {"scale", 2, d / f.group, 1}};
    *out = f;
    return true;
  }
  int64_t bits;
  if (tokens[0].size() < 4 || tokens[0].compare(0, 3, "int") != 0 || !parse_int(tokens[0].substr(3), &bits))
    return fail(error, name + ": unknown storage scheme (the native library reads fp16, fp8, int<bits>[...], "
                              "nf4[...] and lm<bits>[...])");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    return fail(error, name + ": integer schemes have 2, 3, 4 or 8 bits");
  f.kind = kInteger;
  f.bits = int(bits);
  f.group = 32;
  f.scale_bytes = 2;
  // suffixes in canonical order: -sym -ch -g<G> -s32 -rot, each at most once
  const char* order[] = {"sym", "ch", "g", "s32", "rot"};
  size_t next = 0;
  for (size_t i = 1; i < tokens.size(); ++i) {
    const std::string& t = tokens[i];
    size_t k = next;
    while (k < 5 && !(t == order[k] || (k == 2 && t.size() > 1 && t[0] == 'g'))) ++k;
    if (k == 5) return fail(error, name + ": not a canonical integer scheme name");
    if (k == 0) f.symmetric = 1;
    if (k == 1) f.channel = 1;
    if (k == 2) {
      int64_t g;
      if (!parse_int(t.substr(1), &g) || g == 32 || g > 65536) return fail(error, name + ": not a canonical group size");
      f.group = int(g);
    }
    if (k == 3) f.scale_bytes = 4;
    if (k == 4) f.rotate = 1;
    next = k + 1;
  }
  if (f.rotate && (f.channel || (d & (d - 1))))
    return fail(error, name + ": -rot needs per-token groups and a power-of-two head dim");
  if (!f.channel && d % f.group) return fail(error, name + ": head dim " + std::to_string(d) + " is not a multiple of the group");
  f.levels = f.symmetric ? (1 << (f.bits - 1)) - 1 : (1 << f.bits) - 1;
  f.token_group = f.channel ? f.group : 1;
  int64_t params_width = f.channel ? d : d / f.group;
  f.parts = {{"codes", 1, packed_length(d, f.bits), 1}, {"scale", f.scale_bytes, params_width, f.token_group}};
  if (!f.symmetric) f.parts.push_back({"zero", f.scale_bytes, params_width, f.token_group});
  *out = f;
  return true;
}

bool quantize_rows(const Format& f, const float* x_in, int64_t n, const PartPtrs& parts, int64_t row0,
                   std::string* error) {
  const int64_t d = f.head_dim;
  for (int64_t i = 0; i < n * d; ++i) {
    if (!std::isfinite(x_in[i])) return fail(error, f.name + ": input has NaN or inf; expected finite K/V values");
  }
  // integer formats: (max - zero) must fit the scale's dtype; lm-ch: (max - centre) a float16 half-range
  const float max_abs = (f.kind == kInteger) ? (f.scale_bytes == 2 ? kFp16Max : std::numeric_limits<float>::max()) / 2
                        : (f.kind == kLloyd && f.channel) ? kFp16Max / 2
                                                          : kFp16Max;
  std::vector<float> rotated;
  const float* x = x_in;
  if (f.rotate) {  // the range check applies after rotation, as in the reference
    rotated.assign(x_in, x_in + n * d);
    for (int64_t t = 0; t < n; ++t) rotate_row(rotated.data() + t * d, d);
    x = rotated.data();
  }
  for (int64_t i = 0; i < n * d; ++i) {
    if (std::fabs(x[i]) > max_abs)
      return fail(error, f.name + ": |x| exceeds what its scales can represent");
  }
  if (f.kind == kFp16) {
    for (int64_t t = 0; t < n; ++t) {
      uint8_t* dst = parts[0] + (row0 + t) * d * 2;
      for (int64_t c = 0; c < d; ++c) {
        uint16_t b = half_bits(x[t * d + c]);
        std::memcpy(dst + 2 * c, &b, 2);
      }
    }
    return true;
  }
  std::vector<uint8_t> codes(d);
  if (f.kind == kFp8) {  // s = amax / 448 rounded up to float16; bytes of clamp(x / s, +-448)
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d;
      float m = 0.0f;
      for (int64_t c = 0; c < d; ++c) m = std::fmax(m, std::fabs(row[c]));
      const float s = store_scale(parts[1] + (row0 + t) * 2, m / 448.0f, 2);
      uint8_t* dst = parts[0] + (row0 + t) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = e4m3_byte(std::fmin(std::fmax(row[c] / s, -448.0f), 448.0f));
    }
    return true;
  }
  if (f.kind == kNf4) {
    const int64_t groups = d / f.group;
    std::vector<float> absmax(groups), scales(groups);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d;
      for (int64_t g = 0; g < groups; ++g) {
        float m = 0.0f;
        for (int64_t c = 0; c < f.group; ++c) m = std::fmax(m, std::fabs(row[g * f.group + c]));
        absmax[g] = m;
      }
      if (f.double_quant) {
        float top = 0.0f;
        for (float m : absmax) top = std::fmax(top, m);
        uint8_t* super_dst = parts[2] + (row0 + t) * 2;
        float super = store_scale(super_dst, top, 2);
        for (int64_t g = 0; g < groups; ++g) {
          float code = std::ceil(absmax[g] / super * 255.0f);
          code = std::fmin(std::fmax(code, 1.0f), 255.0f);
          parts[1][(row0 + t) * groups + g] = uint8_t(code);
          scales[g] = super * code / 255.0f;
        }
      } else {
        for (int64_t g = 0; g < groups; ++g) scales[g] = store_scale(parts[1] + ((row0 + t) * groups + g) * 2, absmax[g], 2);
      }
      for (int64_t c = 0; c < d; ++c) {
        float y = row[c] / scales[c / f.group];
        int best = 0;
        float best_err = std::fabs(y - kNf4Codebook[0]);
        for (int k = 1; k < 16; ++k) {
          float e = std::fabs(y - kNf4Codebook[k]);
          if (e < best_err) best = k, best_err = e;
        }
        codes[c] = uint8_t(best);
      }
      pack_row(codes.data(), d, 4, parts[0] + (row0 + t) * f.parts[0].width);
    }
    return true;
  }
  auto nearest_level = [&](float y) -> uint8_t {  // the first of equal distances, as torch's argmin
    int best = 0;
    float best_err = std::fabs(y - lloyd_level(f.levels, 0));
    for (int k = 1; k < (1 << f.bits); ++k) {
      const float e = std::fabs(y - lloyd_level(f.levels, k));
      if (e < best_err) best = k, best_err = e;
    }
    return uint8_t(best);
  };
  if (f.kind == kLloyd && f.channel) {  // per channel per block of G positions: centre m, half-range h, y = (x - m) / h
    const int64_t G = f.group;
    std::vector<float> centres(d), scales(d);
    for (int64_t b0 = 0; b0 < n; b0 += G) {
      const int64_t prow = (row0 + b0) / G;
      for (int64_t c = 0; c < d; ++c) {
        float lo = x[b0 * d + c], hi = lo;
        for (int64_t t = 1; t < G; ++t) lo = std::fmin(lo, x[(b0 + t) * d + c]), hi = std::fmax(hi, x[(b0 + t) * d + c]);
        centres[c] = store_param(parts[2] + (prow * d + c) * 2, (lo + hi) / 2.0f, 2, false);
        scales[c] = store_scale(parts[1] + (prow * d + c) * 2, hi - centres[c], 2);
      }
      for (int64_t t = 0; t < G; ++t) {
        for (int64_t c = 0; c < d; ++c) codes[c] = nearest_level((x[(b0 + t) * d + c] - centres[c]) / scales[c]);
        pack_row(codes.data(), d, f.bits, parts[0] + (row0 + b0 + t) * f.parts[0].width);
      }
    }
    return true;
  }
  if (f.kind == kLloyd) {  // per group an absmax scale (float16, rounded up), the nearest level of y = x / s
    const int64_t groups = d / f.group;
    std::vector<float> scales(groups);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d;
      for (int64_t g = 0; g < groups; ++g) {
        float m = 0.0f;
        for (int64_t c = 0; c < f.group; ++c) m = std::fmax(m, std::fabs(row[g * f.group + c]));
        scales[g] = store_scale(parts[1] + ((row0 + t) * groups + g) * 2, m, 2);
      }
      for (int64_t c = 0; c < d; ++c) codes[c] = nearest_level(row[c] / scales[c / f.group]);
      pack_row(codes.data(), d, f.bits, parts[0] + (row0 + t) * f.parts[0].width);
    }
    return true;
  }
  // integer
  const float levels = float(f.levels);
  const int sb = f.scale_bytes;
  auto code_of = [&](float v, float zero, float scale) -> uint8_t {
    if (f.symmetric) {
      float q = std::nearbyint(v / scale);
      q = std::fmin(std::fmax(q, -levels), levels);
      return uint8_t(q + levels);
    }
    float q = std::nearbyint((v - zero) / scale);
    return uint8_t(std::fmin(std::fmax(q, 0.0f), levels));
  };
  if (!f.channel) {
    const int64_t groups = d / f.group;
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d;
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = row + g * f.group;
        uint8_t* scale_dst = parts[1] + ((row0 + t) * groups + g) * sb;
        float zero = 0.0f, scale;
        if (f.symmetric) {
          float m = 0.0f;
          for (int64_t c = 0; c < f.group; ++c) m = std::fmax(m, std::fabs(v[c]));
          scale = store_scale(scale_dst, m / levels, sb);
        } else {
          float lo = v[0], hi = v[0];
          for (int64_t c = 1; c < f.group; ++c) lo = std::fmin(lo, v[c]), hi = std::fmax(hi, v[c]);
          zero = store_param(parts[2] + ((row0 + t) * groups + g) * sb, lo, sb, false);
          scale = store_scale(scale_dst, (hi - zero) / levels, sb);
        }
        for (int64_t c = 0; c < f.group; ++c) codes[g * f.group + c] = code_of(v[c], zero, scale);
      }
      pack_row(codes.data(), d, f.bits, parts[0] + (row0 + t) * f.parts[0].width);
    }
    return true;
  }
  // per channel: blocks of G positions, one scale (and zero) per channel per block
  const int64_t G = f.group;
  std::vector<float> zeros(d), scales(d);
  std::vector<uint8_t> block_codes(G * d);
  for (int64_t b0 = 0; b0 < n; b0 += G) {
    const int64_t prow = (row0 + b0) / G;
    for (int64_t c = 0; c < d; ++c) {
      if (f.symmetric) {
        float m = 0.0f;
        for (int64_t t = 0; t < G; ++t) m = std::fmax(m, std::fabs(x[(b0 + t) * d + c]));
        scales[c] = store_scale(parts[1] + (prow * d + c) * sb, m / levels, sb);
      } else {
        float lo = x[b0 * d + c], hi = lo;
        for (int64_t t = 1; t < G; ++t) {
          float v = x[(b0 + t) * d + c];
          lo = std::fmin(lo, v), hi = std::fmax(hi, v);
        }
        zeros[c] = store_param(parts[2] + (prow * d + c) * sb, lo, sb, false);
        scales[c] = store_scale(parts[1] + (prow * d + c) * sb, (hi - zeros[c]) / levels, sb);
      }
    }
    for (int64_t t = 0; t < G; ++t) {
      for (int64_t c = 0; c < d; ++c) codes[c] = code_of(x[(b0 + t) * d + c], zeros[c], scales[c]);
      pack_row(codes.data(), d, f.bits, parts[0] + (row0 + b0 + t) * f.parts[0].width);
    }
  }
  return true;
}

void unpack_codes(const Format& f, const ConstPartPtrs& parts, int64_t row0, int64_t n, float* out) {
  const int64_t d = f.head_dim, code_bytes = f.parts[0].width;
  for (int64_t t = 0; t < n; ++t) unpack_row_float(parts[0] + (row0 + t) * code_bytes, d, f.bits, out + t * d);
}

void load_params(const Format& f, const ConstPartPtrs& parts, int64_t prow, float* scale, float* offset) {
  const int64_t width = f.channel ? f.head_dim : f.head_dim / f.group;
  const int sb = f.scale_bytes;
  for (int64_t g = 0; g < width; ++g) {
    scale[g] = load_param(parts[1] + (prow * width + g) * sb, sb);
    offset[g] = f.symmetric ? -float(f.levels) * scale[g] : load_param(parts[2] + (prow * width + g) * sb, sb);
  }
}

void dequantize_rows(const Format& f, const ConstPartPtrs& parts, int64_t row0, int64_t n, float* out, bool rotated) {
  // Parameters are converted to float once per row (per-token groups) or once per block of
  // positions (per-channel groups) into per-channel arrays, so that the inner loops are plain
  // elementwise float32 arithmetic (vectorized, and the same operations as the reference).
  const int64_t d = f.head_dim;
  if (f.kind == kFp16) {
    const _Float16* src = reinterpret_cast<const _Float16*>(parts[0]) + row0 * d;
    for (int64_t i = 0; i < n * d; ++i) out[i] = static_cast<float>(src[i]);
    return;
  }
  uint8_t codes[4096];
  float scale[4096], zero[4096], code[4096];
  const int64_t code_bytes = f.parts[0].width;
  if (f.kind == kNf4) {
    const int64_t groups = d / f.group;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = row0 + t;
      if (f.double_quant) {
        const float super = load_param(parts[2] + r * 2, 2);
        for (int64_t g = 0; g < groups; ++g) {
          const float s = super * float(parts[1][r * groups + g]) / 255.0f;
          for (int64_t c = 0; c < f.group; ++c) scale[g * f.group + c] = s;
        }
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          const float s = load_param(parts[1] + (r * groups + g) * 2, 2);
          for (int64_t c = 0; c < f.group; ++c) scale[g * f.group + c] = s;
        }
      }
      unpack_row(parts[0] + r * code_bytes, d, 4, codes);
      float* o = out + t * d;
      for (int64_t c = 0; c < d; ++c) o[c] = kNf4Codebook[codes[c]] * scale[c];
      (void)code;
    }
    return;
  }
  if (f.kind == kFp8) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = row0 + t;
      const float s = load_param(parts[1] + r * 2, 2);
      const uint8_t* src = parts[0] + r * d;
      for (int64_t c = 0; c < d; ++c) out[t * d + c] = e4m3_value(src[c]) * s;
    }
    return;
  }
  if (f.kind == kLloyd && f.channel) {  // x = centre + level * half-range, parameters loaded once per block
    float book[16];
    for (int k = 0; k < (1 << f.bits); ++k) book[k] = lloyd_level(f.levels, k);
    int64_t loaded = -1;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = row0 + t, prow = r / f.group;
      if (prow != loaded) {
        for (int64_t c = 0; c < d; ++c)
          scale[c] = load_param(parts[1] + (prow * d + c) * 2, 2), zero[c] = load_param(parts[2] + (prow * d + c) * 2, 2);
        loaded = prow;
      }
      unpack_row(parts[0] + r * code_bytes, d, f.bits, codes);
      float* o = out + t * d;
      for (int64_t c = 0; c < d; ++c) o[c] = zero[c] + book[codes[c]] * scale[c];
    }
    return;
  }
  if (f.kind == kLloyd) {
    const int64_t groups = d / f.group;
    float book[16];
    for (int k = 0; k < (1 << f.bits); ++k) book[k] = lloyd_level(f.levels, k);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = row0 + t;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = load_param(parts[1] + (r * groups + g) * 2, 2);
        for (int64_t c = 0; c < f.group; ++c) scale[g * f.group + c] = s;
      }
      unpack_row(parts[0] + r * code_bytes, d, f.bits, codes);
      float* o = out + t * d;
      for (int64_t c = 0; c < d; ++c) o[c] = book[codes[c]] * scale[c];
      if (f.rotate && !rotated) rotate_row(o, d);
    }
    return;
  }
  const int sb = f.scale_bytes;
  const float levels = float(f.levels);
  int64_t loaded = -1;  // the parameter row now in scale / zero
  for (int64_t t = 0; t < n; ++t) {
    const int64_t r = row0 + t;
    const int64_t prow = f.channel ? r / f.group : r;
    if (prow != loaded) {
      const int64_t width = f.channel ? d : d / f.group;
      const uint8_t* scale_row = parts[1] + prow * width * sb;
      const uint8_t* zero_row = f.symmetric ? nullptr : parts[2] + prow * width * sb;
      if (f.channel) {
        for (int64_t c = 0; c < d; ++c) scale[c] = load_param(scale_row + c * sb, sb);
        if (zero_row)
          for (int64_t c = 0; c < d; ++c) zero[c] = load_param(zero_row + c * sb, sb);
      } else {
        for (int64_t g = 0; g < width; ++g) {
          const float s = load_param(scale_row + g * sb, sb), z = zero_row ? load_param(zero_row + g * sb, sb) : 0.0f;
          for (int64_t c = 0; c < f.group; ++c) scale[g * f.group + c] = s, zero[g * f.group + c] = z;
        }
      }
      loaded = prow;
    }
    unpack_row_float(parts[0] + r * code_bytes, d, f.bits, code);
    float* o = out + t * d;
    if (f.symmetric) {
      for (int64_t c = 0; c < d; ++c) o[c] = (code[c] - levels) * scale[c];
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = zero[c] + code[c] * scale[c];
    }
    if (f.rotate && !rotated) rotate_row(o, d);
  }
}

}  // namespace kvc
