// Storage formats of the native CPU library: parse a scheme name, quantize and de-quantize rows.
//
// The torch reference of each family (kvcompile/quant/*.py) defines the formats; this file
// reproduces it operation for operation in float32, so that quantize_rows writes the same bits
// and dequantize_rows the same floats (tests/unit/test_native.py checks both on adversarial data).
// Compile it with -ffp-contract=off: a fused multiply-add would round differently from torch's
// separate multiply and add.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvc {

enum Kind : int { kFp16 = 0, kInteger = 1, kNf4 = 2, kLloyd = 3, kFp8 = 4 };

// One stored part: [rows / rows_per, width] elements of `bytes` bytes (1: int8, 2: float16, 4: float32).
struct PartSpec {
  std::string name;
  int bytes;
  int64_t width;
  int64_t rows_per;
  int64_t row_bytes() const { return width * bytes; }
};

// A scheme's descriptor; the fields after `name` are those of kvcompile.quant.base.NATIVE_FIELDS.
struct Format {
  std::string name;
  int kind = kFp16, bits = 16, group = 1, channel = 0, symmetric = 0, scale_bytes = 0, rotate = 0, double_quant = 0;
  int64_t head_dim = 0;
  int levels = 0;           // integer codes in [0, levels] (asymmetric) or [-levels, levels] (symmetric);
                            // Lloyd-Max formats: the codebook's index in lloyd_codebooks.h
  int64_t token_group = 1;  // positions quantized together (the group size for per-channel formats)
  std::vector<PartSpec> parts;
};

// Parse a canonical scheme name for vectors of head_dim; false (with a one-line reason) if the
// library cannot store it.
bool parse_format(const std::string& name, int64_t head_dim, Format* out, std::string* error);

// Part base pointers of one (batch, head) slice, in the order of Format::parts; row 0 of each.
using PartPtrs = std::vector<uint8_t*>;
using ConstPartPtrs = std::vector<const uint8_t*>;

// Quantize x [n][D] (float32) into the parts at positions [row0, row0 + n); for per-channel
// formats n and row0 are multiples of the group.  Returns false, with a reason, if x holds NaN
// or inf or values the format's parameters cannot represent (as the reference raises).
bool quantize_rows(const Format& f, const float* x, int64_t n, const PartPtrs& parts, int64_t row0, std::string* error);

// De-quantize positions [row0, row0 + n) into out [n][D].  rotated == true leaves -rot formats in
// the rotated (storage) domain, x H; attention folds H into the query and the output instead.
void dequantize_rows(const Format& f, const ConstPartPtrs& parts, int64_t row0, int64_t n, float* out,
                     bool rotated = false);

// For attention over integer formats without materializing floats (attend in the code domain):
// the codes of positions [row0, row0 + n) as floats, out [n][D] (exact: small integers) ...
void unpack_codes(const Format& f, const ConstPartPtrs& parts, int64_t row0, int64_t n, float* out);
// ... and the parameters of parameter row `prow` (a position for per-token groups, a block of
// positions for per-channel ones) as floats: scale[w], offset[w] with w = D / G or D, such that
// x = offset + code * scale (offset = zero point, or -levels * scale for symmetric formats).
void load_params(const Format& f, const ConstPartPtrs& parts, int64_t prow, float* scale, float* offset);

// The orthonormal Hadamard rotation of one row of D (a power of two) floats, in place: the
// butterflies of kvcompile.quant.hadamard.rotate, then the float32 factor 1/sqrt(D).
void rotate_row(float* x, int64_t d);

// The 16 NF4 levels (kvcompile.quant.nf4.nf4_codebook, float32).
extern const float kNf4Codebook[16];

int64_t packed_length(int64_t n, int bits);

}  // namespace kvc
