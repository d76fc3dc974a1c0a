// Host logic of the KVAttention plugin: see enqueue.h.
#include "enqueue.h"

#include <cstring>
#include <sstream>
#include <tuple>

namespace kvc_trt {

namespace {

bool fail(std::string* error, const std::string& why) {
  if (error) *error = why;
  return false;
}

kvc_dev::Fmt to_fmt(const kvc::Format& f) {
  kvc_dev::Fmt out{};
  out.kind = f.kind, out.bits = f.bits, out.group = f.group, out.channel = f.channel, out.symmetric = f.symmetric;
  out.scale_bytes = f.scale_bytes, out.rotate = f.rotate, out.double_quant = f.double_quant, out.levels = f.levels;
  out.nparts = int32_t(f.parts.size());
  out.d = f.head_dim, out.token_group = f.token_group;
  for (size_t p = 0; p < f.parts.size(); ++p) {
    out.part_bytes[p] = f.parts[p].bytes;
    out.part_width[p] = f.parts[p].width;
    out.rows_per[p] = f.parts[p].rows_per;
  }
  return out;
}

size_t num_parts(const StreamSpec& s) {
  size_t n = 0;
  for (int seg : s.segments) n += s.format(seg).parts.size();
  return n;
}

constexpr size_t kAlign = 256;
constexpr int64_t kSharedBytes = 48 * 1024;     // what a block may use without opting in
constexpr int64_t kMaxSharedBytes = 96 * 1024;  // with the opt-in (every SM 8.0+ GPU allows it)
size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Query heads per attend block: the largest divisor of r whose shared memory fits 48 KiB (no opt-in
// needed on any GPU), at least one.
int64_t heads_per_block(int64_t d, int64_t r) {
  for (int64_t R = r; R > 1; --R)
    if (r % R == 0 && kvc_dev::attend_smem_floats(d, R) * 4 <= kSharedBytes) return R;
  return 1;
}

// Positions per attend block: split the positions into chunks (of at least kChunk) only until about
// kTargetBlocks blocks run; returns {chunks, chunk_len}.
std::pair<int64_t, int64_t> split_positions(int64_t items, int64_t total) {
  const int64_t wanted = std::max<int64_t>(1, kvc_dev::kTargetBlocks / std::max<int64_t>(items, 1));
  const int64_t chunks = std::max<int64_t>(1, std::min((total + kvc_dev::kChunk - 1) / kvc_dev::kChunk, wanted));
  int64_t len = (total + chunks - 1) / chunks;
  len = std::max<int64_t>(kvc_dev::kTile, (len + kvc_dev::kTile - 1) / kvc_dev::kTile * kvc_dev::kTile);
  return {std::max<int64_t>(1, (total + len - 1) / len), len};
}

// Rows an append float buffer may hold for one stream: what enters a tier is at most the new
// positions plus every newer tier's rows, and a tier (not the bulk) holds at most its window plus
// a block of its group; the bulk never hands rows on.  Independent of the context length.
int64_t buffer_rows(const StreamSpec& s, int64_t added) {
  int64_t rows = added;
  for (const auto& [window, group] : s.rule.boundaries()) rows += window + group;
  return std::max<int64_t>(rows, 1);
}

// Byte offsets of the workspace's regions and its size.  `bound`: an upper bound over every call
// with at most these dimensions (getWorkspaceSize), else the size of this call.
struct WorkspaceLayout {
  size_t status = 0, done = 0, partial = 0, work = 0, scratch = 0, size = 0;
  int64_t work_rows = 0, scratch_bytes = 0, chunks = 0, chunk_len = 0, items = 0;
};

WorkspaceLayout workspace_layout(const AttentionSpec& spec, int64_t B, int64_t H, int64_t S, int64_t total,
                                 bool bound = false) {
  WorkspaceLayout w;
  const int64_t D = spec.head_dim, R = heads_per_block(D, spec.q_per_kv);
  w.items = B * H * S * (spec.q_per_kv / R);
  std::tie(w.chunks, w.chunk_len) = split_positions(w.items, total);
  // split-K partials, only when the positions are split: items * chunks < kTargetBlocks + items
  // <= 2 kTargetBlocks, whatever the dimensions
  const int64_t partial_rows = bound ? 2 * kvc_dev::kTargetBlocks * R : (w.chunks > 1 ? w.items * R * w.chunks : 0);
  size_t scratch_size = 0;
  if (spec.window > 0) {  // the new rows of each stream and part, [B*H, S, width] (window_scratch)
    w.work_rows = std::max<int64_t>(S, 1);  // the rotation's temporary
    for (const StreamSpec* s : {&spec.key, &spec.value})
      for (const auto& p : s->tiers[0].parts) scratch_size += aligned(size_t(B * H * S * p.row_bytes()));
  } else {
    w.work_rows = std::max(buffer_rows(spec.key, S), buffer_rows(spec.value, S));
    for (const StreamSpec* s : {&spec.key, &spec.value})
      for (size_t t = 0; t + 1 < s->tiers.size(); ++t) {  // the bulk is written in place
        int64_t bytes = 0;
        for (const auto& p : s->tiers[t].parts) bytes += (w.work_rows / p.rows_per + 1) * p.row_bytes();
        w.scratch_bytes = std::max(w.scratch_bytes, int64_t(aligned(size_t(bytes))));
      }
    scratch_size = size_t(2 * B * H * w.scratch_bytes);
  }
  w.status = 0;
  w.done = 4;  // right after the status word: one memset clears both
  w.partial = aligned(size_t(4 + 4 * w.items));
  w.work = w.partial + aligned(size_t(partial_rows * (2 + 2 * D)) * 4);
  w.scratch = w.work + aligned(size_t(2 * B * H * 3 * w.work_rows * D) * 4);
  w.size = w.scratch + scratch_size;
  return w;
}

void fill_stream(const StreamSpec& spec, int64_t past, int64_t added, const std::vector<int64_t>& past_lengths,
                 const void* const* inputs, void* const* outputs, const float* x, kvc_dev::Stream* out) {
  IntOps ops;
  const std::vector<int64_t> lengths = segment_lengths(spec, ops, past + added);
  *out = kvc_dev::Stream{};
  out->nseg = int32_t(spec.segments.size());
  out->ntiers = int32_t(spec.tiers.size());
  out->sink_seg = -1;
  out->new_sinks = spec.rule.new_sinks(past, added);
  const std::vector<int64_t> moves = spec.rule.moves(past, added);
  for (size_t i = 0; i < moves.size(); ++i) out->moves[i] = moves[i];
  out->x = x;
  int64_t start = 0;
  size_t part = 0;
  for (size_t k = 0; k < spec.segments.size(); ++k) {
    const int cls = spec.segments[k];
    if (cls < 0) out->sink_seg = int32_t(k);
    else out->tier_seg[cls] = int32_t(k);
    kvc_dev::Segment& g = out->seg[k];
    g.f = to_fmt(spec.format(cls));
    g.past_len = past_lengths[k];
    g.len = lengths[k];
    g.start = start;
    start += lengths[k];
    for (int p = 0; p < g.f.nparts; ++p, ++part) {
      g.past[p] = static_cast<const uint8_t*>(inputs[part]);
      g.present[p] = static_cast<uint8_t*>(outputs[part]);
    }
  }
}

// A KVWindowAttention stream: seg[0] the T past rows (read in place), seg[1] the S new rows in the
// workspace at *scratch (advanced past them), seg[2] the present window (the outputs).
void fill_window_stream(const StreamSpec& spec, int64_t window, int64_t past, int64_t added, int64_t bh_count,
                        const void* const* inputs, void* const* outputs, const float* x, uint8_t** scratch,
                        kvc_dev::Stream* out) {
  *out = kvc_dev::Stream{};
  out->nseg = 2, out->ntiers = 1, out->sink_seg = -1, out->tier_seg[0] = 1;
  out->x = x;
  const kvc_dev::Fmt f = to_fmt(spec.tiers[0]);
  kvc_dev::Segment& old = out->seg[0];
  kvc_dev::Segment& fresh = out->seg[1];
  kvc_dev::Segment& kept = out->seg[2];
  old.f = fresh.f = kept.f = f;
  old.past_len = old.len = past, old.start = 0;
  fresh.past_len = 0, fresh.len = added, fresh.start = past;
  kept.past_len = 0, kept.len = std::min(past + added, window - 1), kept.start = past + added;  // not attended
  for (int p = 0; p < f.nparts; ++p) {
    old.past[p] = static_cast<const uint8_t*>(inputs[p]);
    old.present[p] = const_cast<uint8_t*>(old.past[p]);  // attention reads the past rows where they are
    fresh.present[p] = *scratch;
    *scratch += aligned(size_t(bh_count * added * f.row_bytes(p)));
    kept.present[p] = static_cast<uint8_t*>(outputs[p]);
  }
}

}  // namespace

std::vector<int> input_bytes(const AttentionSpec& spec) {
  std::vector<int> out{4, 4, 4};
  for (const StreamSpec* s : {&spec.key, &spec.value})
    for (int seg : s->segments)
      for (const auto& p : s->format(seg).parts) out.push_back(p.bytes);
  return out;
}

std::vector<int> output_bytes(const AttentionSpec& spec) {
  std::vector<int> in = input_bytes(spec);
  std::vector<int> out{4};
  out.insert(out.end(), in.begin() + 3, in.end());
  return out;
}

size_t workspace_size(const AttentionSpec& spec, int64_t max_batch, int64_t heads, int64_t max_new, int64_t max_total) {
  return workspace_layout(spec, max_batch, heads, max_new, max_total, true).size;
}

size_t workspace_used(const AttentionSpec& spec, int64_t batch, int64_t heads, int64_t added, int64_t total) {
  return workspace_layout(spec, batch, heads, added, total).size;
}

bool make_params(const AttentionSpec& spec, const std::vector<std::vector<int64_t>>& in, const void* const* inputs,
                 void* const* outputs, void* workspace, size_t workspace_bytes, kvc_dev::Params* params,
                 std::string* error) {
  const size_t nk = num_parts(spec.key), nv = num_parts(spec.value);
  if (in.size() != 3 + nk + nv)
    return fail(error, "KVAttention: expected " + std::to_string(3 + nk + nv) + " inputs, got " + std::to_string(in.size()));
  for (const auto& d : in)
    if (d.size() != 4) return fail(error, "KVAttention: expected 4-d inputs");
  const int64_t B = in[1][0], H = in[1][1], S = in[1][2], D = spec.head_dim, r = spec.q_per_kv;
  if (in[1][3] != D || in[2] != in[1])
    return fail(error, "KVAttention: expected key and value [B, H, S, " + std::to_string(D) + "] of the same shape");
  if (in[0] != std::vector<int64_t>{B, H * r, S, D})
    return fail(error, "KVAttention: expected query [B, H*r, S, D] = [" + std::to_string(B) + ", " + std::to_string(H * r) +
                           ", " + std::to_string(S) + ", " + std::to_string(D) + "]");
  int64_t pasts[2];
  std::vector<int64_t> past_lengths[2];
  size_t index = 3;
  for (int st = 0; st < 2 && spec.window > 0; ++st) {  // KVWindowAttention: one format, T rows in every part
    const kvc::Format& f = (st == 0 ? spec.key : spec.value).tiers[0];
    for (size_t p = 0; p < f.parts.size(); ++p, ++index) {
      const auto& d = in[index];
      if (d[0] != B || d[1] != H || d[3] != f.parts[p].width || d[2] != in[3][2])
        return fail(error, "KVWindowAttention: a past part of scheme " + f.name + " does not have the expected shape");
    }
    pasts[st] = in[3][2];
  }
  if (spec.window > 0 && pasts[0] > spec.window - 1)
    return fail(error, "KVWindowAttention: the past window holds " + std::to_string(pasts[0]) +
                           " positions, expected at most window - 1 = " + std::to_string(spec.window - 1));
  for (int st = 0; st < 2 && spec.window == 0; ++st) {
    const StreamSpec& s = st == 0 ? spec.key : spec.value;
    int64_t past = 0;
    for (int seg : s.segments) {
      const kvc::Format& f = s.format(seg);
      const int64_t len = in[index][2];
      for (size_t p = 0; p < f.parts.size(); ++p) {
        const auto& d = in[index + p];
        if (d[0] != B || d[1] != H || d[3] != f.parts[p].width || d[2] != len / f.parts[p].rows_per)
          return fail(error, "KVAttention: a past part of scheme " + f.name + " does not have the expected shape");
      }
      past_lengths[st].push_back(len);
      past += len;
      index += f.parts.size();
    }
    IntOps ops;
    if (segment_lengths(s, ops, past) != past_lengths[st])
      return fail(error, "KVAttention: the past segments' lengths do not follow the segment rule for " +
                             std::to_string(past) + " positions");
    pasts[st] = past;
  }
  if (pasts[0] != pasts[1])
    return fail(error, "KVAttention: keys hold " + std::to_string(pasts[0]) + " past positions, values " +
                           std::to_string(pasts[1]));
  const int64_t past = pasts[0], total = past + S;
  const WorkspaceLayout w = workspace_layout(spec, B, H, S, total);
  if (workspace_bytes < w.size)
    return fail(error, "KVAttention: workspace of " + std::to_string(workspace_bytes) + " bytes, expected " +
                           std::to_string(w.size) + " (a call beyond the engine's profile?)");
  kvc_dev::Params& P = *params;
  P = kvc_dev::Params{};
  uint8_t* base = static_cast<uint8_t*>(workspace);
  if (spec.window > 0) {
    uint8_t* scratch = base + w.scratch;
    fill_window_stream(spec.key, spec.window, past, S, B * H, inputs + 3, outputs + 1,
                       static_cast<const float*>(inputs[1]), &scratch, &P.stream[0]);
    fill_window_stream(spec.value, spec.window, past, S, B * H, inputs + 3 + nk, outputs + 1 + nk,
                       static_cast<const float*>(inputs[2]), &scratch, &P.stream[1]);
  } else {
    fill_stream(spec.key, past, S, past_lengths[0], inputs + 3, outputs + 1, static_cast<const float*>(inputs[1]),
                &P.stream[0]);
    fill_stream(spec.value, past, S, past_lengths[1], inputs + 3 + nk, outputs + 1 + nk,
                static_cast<const float*>(inputs[2]), &P.stream[1]);
  }
  P.window = spec.window;
  P.query = static_cast<const float*>(inputs[0]);
  P.output = static_cast<float*>(outputs[0]);
  P.batch = B, P.heads = H, P.q_per_kv = r, P.S = S, P.D = D, P.past = past, P.total = total;
  P.chunks = w.chunks, P.chunk_len = w.chunk_len;
  P.scale = spec.scale;
  P.heads_per_block = heads_per_block(D, r);
  if (kvc_dev::attend_smem_floats(D, P.heads_per_block) * 4 > kMaxSharedBytes)
    return fail(error, "KVAttention: head_dim " + std::to_string(D) + " needs more shared memory than the kernels may use");
  int64_t copy_bytes = 0;  // the largest kept-row slice of any (stream, segment, part); windows: none
  for (int st = 0; st < 2 && spec.window == 0; ++st) {
    const kvc_dev::Stream& s = P.stream[st];
    for (int k = 0; k < s.nseg; ++k) {
      int64_t src, dst;
      const int64_t rows = kvc_dev::kept_rows(s, k, &src, &dst);
      for (int p = 0; p < s.seg[k].f.nparts; ++p)
        copy_bytes = std::max(copy_bytes, rows / s.seg[k].f.rows_per[p] * s.seg[k].f.row_bytes(p));
    }
  }
  P.copy_blocks = B * H * ((copy_bytes + kvc_dev::kCopyChunk - 1) / kvc_dev::kCopyChunk);
  P.copy_rows_y = P.copy_blocks ? int64_t(2) * kvc_dev::kMaxSegments * kvc_dev::kMaxParts : 0;
  P.append_blocks = 2 * B * H;
  for (int st = 0; st < 2; ++st)
    for (int k = 0; k < P.stream[st].nseg; ++k)
      if (P.stream[st].seg[k].f.rotate) (st ? P.rotated_values : P.rotated_keys) = 1;
  P.status = reinterpret_cast<int32_t*>(base + w.status);
  P.done = reinterpret_cast<uint32_t*>(base + w.done);
  P.status_words = 1 + w.items;
  P.partial = reinterpret_cast<float*>(base + w.partial);
  P.work = reinterpret_cast<float*>(base + w.work);
  P.work_rows = w.work_rows;
  P.scratch = base + w.scratch;
  P.scratch_bytes = w.scratch_bytes;
  return true;
}

Grids grids(const kvc_dev::Params& P) {
  return {P.append_blocks + P.copy_blocks * P.copy_rows_y,
          P.batch * P.heads * P.S * (P.q_per_kv / P.heads_per_block) * P.chunks};
}

void run_on_host(const kvc_dev::Params& P) {
  const Grids g = grids(P);
  const kvc_dev::Block one{0, 1};
  std::fill(P.status, P.status + P.status_words, 0);  // the status word and the chunk counters
  std::vector<float> smem(size_t(kvc_dev::attend_smem_floats(P.D, P.heads_per_block)));
  for (int64_t i = 0; i < g.update; ++i) kvc_dev::update_program(P, i, one);
  for (int64_t i = 0; i < g.attend; ++i) kvc_dev::attend_program(P, i, one, smem.data());
}

bool parse_attribute_text(const std::string& text, kvc::Attributes* out, std::string* error) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) return fail(error, "KVAttention: expected name=value, got '" + line + "'");
    const std::string name = line.substr(0, eq), value = line.substr(eq + 1);
    const bool is_string = name.size() > 7 && (name.compare(name.size() - 7, 7, "_scheme") == 0 ||
                                                name.compare(name.size() - 6, 6, "_tiers") == 0);
    if (is_string) out->strings[name] = value;
    else if (name == "scale") out->floats[name] = std::stof(value);
    else out->ints[name] = std::stoll(value);
  }
  return true;
}

}  // namespace kvc_trt
