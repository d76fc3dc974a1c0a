// Host logic of the KVAttention plugin, independent of TensorRT: output shapes (on any integer
// type: int64 here and in the tests, TensorRT's dimension expressions in plugin.cc), the
// per-call layout of the segments, the workspace, the kernels' parameters, and a CPU runner of the
// kernels' block programs (kvc_trt_emulate, for the tests).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kv_attention.h"  // native/src: AttentionSpec, parse_attention
#include "programs.h"

namespace kvc_trt {

using kvc::AttentionSpec;
using kvc::StreamSpec;

// Integer operations over int64 (the tests and enqueue) ...
struct IntOps {
  using T = int64_t;
  T constant(int64_t v) { return v; }
  T add(T a, T b) { return a + b; }
  T sub(T a, T b) { return a - b; }
  T min(T a, T b) { return std::min(a, b); }
  T max(T a, T b) { return std::max(a, b); }
  T floor_div(T a, int64_t b) { return a / b; }  // operands are non-negative
  T mul(T a, int64_t b) { return a * b; }
};

// Present positions per segment (storage order of StreamSpec::segments) of a stream holding
// `length` positions: kvcompile.kv.segments.SegmentRule on an integer backend (native/src/segments.h).
template <class Ops>
std::vector<typename Ops::T> segment_lengths(const StreamSpec& s, Ops& o, typename Ops::T length) {
  using T = typename Ops::T;
  const auto& rule = s.rule;
  const T zero = o.constant(0);
  const T sinks = o.min(o.constant(rule.sink_tokens), length);
  const T c0 = o.sub(length, sinks);
  std::vector<T> c{c0};
  auto bounds = rule.boundaries();
  for (size_t i = 0; i < bounds.size(); ++i) {
    T free = o.sub(c0, o.constant(bounds[i].first));
    if (i) free = o.min(c.back(), free);
    c.push_back(o.mul(o.floor_div(o.max(free, zero), bounds[i].second), bounds[i].second));
  }
  const int tiers = rule.tiers();
  std::vector<T> out;
  for (int seg : s.segments) {
    if (seg < 0) out.push_back(sinks);
    else out.push_back(seg + 1 < tiers ? o.sub(c[seg], c[seg + 1]) : c[seg]);
  }
  return out;
}

// Output dims given input dims (as TensorRT's getOutputShapes): output, then the present parts.
// Inputs: query, key, value, past key parts, past value parts (each [B, H or H*r, rows, width]).
template <class Ops>
std::vector<std::vector<typename Ops::T>> output_dims(const AttentionSpec& spec, Ops& o,
                                                      const std::vector<std::vector<typename Ops::T>>& in) {
  using T = typename Ops::T;
  std::vector<std::vector<T>> out{in[0]};
  if (spec.window > 0) {  // KVWindowAttention: the last min(T + S, W - 1) positions, T = past rows
    const T keep = o.min(o.add(in[3][2], in[1][2]), o.constant(spec.window - 1));
    for (const StreamSpec* s : {&spec.key, &spec.value})
      for (const auto& part : s->tiers[0].parts) out.push_back({in[1][0], in[1][1], keep, o.constant(part.width)});
    return out;
  }
  size_t index = 3;
  for (const StreamSpec* s : {&spec.key, &spec.value}) {
    T past = o.constant(0);
    size_t first = index;
    for (int seg : s->segments) {
      past = o.add(past, in[index][2]);  // part 0 of every format holds one row per position
      index += s->format(seg).parts.size();
    }
    (void)first;
    const T total = o.add(past, in[1][2]);
    const std::vector<T> lengths = segment_lengths(*s, o, total);
    for (size_t k = 0; k < s->segments.size(); ++k) {
      const kvc::Format& f = s->format(s->segments[k]);
      for (const auto& part : f.parts)
        out.push_back({in[1][0], in[1][1], part.rows_per == 1 ? lengths[k] : o.floor_div(lengths[k], part.rows_per),
                       o.constant(part.width)});
    }
  }
  return out;
}

// The element type of each input and output: 4 = float32, 2 = float16, 1 = int8.
std::vector<int> input_bytes(const AttentionSpec& spec);
std::vector<int> output_bytes(const AttentionSpec& spec);

// Workspace bytes for every call with batch <= max_batch, kv heads `heads`, S <= max_new and
// total positions <= max_total (getWorkspaceSize) ...
size_t workspace_size(const AttentionSpec& spec, int64_t max_batch, int64_t heads, int64_t max_new, int64_t max_total);
// ... and what one call with exactly these dimensions uses (at most the bound above).
size_t workspace_used(const AttentionSpec& spec, int64_t batch, int64_t heads, int64_t added, int64_t total);

// Fill the kernels' parameters for one call; false (with a reason) when the dims do not fit the spec.
bool make_params(const AttentionSpec& spec, const std::vector<std::vector<int64_t>>& in_dims,
                 const void* const* inputs, void* const* outputs, void* workspace, size_t workspace_bytes,
                 kvc_dev::Params* params, std::string* error);

// Grid sizes of the two kernels for `params`.
struct Grids {
  int64_t update, attend;
};
Grids grids(const kvc_dev::Params& params);

// Run the kernels' block programs on the CPU, one work item after another (the GPU path's arithmetic).
void run_on_host(const kvc_dev::Params& params);

// Attributes from "name=value" lines (strings for *_scheme / *_tiers, a float for scale, ints else).
bool parse_attribute_text(const std::string& text, kvc::Attributes* out, std::string* error);

}  // namespace kvc_trt
