// KVAttention on plain buffers: the op of kvcompile/ops/attention.py, independent of any runtime.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "formats.h"
#include "segments.h"

namespace kvc {

// One stream (keys or values) of a KVAttention node: its rule and the format of each segment.
struct StreamSpec {
  SegmentRule rule;
  Format sink;
  std::vector<Format> tiers;   // 0 = recent, 1..K = age tiers, K+1 = bulk
  std::vector<int> segments;   // storage order: -1 = sink (only when sink_tokens > 0), else a tier index
  const Format& format(int segment) const { return segment < 0 ? sink : tiers[segment]; }
  size_t num_parts() const;
};

struct AttentionSpec {
  StreamSpec key, value;
  int64_t head_dim = 0, q_per_kv = 1;
  float scale = 1.0f;
  // > 0: KVWindowAttention (a sliding-window layer): each stream is one per-token format,
  // tiers = {format}, segments = {0}, and the past holds at most window - 1 positions
  int64_t window = 0;
};

// Attributes as the ONNX node carries them (strings, ints, floats by name).
struct Attributes {
  std::map<std::string, std::string> strings;
  std::map<std::string, int64_t> ints;
  std::map<std::string, float> floats;
};

bool parse_attention(const Attributes& attrs, AttentionSpec* out, std::string* error);

// A tensor [d0, d1, d2, d3] of `bytes`-byte elements.
struct View {
  const uint8_t* data = nullptr;
  std::vector<int64_t> dims;
  int bytes = 0;
};

// Runs fn(i) for i in [0, n), possibly in parallel.
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;
// Allocates output `index` (0 = attention output, then the present parts) with `dims`; returns its data.
using Allocate = std::function<uint8_t*(size_t index, const std::vector<int64_t>& dims)>;

// query [B, H r, S, D], key / value [B, H, S, D] float32; past: the key segments' parts, then the
// value segments' parts.  Returns false with a one-line reason on malformed input.
bool run_attention(const AttentionSpec& spec, const View& query, const View& key, const View& value,
                   const std::vector<View>& past, const Allocate& allocate, const ParallelFor& parallel_for,
                   std::string* error);

// KVWindowAttention (kvcompile/ops/window_attention.py): a sliding-window layer's head group, one
// per-token format per stream (attributes key_scheme, value_scheme, window, head_dim, q_per_kv,
// scale), as an AttentionSpec with window > 0.
bool parse_window_attention(const Attributes& attrs, AttentionSpec* out, std::string* error);

// query [B, H r, S, D], key / value [B, H, S, D] float32; past: the key format's parts, then the
// value format's ([B, H, T, width], T <= window - 1).  Outputs: the attention output, then the
// present parts (the last min(T + S, window - 1) positions).
bool run_window_attention(const AttentionSpec& spec, const View& query, const View& key, const View& value,
                          const std::vector<View>& past, const Allocate& allocate, const ParallelFor& parallel_for,
                          std::string* error);

}  // namespace kvc
