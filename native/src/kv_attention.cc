// KVAttention: append new positions to the packed segments, then attend over them without a
// de-quantized copy of the cache.  See kv_attention.h and kvcompile/ops/attention.py.
//
// Append (per batch row and kv head, as kvcompile.kv.store.SegmentStore.append):
//   k        = clamp(n - P, 0, S) new positions are sinks
//   tier 0   = past recent ++ Q_recent(x[k:])
//   tier i+1 = past tier ++ Q_{i+1}(D_i(first m_{i+1} positions of tier i)), tier i loses them
// When the positions leaving a tier are all past rows (decode), the tier is written straight into
// its present output; otherwise (a prefill moving new positions on) it is assembled in a small
// scratch buffer first.  The bulk's past rows are always copied straight into the present output.
//
// Attention (per batch row, kv head, block of queries, chunk of positions; flash-style):
// positions are read in tiles of kTile rows, scored against the block's r * queries, and folded
// into an online softmax (running max m, sum l, accumulator a).  Integer formats are read in the
// code domain (the tile's codes as floats; scales and zero points folded into the query or the
// weights, see attend_chunk); other formats are de-quantized tile by tile.  Chunks of one query row are merged with the log-sum-exp rule
//   M = max_c m_c,  o = sum_c e^{m_c - M} a_c / sum_c e^{m_c - M} l_c.
// -rot formats are read in the rotated domain: q.k = (qH).(kH) and sum p v = (sum p vH) H, so the
// query is rotated once and a second accumulator is rotated once at the end.
#include "kv_attention.h"

#include "exp_nonpositive.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

namespace kvc {

namespace {

constexpr int64_t kTile = 32;

bool fail(std::string* error, const std::string& why) {
  if (error) *error = why;
  return false;
}

bool get_string(const Attributes& a, const std::string& name, std::string* out, std::string* error) {
  auto it = a.strings.find(name);
  if (it == a.strings.end()) return fail(error, "KVAttention: missing string attribute " + name);
  *out = it->second;
  return true;
}

bool get_int(const Attributes& a, const std::string& name, int64_t* out, std::string* error) {
  auto it = a.ints.find(name);
  if (it == a.ints.end()) return fail(error, "KVAttention: missing int attribute " + name);
  *out = it->second;
  return true;
}

// "scheme:window,..." -> [(scheme, window)]
bool parse_age_tiers(const std::string& text, std::vector<std::pair<std::string, int64_t>>* out, std::string* error) {
  out->clear();
  if (text.empty()) return true;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(start, end - start);
    size_t colon = item.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == item.size())
      return fail(error, "KVAttention: age_tiers must be 'scheme:window,...', got '" + text + "'");
    int64_t window = 0;
    for (size_t i = colon + 1; i < item.size(); ++i) {
      if (item[i] < '0' || item[i] > '9' || window > (int64_t(1) << 40))
        return fail(error, "KVAttention: age_tiers must be 'scheme:window,...', got '" + text + "'");
      window = window * 10 + (item[i] - '0');
    }
    if (window < 1) return fail(error, "KVAttention: age tier windows must be >= 1, got '" + text + "'");
    out->emplace_back(item.substr(0, colon), window);
    if (end == text.size()) break;
    start = end + 1;
  }
  return true;
}

bool parse_stream(const Attributes& a, const std::string& stream, int64_t sink_tokens, int64_t window, int64_t d,
                  StreamSpec* out, std::string* error) {
  std::string sink, recent, bulk, ages_text;
  if (!get_string(a, stream + "_sink_scheme", &sink, error) || !get_string(a, stream + "_recent_scheme", &recent, error) ||
      !get_string(a, stream + "_bulk_scheme", &bulk, error) || !get_string(a, stream + "_age_tiers", &ages_text, error))
    return false;
  std::vector<std::pair<std::string, int64_t>> ages;
  if (!parse_age_tiers(ages_text, &ages, error)) return false;
  if (ages.size() > 6) return fail(error, "KVAttention: at most 6 age tiers, got " + std::to_string(ages.size()));
  StreamSpec s;
  if (!parse_format(sink, d, &s.sink, error)) return false;
  std::vector<std::string> names{recent};
  for (auto& [name, w] : ages) names.push_back(name);
  names.push_back(bulk);
  for (auto& name : names) {
    Format f;
    if (!parse_format(name, d, &f, error)) return false;
    s.tiers.push_back(f);
  }
  if (s.sink.token_group != 1 || s.tiers[0].token_group != 1)
    return fail(error, "KVAttention: sink and recent schemes must store single positions, got " + sink + " and " + recent);
  s.rule.sink_tokens = sink_tokens;
  s.rule.recent_window = window;
  s.rule.token_group = s.tiers.back().token_group;
  for (size_t i = 0; i < ages.size(); ++i) s.rule.ages.emplace_back(ages[i].second, s.tiers[i + 1].token_group);
  if (sink_tokens > 0) s.segments.push_back(-1);
  for (int t = int(s.tiers.size()) - 1; t >= 0; --t) s.segments.push_back(t);
  *out = s;
  return true;
}

// The part pointers of one (batch row, kv head) slice of a segment of `length` positions, given
// the part tensors' base pointers ([B*H, rows, width] each).
template <typename T>
std::vector<T*> slice_parts(const Format& f, const std::vector<T*>& bases, int64_t length, int64_t bh) {
  std::vector<T*> out;
  for (size_t p = 0; p < f.parts.size(); ++p)
    out.push_back(bases[p] + bh * (length / f.parts[p].rows_per) * f.parts[p].row_bytes());
  return out;
}

struct Segment {  // one segment of one stream, for one (batch row, kv head)
  const Format* format;
  ConstPartPtrs parts;
  int64_t start, length;
};

// For each stream: the per-(b, h) part pointers of every present segment.
struct StreamBuffers {
  const StreamSpec* spec;
  std::vector<std::vector<uint8_t*>> parts;  // [segment][part] base pointers of the present outputs
  std::vector<int64_t> lengths;               // present positions per segment
  std::vector<std::vector<const uint8_t*>> past_parts;
  std::vector<int64_t> past_lengths;

  std::vector<Segment> slice(int64_t bh) const {
    std::vector<Segment> out;
    int64_t start = 0;
    for (size_t s = 0; s < lengths.size(); ++s) {
      const Format& f = spec->format(spec->segments[s]);
      const PartPtrs ptrs = slice_parts(f, parts[s], lengths[s], bh);
      out.push_back({&f, ConstPartPtrs(ptrs.begin(), ptrs.end()), start, lengths[s]});
      start += lengths[s];
    }
    return out;
  }
};

// A growable packed segment (the scratch of one tier for one (b, h)).
struct Packed {
  const Format* format;
  std::vector<std::vector<uint8_t>> bytes;
  int64_t rows = 0;

  explicit Packed(const Format* f, int64_t capacity) : format(f), bytes(f->parts.size()) {
    for (size_t p = 0; p < f->parts.size(); ++p)
      bytes[p].resize((capacity / f->parts[p].rows_per + 1) * f->parts[p].row_bytes());
  }
  PartPtrs ptrs() {
    PartPtrs out;
    for (auto& b : bytes) out.push_back(b.data());
    return out;
  }
  ConstPartPtrs cptrs() const {
    ConstPartPtrs out;
    for (auto& b : bytes) out.push_back(b.data());
    return out;
  }
};

void copy_rows(const Format& f, const ConstPartPtrs& src, int64_t src_row, const PartPtrs& dst, int64_t dst_row,
               int64_t n) {
  for (size_t p = 0; p < f.parts.size(); ++p) {
    const PartSpec& ps = f.parts[p];
    std::memcpy(dst[p] + dst_row / ps.rows_per * ps.row_bytes(), src[p] + src_row / ps.rows_per * ps.row_bytes(),
                n / ps.rows_per * ps.row_bytes());
  }
}

// SegmentStore.append for one (b, h): x [S, D] are positions P .. P+S-1.
bool append_slice(const StreamBuffers& sb, int64_t bh, const float* x, int64_t past, int64_t added, std::string* error) {
  const StreamSpec& spec = *sb.spec;
  const int64_t d = spec.sink.head_dim;
  const int tiers = int(spec.tiers.size());
  auto seg_index = [&](int cls) { return int(std::find(spec.segments.begin(), spec.segments.end(), cls) - spec.segments.begin()); };
  auto past_ptrs = [&](int s) {
    return slice_parts(spec.format(spec.segments[s]), sb.past_parts[s], sb.past_lengths[s], bh);
  };
  auto present_ptrs = [&](int s) { return slice_parts(spec.format(spec.segments[s]), sb.parts[s], sb.lengths[s], bh); };
  const int64_t k = spec.rule.new_sinks(past, added);
  if (spec.rule.sink_tokens > 0) {
    int s = seg_index(-1);
    copy_rows(spec.sink, past_ptrs(s), 0, present_ptrs(s), 0, sb.past_lengths[s]);
    if (k && !quantize_rows(spec.sink, x, k, present_ptrs(s), sb.past_lengths[s], error)) return false;
  }
  const std::vector<int64_t> moves = spec.rule.moves(past, added);
  std::vector<float> incoming(x + k * d, x + added * d);  // float states entering the current tier
  int64_t n_in = added - k;
  for (int t = 0; t < tiers; ++t) {
    const int s = seg_index(t);
    const Format& f = spec.tiers[t];
    const int64_t past_rows = sb.past_lengths[s];
    if (t == tiers - 1) {  // the bulk: past rows, then what arrives, straight into the output
      if (past_rows + n_in != sb.lengths[s]) return fail(error, "KVAttention: internal segment count mismatch");
      copy_rows(f, past_ptrs(s), 0, present_ptrs(s), 0, past_rows);
      if (n_in && !quantize_rows(f, incoming.data(), n_in, present_ptrs(s), past_rows, error)) return false;
      break;
    }
    const int64_t leaving = moves[t];
    if (past_rows + n_in - leaving != sb.lengths[s]) return fail(error, "KVAttention: internal segment count mismatch");
    if (leaving <= past_rows) {  // decode: the positions that leave are all past rows; no scratch copy
      const ConstPartPtrs past_parts = past_ptrs(s);
      std::vector<float> leaving_states(leaving * d);
      if (leaving) dequantize_rows(f, past_parts, 0, leaving, leaving_states.data());
      copy_rows(f, past_parts, leaving, present_ptrs(s), 0, past_rows - leaving);
      if (n_in && !quantize_rows(f, incoming.data(), n_in, present_ptrs(s), past_rows - leaving, error)) return false;
      incoming.swap(leaving_states);
      n_in = leaving;
      continue;
    }
    Packed tier(&f, past_rows + n_in);
    copy_rows(f, past_ptrs(s), 0, tier.ptrs(), 0, past_rows);
    if (n_in && !quantize_rows(f, incoming.data(), n_in, tier.ptrs(), past_rows, error)) return false;
    tier.rows = past_rows + n_in;
    incoming.assign(leaving * d, 0.0f);
    if (leaving) dequantize_rows(f, tier.cptrs(), 0, leaving, incoming.data());
    n_in = leaving;
    copy_rows(f, tier.cptrs(), leaving, present_ptrs(s), 0, tier.rows - leaving);
  }
  return true;
}

// Whether attention reads a format in the code domain (integer codes, parameters applied to the
// query or the weights): no rotation, and for values per-token groups of a multiple of 16 channels
// (the accumulator is blocked by 16 lanes) of at most 256 groups.
bool code_domain(const Format& f, bool values) {
  if (f.kind != kInteger || f.rotate || f.head_dim % 16) return false;
  if (values) return !f.channel && f.group % 16 == 0 && f.head_dim / f.group <= 256;
  return f.channel || f.head_dim / f.group <= 4096;
}

// out[0..16) += sum_t w[t * w_stride] * rows[t * row_stride + 0..16), for t < n: four sets of 16
// lanes (positions t mod 4) so that the multiply-adds form four independent chains.
inline void accumulate16(float* out, const float* rows, int64_t row_stride, const float* w, int64_t w_stride,
                         int64_t n) {
  float lanes[4][16] = {};
  int64_t t = 0;
  for (; t + 3 < n; t += 4) {
    for (int u = 0; u < 4; ++u) {
      const float wu = w[(t + u) * w_stride];
      const float* row = rows + (t + u) * row_stride;
#pragma omp simd
      for (int j = 0; j < 16; ++j) lanes[u][j] += wu * row[j];
    }
  }
  for (; t < n; ++t) {
    const float wt = w[t * w_stride];
    const float* row = rows + t * row_stride;
#pragma omp simd
    for (int j = 0; j < 16; ++j) lanes[0][j] += wt * row[j];
  }
#pragma omp simd
  for (int j = 0; j < 16; ++j) out[j] += (lanes[0][j] + lanes[1][j]) + (lanes[2][j] + lanes[3][j]);
}

struct Query {  // the r * qb query rows of one work item
  std::vector<float> plain, rotated;  // [rows][D], scaled by the softmax scale
};

// Attention of query rows [s0, s1) of all r heads over positions [c0, c1) of one (b, h): writes
// (m, l, acc[D], acc_rot[D]) per row into `partial`.
// window W > 0: query s reads only positions j > past + s - W (a sliding-window layer).
void attend_chunk(const std::vector<Segment>& keys, const std::vector<Segment>& values, const std::vector<int64_t>& cuts,
                  const Query& q, int64_t rows, int64_t r, int64_t s0, int64_t past, int64_t c0, int64_t c1, int64_t d,
                  bool rot_values, int64_t window, float* partial) {
  const int64_t stride = 2 + 2 * d;
  for (int64_t i = 0; i < rows; ++i) {
    float* p = partial + i * stride;
    p[0] = -std::numeric_limits<float>::infinity();
    p[1] = 0.0f;
    std::fill(p + 2, p + stride, 0.0f);
  }
  const int64_t last_query = s0 + rows / r - 1;
  c1 = std::min(c1, past + last_query + 1);  // causal: nothing beyond the last query's position
  if (window > 0) c0 = std::max(c0, past + s0 - window + 1);  // nothing before the first query's window
  float kt[kTile * 64], vt[kTile * 64];  // one tile of keys / values for D <= 64; a heap buffer beyond
  std::vector<float> kbuf, vbuf;
  float* kp = kt;
  float* vp = vt;
  if (kTile * d > int64_t(sizeof(kt) / sizeof(float))) {
    kbuf.resize(kTile * d), vbuf.resize(kTile * d);
    kp = kbuf.data(), vp = vbuf.data();
  }
  float scores[kTile];
  float kscale[4096], koffset[4096];
  // per-row parameters of one tile (at most D per row) and the transposed key codes; every element
  // is written before it is read, so the buffer is not cleared
  std::unique_ptr<float[]> tile_params(new float[5 * kTile * d]);
  float* kt_t = tile_params.get() + 4 * kTile * d;
  std::unique_ptr<uint8_t[]> bytes_t(new uint8_t[kTile * d]);  // a tile's packed key bytes, transposed
  float* ktile_scale = tile_params.get();
  float* ktile_offset = ktile_scale + kTile * d;
  float* vtile_scale = ktile_offset + kTile * d;
  float* vtile_offset = vtile_scale + kTile * d;
  size_t ks = 0, vs = 0;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    const int64_t a = std::max(cuts[c], c0), b = std::min(cuts[c + 1], c1);
    if (a >= b) continue;
    while (keys[ks].start + keys[ks].length <= a) ++ks;
    while (values[vs].start + values[vs].length <= a) ++vs;
    const Segment& kseg = keys[ks];
    const Segment& vseg = values[vs];
    const bool krot = kseg.format->rotate, vrot = vseg.format->rotate;
    // integer formats are read in the code domain (see code_domain_keys / _values)
    const bool kcodes = code_domain(*kseg.format, false), vcodes = code_domain(*vseg.format, true);
    for (int64_t t0 = a; t0 < b;) {
      int64_t n = std::min(kTile, b - t0);
      const Format& kf = *kseg.format;
      if (kcodes && kf.channel) n = std::min(n, kf.group - (t0 - kseg.start) % kf.group);  // one block per tile
      if (kcodes) {
        load_params(kf, kseg.parts, kf.channel ? (t0 - kseg.start) / kf.group : 0, kscale, koffset);
        const int64_t code_bytes = kf.parts[0].width;
        if (kf.channel && 8 % kf.bits == 0) {
          // kt_t [D][kTile]: the tile's codes transposed (rows past n are zero), unpacked from the
          // transposed bytes so that positions are the vector lanes
          const uint8_t* rows = kseg.parts[0] + (t0 - kseg.start) * code_bytes;
          for (int64_t t = 0; t < kTile; ++t)
            for (int64_t i = 0; i < code_bytes; ++i) bytes_t[i * kTile + t] = t < n ? rows[t * code_bytes + i] : 0;
          const int per = 8 / kf.bits, mask = (1 << kf.bits) - 1;
          for (int64_t i = 0; i < code_bytes; ++i) {
            const uint8_t* src = bytes_t.get() + i * kTile;
            for (int k = 0; k < per; ++k) {
              float* dst = kt_t + (i * per + k) * kTile;
              const int shift = k * kf.bits;
#pragma omp simd
              for (int64_t t = 0; t < kTile; ++t) dst[t] = float((src[t] >> shift) & mask);
            }
          }
        } else {
          unpack_codes(kf, kseg.parts, t0 - kseg.start, n, kp);
          if (kf.channel) {  // kt_t [D][kTile]: the tile's codes transposed (rows past n are zero)
            for (int64_t t = 0; t < kTile; ++t)
              for (int64_t e = 0; e < d; ++e) kt_t[e * kTile + t] = t < n ? kp[t * d + e] : 0.0f;
          }
        }
      } else {
        dequantize_rows(kf, kseg.parts, t0 - kseg.start, n, kp, true);
      }
      if (vcodes) {
        unpack_codes(*vseg.format, vseg.parts, t0 - vseg.start, n, vp);
        const int64_t groups = d / vseg.format->group;
        for (int64_t t = 0; t < n; ++t)
          load_params(*vseg.format, vseg.parts, t0 - vseg.start + t, vtile_scale + t * groups, vtile_offset + t * groups);
      } else {
        dequantize_rows(*vseg.format, vseg.parts, t0 - vseg.start, n, vp, true);
      }
      if (kcodes && !kf.channel) {
        const int64_t groups = d / kf.group;
        for (int64_t t = 0; t < n; ++t)
          load_params(kf, kseg.parts, t0 - kseg.start + t, ktile_scale + t * groups, ktile_offset + t * groups);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t s = s0 + i / r;
        const int64_t visible = std::min(n, past + s + 1 - t0);
        // positions [first, visible) of the tile are in query s's window
        const int64_t first = window > 0 ? std::max<int64_t>(0, past + s - window + 1 - t0) : 0;
        if (visible <= first) continue;
        const float* qv = (krot ? q.rotated.data() : q.plain.data()) + i * d;
        float top = -std::numeric_limits<float>::infinity();
        if (kcodes && kf.channel) {  // q.k = sum_d q_d z_d + sum_d (q_d s_d) c_d: one scale row per tile
          float qs[4096];
          float bias = 0.0f;
          for (int64_t e = 0; e < d; ++e) qs[e] = qv[e] * kscale[e], bias += qv[e] * koffset[e];
          // over the transposed tile, so that positions are the vector lanes (no horizontal sums)
          // four partial sums over channels e mod 4: independent chains of fused multiply-adds
          float part[4][kTile] = {};
          for (int64_t e = 0; e + 3 < d; e += 4) {
            for (int u = 0; u < 4; ++u) {
              const float qe = qs[e + u];
              const float* column = kt_t + (e + u) * kTile;
#pragma omp simd
              for (int64_t t = 0; t < kTile; ++t) part[u][t] += qe * column[t];
            }
          }
#pragma omp simd
          for (int64_t t = 0; t < kTile; ++t) scores[t] = bias + ((part[0][t] + part[1][t]) + (part[2][t] + part[3][t]));
        } else if (kcodes) {  // per-token groups: parameters per row
          const int64_t groups = d / kf.group;
          float q_sums[4096];
          for (int64_t g = 0; g < groups; ++g) {
            float q_sum = 0.0f;
            for (int64_t e = g * kf.group; e < (g + 1) * kf.group; ++e) q_sum += qv[e];
            q_sums[g] = q_sum;
          }
          for (int64_t t = 0; t < visible; ++t) {
            const float* kr = kp + t * d;
            float dot = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
              float codes_dot = 0.0f;
#pragma omp simd reduction(+ : codes_dot)
              for (int64_t e = g * kf.group; e < (g + 1) * kf.group; ++e) codes_dot += qv[e] * kr[e];
              dot += ktile_scale[t * groups + g] * codes_dot + ktile_offset[t * groups + g] * q_sums[g];
            }
            scores[t] = dot;
          }
        } else {
          for (int64_t t = 0; t < visible; ++t) {
            const float* kr = kp + t * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < d; ++e) dot += qv[e] * kr[e];
            scores[t] = dot;
          }
        }
        for (int64_t t = 0; t < first; ++t) scores[t] = -std::numeric_limits<float>::infinity();  // weight 0
        for (int64_t t = first; t < visible; ++t) top = std::max(top, scores[t]);
        float* p = partial + i * stride;
        const float m_new = std::max(p[0], top);
        const float alpha = std::exp(p[0] - m_new);  // 0 on the first tile (m = -inf)
        float* acc = p + 2;
        float* acc_rot = p + 2 + d;
        if (alpha != 1.0f) {
          for (int64_t e = 0; e < d; ++e) acc[e] *= alpha;
          if (rot_values)
            for (int64_t e = 0; e < d; ++e) acc_rot[e] *= alpha;
        }
        float weights[kTile];
#pragma omp simd
        for (int64_t t = 0; t < visible; ++t) weights[t] = exp_nonpositive(scores[t] - m_new);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < visible; ++t) sum += weights[t];
        float* target = vrot ? acc_rot : acc;
        if (vcodes) {  // v = offset_g + scale_g c: sum_t w_t v_t = sum_t (w_t scale_tg) c_t + sum_t w_t offset_tg
          const Format& vf = *vseg.format;
          const int64_t groups = d / vf.group;
          float coef[kTile * 256], offsets[256] = {0.0f};
          for (int64_t t = 0; t < visible; ++t) {
            for (int64_t g = 0; g < groups; ++g) {
              coef[t * groups + g] = weights[t] * vtile_scale[t * groups + g];
              offsets[g] += weights[t] * vtile_offset[t * groups + g];
            }
          }
          for (int64_t e0 = 0; e0 < d; e0 += 16) {
            const int64_t g = e0 / vf.group;
            accumulate16(target + e0, vp + e0, d, coef + g, groups, visible);
#pragma omp simd
            for (int j = 0; j < 16; ++j) target[e0 + j] += offsets[g];
          }
        } else if (d % 16 == 0) {  // 16 accumulator lanes stay in a register across the tile's rows
          for (int64_t e0 = 0; e0 < d; e0 += 16) accumulate16(target + e0, vp + e0, d, weights, 1, visible);
        } else {
          for (int64_t t = 0; t < visible; ++t) {
            const float w = weights[t];
            const float* vr = vp + t * d;
            for (int64_t e = 0; e < d; ++e) target[e] += w * vr[e];
          }
        }
        p[1] = p[1] * alpha + sum;
        p[0] = m_new;
      }
      t0 += n;
    }
  }
}


// Runs fn(i) for i < n on this thread when the job is small (a dispatch to the pool costs more
// than it does), else through parallel_for; `work` estimates the job's cost.
void run_small_here(const ParallelFor& parallel_for, size_t n, int64_t work, const std::function<void(size_t)>& fn) {
  if (n < 2 || work < (int64_t(1) << 13)) {
    for (size_t i = 0; i < n; ++i) fn(i);
  } else {
    parallel_for(n, fn);
  }
}

struct AttendShape {
  int64_t B, H, S, P, d, r;  // batch, kv heads, new positions, positions stored before them, head dim, GQA ratio
  float scale;
  int64_t window;            // > 0: a sliding window (query s reads positions j > P + s - W)
  bool rot_keys, rot_values;
};

// The segments attention reads for one (b, h): keys and values, storage order, starts and lengths
// covering positions [0, P + S).
using SegmentsOf = std::function<void(int64_t bh, std::vector<Segment>* keys, std::vector<Segment>* values)>;

// Attention of every query row, written to output [B, H r, S, D]: per (b, h, query block, chunk of
// positions) an online softmax (attend_chunk), then the chunks of each row merged (log-sum-exp).
void attend_all(const AttendShape& a, const float* qx, float* output, const SegmentsOf& segments_of,
                const ParallelFor& parallel_for) {
  const int64_t B = a.B, H = a.H, S = a.S, P = a.P, L = a.P + a.S, d = a.d, r = a.r;
  const bool rot_keys = a.rot_keys, rot_values = a.rot_values;
  const int64_t qb = S <= 4 ? S : 16;
  const int64_t nq = (S + qb - 1) / qb;
  const int64_t chunk = S <= 4 ? std::max<int64_t>(256, (L + 63) / 64) : L;
  const int64_t nc = (L + chunk - 1) / chunk;
  const int64_t stride = 2 + 2 * d;
  const int64_t rows = r * qb;
  // every work item initializes its own rows of the partial results, so they are not cleared here
  std::unique_ptr<float[]> partial(new float[size_t(B * H * nq * nc * rows * stride)]);
  parallel_for(B * H * nq * nc, [&](size_t item) {
    const int64_t c = int64_t(item % nc), qi = int64_t(item / nc % nq), bh = int64_t(item / (nc * nq));
    const int64_t b = bh / H, h = bh % H;
    const int64_t s0 = qi * qb, n_s = std::min(qb, S - s0);
    std::vector<Segment> ks, vs;
    segments_of(bh, &ks, &vs);
    std::vector<int64_t> cuts{L};
    for (auto& seg : ks) cuts.push_back(seg.start);
    for (auto& seg : vs) cuts.push_back(seg.start);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<Segment> ks_nonempty, vs_nonempty;
    for (auto& seg : ks) if (seg.length) ks_nonempty.push_back(seg);
    for (auto& seg : vs) if (seg.length) vs_nonempty.push_back(seg);
    Query q;
    q.plain.resize(n_s * r * d);
    for (int64_t s = 0; s < n_s; ++s)
      for (int64_t j = 0; j < r; ++j) {
        const float* src = qx + (((b * H + h) * r + j) * S + s0 + s) * d;
        float* dst = q.plain.data() + (s * r + j) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * a.scale;
      }
    if (rot_keys) {
      q.rotated = q.plain;
      for (int64_t i = 0; i < n_s * r; ++i) rotate_row(q.rotated.data() + i * d, d);
    }
    attend_chunk(ks_nonempty, vs_nonempty, cuts, q, n_s * r, r, s0, P, c * chunk, std::min(L, (c + 1) * chunk), d,
                 rot_values, a.window, partial.get() + item * rows * stride);
  });
  // 3. merge the chunks of each query row (log-sum-exp), undo the value rotation, write out
  run_small_here(parallel_for, B * H * S, B * H * S * r * nc * d, [&](size_t i) {
    const int64_t bh = int64_t(i / S), s = int64_t(i % S);
    const int64_t qi = s / qb, row0 = (s % qb) * r;
    const int64_t b = bh / H, h = bh % H;
    std::vector<float> acc(d), acc_rot(d);
    for (int64_t j = 0; j < r; ++j) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < nc; ++c)
        top = std::max(top, partial[(((bh * nq + qi) * nc + c) * rows + row0 + j) * stride]);
      float total = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(acc_rot.begin(), acc_rot.end(), 0.0f);
      for (int64_t c = 0; c < nc; ++c) {
        const float* p = partial.get() + (((bh * nq + qi) * nc + c) * rows + row0 + j) * stride;
        if (p[1] == 0.0f) continue;
        const float w = std::exp(p[0] - top);
        total += w * p[1];
        for (int64_t e = 0; e < d; ++e) acc[e] += w * p[2 + e];
        if (rot_values)
          for (int64_t e = 0; e < d; ++e) acc_rot[e] += w * p[2 + d + e];
      }
      if (rot_values) rotate_row(acc_rot.data(), d);
      float* dst = output + (((b * H + h) * r + j) * S + s) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = (acc[e] + acc_rot[e]) / total;
    }
  });
}

}  // namespace

size_t StreamSpec::num_parts() const {
  size_t n = 0;
  for (int s : segments) n += format(s).parts.size();
  return n;
}

bool parse_attention(const Attributes& a, AttentionSpec* out, std::string* error) {
  int64_t sinks, window, d, r;
  if (!get_int(a, "sink_tokens", &sinks, error) || !get_int(a, "recent_window", &window, error) ||
      !get_int(a, "head_dim", &d, error) || !get_int(a, "q_per_kv", &r, error))
    return false;
  auto it = a.floats.find("scale");
  if (it == a.floats.end()) return fail(error, "KVAttention: missing float attribute scale");
  if (sinks < 0 || window < 0 || d < 1 || d > 4096 || r < 1 || r > 4096)
    return fail(error, "KVAttention: expected sink_tokens >= 0, recent_window >= 0, 1 <= head_dim <= 4096 and q_per_kv >= 1");
  AttentionSpec spec;
  spec.head_dim = d;
  spec.q_per_kv = r;
  spec.scale = it->second;
  if (!parse_stream(a, "key", sinks, window, d, &spec.key, error) ||
      !parse_stream(a, "value", sinks, window, d, &spec.value, error))
    return false;
  *out = spec;
  return true;
}

bool run_attention(const AttentionSpec& spec, const View& query, const View& key, const View& value,
                   const std::vector<View>& past, const Allocate& allocate, const ParallelFor& parallel_for,
                   std::string* error) {
  if (spec.window > 0) return run_window_attention(spec, query, key, value, past, allocate, parallel_for, error);
  const int64_t d = spec.head_dim, r = spec.q_per_kv;
  if (key.dims.size() != 4 || key.dims[3] != d || value.dims != key.dims)
    return fail(error, "KVAttention: expected key and value [B, H, S, " + std::to_string(d) + "] of the same shape");
  const int64_t B = key.dims[0], H = key.dims[1], S = key.dims[2];
  if (query.dims != std::vector<int64_t>{B, H * r, S, d})
    return fail(error, "KVAttention: expected query [B, H*r, S, D] = [" + std::to_string(B) + ", " + std::to_string(H * r) +
                           ", " + std::to_string(S) + ", " + std::to_string(d) + "]");
  if (past.size() != spec.key.num_parts() + spec.value.num_parts())
    return fail(error, "KVAttention: expected " + std::to_string(spec.key.num_parts() + spec.value.num_parts()) +
                           " past segment parts, got " + std::to_string(past.size()));
  // past segments: shapes, lengths, and the rule's split of their total
  StreamBuffers streams[2];
  size_t index = 0;
  int64_t totals[2] = {0, 0};
  for (int st = 0; st < 2; ++st) {
    const StreamSpec& s = st == 0 ? spec.key : spec.value;
    StreamBuffers& sb = streams[st];
    sb.spec = &s;
    for (int seg : s.segments) {
      const Format& f = s.format(seg);
      int64_t length = -1;
      std::vector<const uint8_t*> ptrs;
      for (const PartSpec& ps : f.parts) {
        const View& v = past[index++];
        if (v.dims.size() != 4 || v.dims[0] != B || v.dims[1] != H || v.dims[3] != ps.width || v.bytes != ps.bytes) {
          std::string got;
          for (int64_t x : v.dims) got += (got.empty() ? "" : ", ") + std::to_string(x);
          return fail(error, "KVAttention: past part " + std::to_string(index - 1) + " (" + f.name + " " + ps.name +
                                 ") must be [" + std::to_string(B) + ", " + std::to_string(H) + ", rows, " +
                                 std::to_string(ps.width) + "] of " + std::to_string(ps.bytes) + "-byte elements, got [" +
                                 got + "] of " + std::to_string(v.bytes) + "-byte elements");
        }
        int64_t rows = v.dims[2] * ps.rows_per;
        if (length < 0) length = rows;
        else if (rows != length)
          return fail(error, "KVAttention: the parts of a past " + f.name + " segment disagree on its positions");
        ptrs.push_back(v.data);
      }
      sb.past_parts.push_back(ptrs);
      sb.past_lengths.push_back(length);
      totals[st] += length;
    }
  }
  if (totals[0] != totals[1])
    return fail(error, "KVAttention: past keys hold " + std::to_string(totals[0]) + " positions, values " +
                           std::to_string(totals[1]));
  const int64_t P = totals[0], L = P + S;
  size_t out_index = 1;
  for (int st = 0; st < 2; ++st) {
    StreamBuffers& sb = streams[st];
    const StreamSpec& s = *sb.spec;
    auto expect = [&](int64_t length) {
      std::vector<int64_t> lengths;
      auto tl = s.rule.tier_lengths(length);
      for (int seg : s.segments) lengths.push_back(seg < 0 ? s.rule.sinks(length) : tl[seg]);
      return lengths;
    };
    if (expect(P) != sb.past_lengths)
      return fail(error, "KVAttention: the past segments' lengths are not the rule's split of " + std::to_string(P) +
                             " positions (a cache from another map?)");
    sb.lengths = expect(L);
    for (size_t i = 0; i < s.segments.size(); ++i) {
      const Format& f = s.format(s.segments[i]);
      std::vector<uint8_t*> ptrs;
      for (const PartSpec& ps : f.parts) {
        ptrs.push_back(allocate(out_index++, {B, H, sb.lengths[i] / ps.rows_per, ps.width}));
        if (!ptrs.back() && B * H * sb.lengths[i] > 0) return fail(error, "KVAttention: could not allocate an output");
      }
      sb.parts.push_back(ptrs);
    }
  }
  float* output = reinterpret_cast<float*>(allocate(0, {B, H * r, S, d}));
  if (B == 0 || H == 0 || S == 0) return true;
  if (!output) return fail(error, "KVAttention: could not allocate the attention output");

  // 1. append, per (stream, b, h); work ~ positions copied plus elements quantized
  const float* kx = reinterpret_cast<const float*>(key.data);
  const float* vx = reinterpret_cast<const float*>(value.data);
  std::vector<std::string> errors(2 * B * H);
  run_small_here(parallel_for, 2 * B * H, 2 * B * H * (P + S * d), [&](size_t i) {
    const int st = int(i / (B * H));
    const int64_t bh = int64_t(i % (B * H));
    append_slice(streams[st], bh, (st == 0 ? kx : vx) + bh * S * d, P, S, &errors[i]);
  });
  for (auto& e : errors)
    if (!e.empty()) return fail(error, "KVAttention: " + e);

  bool rot_values = false, rot_keys = false;
  for (int seg : spec.value.segments) rot_values |= bool(spec.value.format(seg).rotate);
  for (int seg : spec.key.segments) rot_keys |= bool(spec.key.format(seg).rotate);
  AttendShape shape{B, H, S, P, d, r, spec.scale, 0, rot_keys, rot_values};
  attend_all(shape, reinterpret_cast<const float*>(query.data), output,
             [&](int64_t bh, std::vector<Segment>* ks, std::vector<Segment>* vs) {
               *ks = streams[0].slice(bh);
               *vs = streams[1].slice(bh);
             },
             parallel_for);
  return true;
}

// KVWindowAttention.  Per (stream, b, h) the S new positions are quantized into a buffer; attention
// reads two segments, the past rows (inputs, positions [0, T)) and the new rows ([T, T + S)), with
// query s reading positions j > T + s - W; the present outputs get the last min(T + S, W - 1) of them.
bool parse_window_attention(const Attributes& a, AttentionSpec* out, std::string* error) {
  AttentionSpec spec;
  std::string key, value;
  int64_t window, d, r;
  if (!get_string(a, "key_scheme", &key, error) || !get_string(a, "value_scheme", &value, error) ||
      !get_int(a, "window", &window, error) || !get_int(a, "head_dim", &d, error) || !get_int(a, "q_per_kv", &r, error))
    return false;
  auto it = a.floats.find("scale");
  if (it == a.floats.end()) return fail(error, "KVWindowAttention: missing float attribute scale");
  if (window < 2 || d < 1 || d > 4096 || r < 1 || r > 4096)
    return fail(error, "KVWindowAttention: expected window >= 2, 1 <= head_dim <= 4096 and q_per_kv >= 1");
  for (StreamSpec* s : {&spec.key, &spec.value}) {
    Format f;
    if (!parse_format(s == &spec.key ? key : value, d, &f, error)) return false;
    if (f.token_group != 1)
      return fail(error, "KVWindowAttention: a window holds per-token schemes, got " + key + " and " + value);
    s->sink = f;
    s->tiers = {f};
    s->segments = {0};
  }
  spec.window = window, spec.head_dim = d, spec.q_per_kv = r, spec.scale = it->second;
  *out = spec;
  return true;
}

bool run_window_attention(const AttentionSpec& spec, const View& query, const View& key, const View& value,
                          const std::vector<View>& past, const Allocate& allocate, const ParallelFor& parallel_for,
                          std::string* error) {
  const int64_t d = spec.head_dim, r = spec.q_per_kv, W = spec.window;
  if (W < 2) return fail(error, "KVWindowAttention: expected window >= 2");
  if (key.dims.size() != 4 || key.dims[3] != d || value.dims != key.dims)
    return fail(error, "KVWindowAttention: expected key and value [B, H, S, " + std::to_string(d) + "] of the same shape");
  const int64_t B = key.dims[0], H = key.dims[1], S = key.dims[2];
  if (query.dims != std::vector<int64_t>{B, H * r, S, d})
    return fail(error, "KVWindowAttention: expected query [B, H*r, S, D] = [" + std::to_string(B) + ", " +
                           std::to_string(H * r) + ", " + std::to_string(S) + ", " + std::to_string(d) + "]");
  const Format* formats[2] = {&spec.key.tiers[0], &spec.value.tiers[0]};
  if (past.size() != formats[0]->parts.size() + formats[1]->parts.size())
    return fail(error, "KVWindowAttention: expected " + std::to_string(formats[0]->parts.size() + formats[1]->parts.size()) +
                           " past parts, got " + std::to_string(past.size()));
  int64_t T = -1;
  std::vector<const uint8_t*> past_ptrs[2];
  size_t index = 0;
  for (int st = 0; st < 2; ++st)
    for (const PartSpec& ps : formats[st]->parts) {
      const View& v = past[index++];
      if (v.dims.size() != 4 || v.dims[0] != B || v.dims[1] != H || v.dims[3] != ps.width || v.bytes != ps.bytes ||
          (T >= 0 && v.dims[2] != T))
        return fail(error, "KVWindowAttention: past part " + std::to_string(index - 1) + " (" + formats[st]->name + " " +
                               ps.name + ") must be [" + std::to_string(B) + ", " + std::to_string(H) + ", rows, " +
                               std::to_string(ps.width) + "] of " + std::to_string(ps.bytes) +
                               "-byte elements, rows equal for every part");
      T = v.dims[2];
      past_ptrs[st].push_back(v.data);
    }
  if (T > W - 1)
    return fail(error, "KVWindowAttention: the past window holds " + std::to_string(T) + " positions, expected at most "
                           "window - 1 = " + std::to_string(W - 1));
  const int64_t L = T + S, keep = std::min(L, W - 1), drop = L - keep;
  // presents: rows [drop, L) of past ++ new
  std::vector<uint8_t*> present_ptrs[2];
  size_t out_index = 1;
  for (int st = 0; st < 2; ++st)
    for (const PartSpec& ps : formats[st]->parts) {
      present_ptrs[st].push_back(allocate(out_index++, {B, H, keep, ps.width}));
      if (!present_ptrs[st].back() && B * H * keep > 0)
        return fail(error, "KVWindowAttention: could not allocate an output");
    }
  float* output = reinterpret_cast<float*>(allocate(0, {B, H * r, S, d}));
  if (B == 0 || H == 0 || S == 0) return true;
  if (!output) return fail(error, "KVWindowAttention: could not allocate the attention output");

  // 1. quantize the new positions, per (stream, b, h), into [B*H, S, width] buffers; copy the kept rows
  std::vector<std::vector<uint8_t>> fresh[2];
  std::vector<uint8_t*> fresh_ptrs[2];
  for (int st = 0; st < 2; ++st)
    for (const PartSpec& ps : formats[st]->parts) {
      fresh[st].emplace_back(size_t(B * H * S * ps.row_bytes()));
      fresh_ptrs[st].push_back(fresh[st].back().data());
    }
  const float* xs[2] = {reinterpret_cast<const float*>(key.data), reinterpret_cast<const float*>(value.data)};
  std::vector<std::string> errors(2 * B * H);
  run_small_here(parallel_for, 2 * B * H, 2 * B * H * (keep + S * d), [&](size_t i) {
    const int st = int(i / (B * H));
    const int64_t bh = int64_t(i % (B * H));
    const Format& f = *formats[st];
    const PartPtrs mine = slice_parts(f, fresh_ptrs[st], S, bh);
    if (!quantize_rows(f, xs[st] + bh * S * d, S, mine, 0, &errors[i])) return;
    const ConstPartPtrs old_rows = slice_parts(f, past_ptrs[st], T, bh);
    const PartPtrs kept = slice_parts(f, present_ptrs[st], keep, bh);
    const int64_t from_past = std::max<int64_t>(T - drop, 0);
    if (from_past) copy_rows(f, old_rows, drop, kept, 0, from_past);
    const int64_t from_new = keep - from_past;  // new rows [S - from_new, S)
    copy_rows(f, ConstPartPtrs(mine.begin(), mine.end()), S - from_new, kept, from_past, from_new);
  });
  for (auto& e : errors)
    if (!e.empty()) return fail(error, "KVWindowAttention: " + e);

  // 2. attention over past rows ++ new rows
  AttendShape shape{B, H, S, T, d, r, spec.scale, W, bool(formats[0]->rotate), bool(formats[1]->rotate)};
  attend_all(shape, reinterpret_cast<const float*>(query.data), output,
             [&](int64_t bh, std::vector<Segment>* ks, std::vector<Segment>* vs) {
               for (int st = 0; st < 2; ++st) {
                 const Format& f = *formats[st];
                 std::vector<Segment>& out = st == 0 ? *ks : *vs;
                 out.clear();
                 out.push_back({&f, slice_parts(f, past_ptrs[st], T, bh), 0, T});
                 const PartPtrs mine = slice_parts(f, fresh_ptrs[st], S, bh);
                 out.push_back({&f, ConstPartPtrs(mine.begin(), mine.end()), T, S});
               }
             },
             parallel_for);
  return true;
}

}  // namespace kvc
