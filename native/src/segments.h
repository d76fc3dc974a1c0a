// The segment algebra of kvcompile/kv/segments.py (SegmentRule), on int64.
//
// Tiers newest first: 0 = recent, 1..K = age1..ageK, K+1 = bulk; c_i = non-sink positions in
// tier i or an older one (see the Python module for the derivation).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kvc {

struct SegmentRule {
  int64_t sink_tokens = 0, recent_window = 0, token_group = 1;
  std::vector<std::pair<int64_t, int64_t>> ages;  // (window, token_group), newest first

  int tiers() const { return int(ages.size()) + 2; }

  // (W_i, B_i) for tiers i = 1 .. K+1
  std::vector<std::pair<int64_t, int64_t>> boundaries() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    int64_t age = recent_window, previous = 1;
    for (size_t i = 0; i <= ages.size(); ++i) {
      int64_t group = i < ages.size() ? ages[i].second : token_group;
      out.emplace_back(age, std::lcm(group, previous));
      if (i < ages.size()) age += ages[i].first;
      previous = group;
    }
    return out;
  }

  int64_t sinks(int64_t length) const { return std::min(sink_tokens, length); }

  // [c_0, c_1, ..., c_{K+1}]
  std::vector<int64_t> reached(int64_t length) const {
    int64_t c0 = length - sinks(length);
    std::vector<int64_t> c{c0};
    auto bounds = boundaries();
    for (size_t i = 0; i < bounds.size(); ++i) {
      int64_t free = c0 - bounds[i].first;
      if (i) free = std::min(c.back(), free);
      int64_t g = bounds[i].second;
      c.push_back(std::max(free, int64_t(0)) / g * g);
    }
    return c;
  }

  // positions per tier (0 = recent .. K+1 = bulk)
  std::vector<int64_t> tier_lengths(int64_t length) const {
    auto c = reached(length);
    std::vector<int64_t> out(tiers());
    for (int i = 0; i < tiers(); ++i) out[i] = i + 1 < tiers() ? c[i] - c[i + 1] : c[i];
    return out;
  }

  int64_t new_sinks(int64_t past, int64_t added) const {
    return std::max(int64_t(0), std::min(sink_tokens - past, added));
  }

  // positions entering tier i (i = 1 .. K+1) when `added` are appended to `past`; index i - 1
  std::vector<int64_t> moves(int64_t past, int64_t added) const {
    auto before = reached(past), after = reached(past + added);
    std::vector<int64_t> out;
    for (size_t i = 1; i < after.size(); ++i) out.push_back(after[i] - before[i]);
    return out;
  }
};

}  // namespace kvc
