// The KVAttention kernels as block programs: one source for the GPU (kernels.cu launches them, one
// CUDA block per work item) and for the CPU (enqueue.cc's run_on_host runs each work item with one thread;
// the tests compare that with the torch reference).
//
// A block program is written in phases separated by block_sync().  Inside a phase, KVC_FOR splits
// a range over the block's threads, and a thread only writes elements of its own iterations, so
// that one thread running every iteration in order (the CPU) computes what the block computes.
// State that outlives a phase lives in shared memory (`smem`), never in a thread's registers.
//
// Two kernels per call, launched in this order on one stream (the second reads what the first wrote):
//   kvc_update  the append (kvcompile/kv/store.py SegmentStore.append), two kinds of blocks:
//               append blocks, one per (stream, batch row, kv head): positions that move to another
//               tier are re-quantized, new positions quantized (native/src/kv_attention.cc
//               append_slice); copy blocks, a grid of x = (batch row, kv head, chunk of kCopyChunk
//               bytes) by y = (stream, segment, part): the past rows that keep their bytes (sinks,
//               the bulk, each tier's rows that stay in it when only past rows leave) copied into
//               the present outputs.  The two kinds write disjoint rows and read only inputs.
//   kvc_attend  block per (batch row, kv head, query position, group of query heads, chunk of
//               chunk_len positions): online softmax over the chunk's positions as stored, tiles of
//               kTile positions de-quantized once for the group's query heads; writes (m, l, acc,
//               acc_rot) per query row.  The chunk's block that finishes last (a counter per work
//               item) merges them: o = sum_c e^{m_c - M} acc_c / sum_c e^{m_c - M} l_c (split-K
//               merge on the device); acc_rot, the part accumulated from -rot values in the rotated
//               domain, is rotated back once there.  With one chunk (prefill, where the query
//               positions give parallelism enough) the block writes its rows' output directly.
#pragma once

#include "device_formats.h"
#include "exp_nonpositive.h"  // native/src

namespace kvc_dev {

constexpr int kMaxSegments = 9;  // a sink + recent + up to 6 age tiers + bulk
constexpr int kMaxTiers = 8;
constexpr int kTile = 16;        // positions scored together
constexpr int kChunk = 256;      // fewest positions per attend block when the positions are split
constexpr int64_t kTargetBlocks = 2048;  // split the positions until about this many attend blocks
constexpr int kThreads = 128;    // threads per block on the GPU
constexpr int64_t kCopyChunk = 16384;  // bytes per copy block of kvc_update

struct Block {
  int64_t thread, threads;  // GPU: threadIdx.x, blockDim.x; CPU: 0, 1
};

#define KVC_FOR(i, n, blk) for (int64_t i = (blk).thread; i < (n); i += (blk).threads)

KVC_HD void block_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

struct Segment {
  Fmt f;
  int64_t past_len, len, start;     // positions per (batch row, head); start: first position (present)
  const uint8_t* past[kMaxParts];   // [B*H, past_len / rows_per, width] each
  uint8_t* present[kMaxParts];      // [B*H, len / rows_per, width] each
};

struct Stream {
  int32_t nseg, ntiers, sink_seg;   // sink_seg: segment of the sinks, -1 without
  int32_t tier_seg[kMaxTiers];      // segment of tier i: 0 = recent, 1..K = age tiers, ntiers-1 = bulk
  int64_t new_sinks, moves[kMaxTiers];
  const float* x;                   // this step's states [B, H, S, D]
  // storage order: sinks, bulk, oldest age tier, ..., recent.  KVWindowAttention (Params::window >
  // 0): seg[0] the T past rows (read in place), seg[1] the S new rows (quantized into the
  // workspace), seg[2] the present window, the last keep = min(T + S, W - 1) of them (its `present`
  // parts are the outputs; the parameter struct has no room for more fields under 4 KiB)
  Segment seg[kMaxSegments];
};

// Everything the three kernels read: passed by value (a kernel parameter, < 4 KiB).
struct Params {
  Stream stream[2];                 // keys, values
  const float* query;               // [B, H*r, S, D]
  float* output;                    // [B, H*r, S, D]
  int64_t batch, heads, q_per_kv, S, D, past, total;
  int64_t window;                   // > 0: a sliding window (query s reads positions j > past + s - window)
  int64_t chunks, chunk_len;        // positions split into `chunks` of chunk_len (a multiple of kTile)
  int64_t heads_per_block;          // query heads of one kv head that one attend block serves (divides q_per_kv)
  int64_t copy_blocks;              // x extent of the copy blocks' grid
  float scale;
  int32_t rotated_keys, rotated_values;  // some segment of the stream is -rot
  float* partial;                   // [B*H*r*S, chunks, 2 + 2D]
  float* work;                      // append float buffers [2][B*H][3][work_rows * D]
  int64_t work_rows;
  uint8_t* scratch;                 // append scratch tier [2][B*H][scratch_bytes]
  int64_t scratch_bytes;
  int32_t* status;                  // set to 1 when a state cannot be stored (NaN, inf, out of range)
  uint32_t* done;                   // per attend work item: chunks finished; follows `status`
  int64_t status_words;             // the status word and the counters: zeroed before each call
  int64_t append_blocks, copy_rows_y;  // kvc_update: append blocks, then copy_blocks x copy_rows_y copy blocks
};

KVC_HD uint32_t fetch_add(uint32_t* counter) {
#ifdef __CUDA_ARCH__
  return atomicAdd(counter, 1u);
#else
  return (*counter)++;
#endif
}

// Makes this thread's global writes visible to the other blocks before it signals them.
KVC_HD void global_fence() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

// Part pointers of the (b, h) slice `bh` of a segment holding `len` positions per slice.
template <typename P>
KVC_HD Parts slice(const Fmt& f, P const* bases, int64_t len, int64_t bh) {
  Parts out{};
  for (int p = 0; p < f.nparts; ++p)
    out.p[p] = const_cast<uint8_t*>(bases[p]) + bh * (len / f.rows_per[p]) * f.row_bytes(p);
  return out;
}

KVC_HD void copy_rows(const Fmt& f, const Parts& src, int64_t src_row, const Parts& dst, int64_t dst_row, int64_t n,
                      Block blk) {
  for (int p = 0; p < f.nparts; ++p) {
    const int64_t rb = f.row_bytes(p), bytes = n / f.rows_per[p] * rb;
    const uint8_t* s = src.p[p] + src_row / f.rows_per[p] * rb;
    uint8_t* d = dst.p[p] + dst_row / f.rows_per[p] * rb;
    KVC_FOR(i, bytes, blk) d[i] = s[i];
  }
  block_sync();
}

// Rotate rows [0, n) of x [n][d] in place, a row per thread.
KVC_HD void rotate_rows(float* x, int64_t n, int64_t d, Block blk) {
  KVC_FOR(t, n, blk) rotate_serial(x + t * d, d);
  block_sync();
}

// Quantize x [n][d] into rows [row0, row0 + n) (per-channel formats: whole blocks); tmp: n * d floats.
KVC_HD void quantize_rows(const Fmt& f, const float* x, int64_t n, const Parts& parts, int64_t row0, float* tmp,
                          int32_t* status, Block blk) {
  if (n <= 0) return;
  const int64_t d = f.d;
  if (f.rotate) {
    KVC_FOR(i, n * d, blk) tmp[i] = x[i];
    block_sync();
    rotate_rows(tmp, n, d, blk);
    x = tmp;
  }
  KVC_FOR(t, n, blk) {
    if (!storable(f, x + t * d)) *status = 1;
  }
  if (f.token_group == 1) {
    KVC_FOR(t, n, blk) quantize_token(f, x + t * d, parts, row0 + t);
  } else {
    const int64_t G = f.token_group;
    KVC_FOR(i, n / G * d, blk) quantize_channel_params(f, x + (i / d) * G * d, parts, row0 + (i / d) * G, i % d);
    block_sync();
    KVC_FOR(t, n, blk) pack_codes(f, x + t * d, parts, row0 + t);
  }
  block_sync();
}

// De-quantize rows [row0, row0 + n) into out [n][d] (rotated back for -rot formats).
KVC_HD void dequantize_rows(const Fmt& f, const Parts& parts, int64_t row0, int64_t n, float* out, Block blk) {
  KVC_FOR(i, n * f.d, blk) out[i] = element(f, parts, row0 + i / f.d, i % f.d);
  block_sync();
  if (f.rotate) rotate_rows(out, n, f.d, blk);
}

// The past rows of segment `seg` that keep their bytes: rows [*src, *src + n) of the past go to
// rows [*dst, *dst + n) of the present; n = 0 when none (a tier assembled in scratch by its append block).
KVC_HD int64_t kept_rows(const Stream& s, int seg, int64_t* src, int64_t* dst) {
  const Segment& g = s.seg[seg];
  *src = 0, *dst = 0;
  if (seg == s.sink_seg || seg == s.tier_seg[s.ntiers - 1]) return g.past_len;
  int t = 0;
  while (s.tier_seg[t] != seg) ++t;
  if (s.moves[t] > g.past_len) return 0;
  *src = s.moves[t];
  return g.past_len - s.moves[t];
}

template <typename W>
KVC_HD void copy_words(uint8_t* dst, const uint8_t* src, int64_t bytes, Block blk) {
  W* d = reinterpret_cast<W*>(dst);
  const W* s = reinterpret_cast<const W*>(src);
  KVC_FOR(i, bytes / int64_t(sizeof(W)), blk) d[i] = s[i];
}

struct Words16 {
  uint32_t w[4];
};

// One chunk of one (stream, segment, part, batch row, kv head) copy; block_y = (stream, segment, part).
KVC_HD void copy_program(const Params& P, int64_t block_x, int64_t block_y, Block blk) {
  const int st = int(block_y / (kMaxSegments * kMaxParts));
  const int seg = int(block_y / kMaxParts % kMaxSegments), part = int(block_y % kMaxParts);
  const Stream& s = P.stream[st];
  if (seg >= s.nseg || part >= s.seg[seg].f.nparts) return;
  int64_t src_row, dst_row;
  const int64_t rows = kept_rows(s, seg, &src_row, &dst_row);
  const Segment& g = s.seg[seg];
  const int64_t rp = g.f.rows_per[part], rb = g.f.row_bytes(part), bh_count = P.batch * P.heads;
  const int64_t bh = block_x % bh_count, start = block_x / bh_count * kCopyChunk, bytes = rows / rp * rb;
  if (start >= bytes) return;
  const int64_t n = bytes - start < kCopyChunk ? bytes - start : kCopyChunk;
  const uint8_t* src = g.past[part] + bh * (g.past_len / rp) * rb + src_row / rp * rb + start;
  uint8_t* dst = g.present[part] + bh * (g.len / rp) * rb + dst_row / rp * rb + start;
  const uint64_t align = uint64_t(reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | uint64_t(n));
  if (align % 16 == 0) copy_words<Words16>(dst, src, n, blk);
  else if (align % 4 == 0) copy_words<uint32_t>(dst, src, n, blk);
  else copy_words<uint8_t>(dst, src, n, blk);
}

// SegmentStore.append for one stream and one (b, h): native/src/kv_attention.cc's append_slice.
KVC_HD void append_program(const Params& P, int64_t block, Block blk) {
  const int64_t bh_count = P.batch * P.heads;
  const int st = int(block / bh_count);
  const int64_t bh = block % bh_count, S = P.S, D = P.D, cap = P.work_rows * D;
  const Stream& s = P.stream[st];
  float* buffers = P.work + (st * bh_count + bh) * 3 * cap;
  float* const A = buffers;
  float* const B = buffers + cap;
  float* const tmp = buffers + 2 * cap;
  uint8_t* scratch = P.scratch + (st * bh_count + bh) * P.scratch_bytes;
  const float* x = s.x + bh * S * D;
  if (P.window > 0) {  // KVWindowAttention: quantize the new rows, then write the kept window
    const Segment& old = s.seg[0];
    const Segment& fresh = s.seg[1];
    const Segment& kept = s.seg[2];
    const Fmt& f = fresh.f;
    const int64_t drop = P.total - kept.len;  // rows [drop, T + S) of past ++ new are kept
    const Parts added = slice(f, fresh.present, S, bh), out = slice(f, kept.present, kept.len, bh);
    quantize_rows(f, x, S, added, 0, tmp, P.status, blk);
    const int64_t from_past = old.past_len > drop ? old.past_len - drop : 0, from_new = kept.len - from_past;
    copy_rows(f, slice(f, old.past, old.past_len, bh), drop, out, 0, from_past, blk);
    copy_rows(f, added, S - from_new, out, from_past, from_new, blk);
    return;
  }
  const int64_t k = s.new_sinks;
  if (s.sink_seg >= 0) {  // past sinks: the copy blocks
    const Segment& g = s.seg[s.sink_seg];
    quantize_rows(g.f, x, k, slice(g.f, g.present, g.len, bh), g.past_len, tmp, P.status, blk);
  }
  const float* incoming = x + k * D;
  int64_t n_in = S - k;
  for (int t = 0; t < s.ntiers; ++t) {
    const Segment& g = s.seg[s.tier_seg[t]];
    const Fmt& f = g.f;
    const Parts past = slice(f, g.past, g.past_len, bh), present = slice(f, g.present, g.len, bh);
    if (t == s.ntiers - 1) {  // the bulk: past rows (copy blocks), then what arrives
      quantize_rows(f, incoming, n_in, present, g.past_len, tmp, P.status, blk);
      break;
    }
    const int64_t leaving = s.moves[t];
    float* out = incoming == A ? B : A;
    if (leaving <= g.past_len) {  // decode: the positions that leave are past rows; those that stay: copy blocks
      dequantize_rows(f, past, 0, leaving, out, blk);
      quantize_rows(f, incoming, n_in, present, g.past_len - leaving, tmp, P.status, blk);
    } else {  // new positions move on: assemble the tier in the scratch area first
      Parts tier{};
      int64_t offset = 0;
      for (int p = 0; p < f.nparts; ++p) {
        tier.p[p] = scratch + offset;
        offset += ((g.past_len + n_in) / f.rows_per[p] + 1) * f.row_bytes(p);
      }
      copy_rows(f, past, 0, tier, 0, g.past_len, blk);
      quantize_rows(f, incoming, n_in, tier, g.past_len, tmp, P.status, blk);
      dequantize_rows(f, tier, 0, leaving, out, blk);
      copy_rows(f, tier, leaving, present, 0, g.past_len + n_in - leaving, blk);
    }
    incoming = out;
    n_in = leaving;
  }
}

// kvc_update's block `block`: an append block, or a copy block.
KVC_HD void update_program(const Params& P, int64_t block, Block blk) {
  if (block < P.append_blocks) {
    append_program(P, block, blk);
    return;
  }
  const int64_t copy = block - P.append_blocks;
  copy_program(P, copy % P.copy_blocks, copy / P.copy_blocks, blk);
}

// Rotate x[0..d) in place with the block: one butterfly stage per phase.
KVC_HD void rotate_block(float* x, int64_t d, Block blk) {
  for (int64_t h = 1; h < d; h *= 2) {
    KVC_FOR(i, d / 2, blk) {
      const int64_t j = (i / h) * 2 * h + i % h;
      const float a = x[j], b = x[j + h];
      x[j] = a + b;
      x[j + h] = a - b;
    }
    block_sync();
  }
  const float scale = float(1.0 / sqrt(double(d)));
  KVC_FOR(i, d, blk) x[i] = x[i] * scale;
  block_sync();
}

KVC_HD int find_segment(const Stream& s, int64_t position) {
  int i = 0;
  while (i + 1 < s.nseg && !(s.seg[i].len > 0 && position < s.seg[i].start + s.seg[i].len)) ++i;
  return i;
}

KVC_HD int64_t merge_smem_floats(int64_t d) { return 2 * d + 4; }

KVC_HD void merge_program(const Params& P, int64_t row, Block blk, float* smem) {
  const int64_t D = P.D, chunks = P.chunks;
  const float* partial = P.partial + row * chunks * (2 + 2 * D);
  float* a = smem;
  float* ar = a + D;
  float* stat = ar + D;
  KVC_FOR(z, 1, blk) {
    float top = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) top = fmax_(top, partial[c * (2 + 2 * D)]);
    float l = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) l += kvc::exp_nonpositive(partial[c * (2 + 2 * D)] - top) * partial[c * (2 + 2 * D) + 1];
    stat[0] = top;
    stat[1] = l;
  }
  block_sync();
  KVC_FOR(e, D, blk) {
    float x = 0.0f, xr = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pc = partial + c * (2 + 2 * D);
      const float w = kvc::exp_nonpositive(pc[0] - stat[0]);
      x += w * pc[2 + e];
      xr += w * pc[2 + D + e];
    }
    a[e] = x;
    ar[e] = xr;
  }
  block_sync();
  if (P.rotated_values) rotate_block(ar, D, blk);
  const bool failed = *P.status != 0;
  KVC_FOR(e, D, blk) P.output[row * D + e] = failed ? NAN : (a[e] + ar[e]) / stat[1];
}

// shared floats the attend program needs for `rows` query heads
KVC_HD int64_t attend_smem_floats(int64_t d, int64_t rows) { return 4 * rows * d + 2 * kTile * d + rows * (kTile + 4); }

// Query heads [j0, j0 + heads_per_block) of kv head h at query position s, over positions
// [chunk * chunk_len, ...) up to s's own: the tile of keys and values is de-quantized once for them.
KVC_HD void attend_program(const Params& P, int64_t block, Block blk, float* smem) {
  const int64_t D = P.D, R = P.heads_per_block, groups = P.q_per_kv / R;
  const int64_t chunk = block % P.chunks, item = block / P.chunks;
  const int64_t group = item % groups, s = item / groups % P.S, bh = item / (groups * P.S);
  const int64_t b = bh / P.heads, h = bh % P.heads, hq0 = h * P.q_per_kv + group * R;
  float* q = smem;              // [R][D], scaled
  float* qr = q + R * D;        // [R][D], rotated
  float* acc = qr + R * D;      // [R][D]
  float* accr = acc + R * D;    // [R][D]
  float* ktile = accr + R * D;  // [kTile][D]
  float* vtile = ktile + kTile * D;
  float* p = vtile + kTile * D;  // [R][kTile]
  float* stat = p + R * kTile;   // [R][4]: m, l, correction
  int64_t c0 = chunk * P.chunk_len;
  int64_t c1 = c0 + P.chunk_len;
  if (c1 > P.total) c1 = P.total;
  if (c1 > P.past + s + 1) c1 = P.past + s + 1;  // causal
  if (P.window > 0 && c0 < P.past + s - P.window + 1) c0 = P.past + s - P.window + 1;  // the query's window
  // query row of head hq0 + j: ((b * Hq + hq0 + j) * S + s)
  const int64_t hq_count = P.heads * P.q_per_kv;
  KVC_FOR(i, R * D, blk) {
    const int64_t j = i / D, e = i % D;
    q[i] = P.query[((b * hq_count + hq0 + j) * P.S + s) * D + e] * P.scale;
    qr[i] = q[i];
    acc[i] = 0.0f;
    accr[i] = 0.0f;
  }
  KVC_FOR(j, R, blk) {
    stat[4 * j] = -INFINITY;
    stat[4 * j + 1] = 0.0f;
  }
  block_sync();
  if (P.rotated_keys && c0 < c1)
    for (int64_t j = 0; j < R; ++j) rotate_block(qr + j * D, D, blk);
  const Stream& ks = P.stream[0];
  const Stream& vs = P.stream[1];
  for (int64_t t0 = c0; t0 < c1;) {
    const Segment& kg = ks.seg[find_segment(ks, t0)];
    const Segment& vg = vs.seg[find_segment(vs, t0)];
    int64_t n = c1 - t0;
    if (n > kTile) n = kTile;
    if (n > kg.start + kg.len - t0) n = kg.start + kg.len - t0;
    if (n > vg.start + vg.len - t0) n = vg.start + vg.len - t0;
    const Parts kp = slice(kg.f, kg.present, kg.len, bh), vp = slice(vg.f, vg.present, vg.len, bh);
    KVC_FOR(i, n * D, blk) {
      ktile[i] = element(kg.f, kp, t0 - kg.start + i / D, i % D);
      vtile[i] = element(vg.f, vp, t0 - vg.start + i / D, i % D);
    }
    block_sync();
    const float* qk = kg.f.rotate ? qr : q;
    KVC_FOR(i, R * n, blk) {
      const int64_t j = i / n, t = i % n;
      float dot = 0.0f;
      for (int64_t e = 0; e < D; ++e) dot += qk[j * D + e] * ktile[t * D + e];
      p[j * kTile + t] = dot;
    }
    block_sync();
    KVC_FOR(j, R, blk) {
      float* pj = p + j * kTile;
      float* sj = stat + 4 * j;
      float top = sj[0];
      for (int64_t t = 0; t < n; ++t) top = fmax_(top, pj[t]);
      const float correction = kvc::exp_nonpositive(sj[0] - top);
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        pj[t] = kvc::exp_nonpositive(pj[t] - top);
        sum += pj[t];
      }
      sj[0] = top;
      sj[1] = sj[1] * correction + sum;
      sj[2] = correction;
    }
    block_sync();
    float* target = vg.f.rotate ? accr : acc;
    float* other = vg.f.rotate ? acc : accr;
    KVC_FOR(i, R * D, blk) {
      const int64_t j = i / D, e = i % D;
      const float correction = stat[4 * j + 2];
      float a = target[i] * correction;
      for (int64_t t = 0; t < n; ++t) a += p[j * kTile + t] * vtile[t * D + e];
      target[i] = a;
      other[i] = other[i] * correction;
    }
    block_sync();
    t0 += n;
  }
  if (P.chunks == 1) {  // the only chunk: o = (acc + acc_rot H) / l, as the merge would compute it
    const bool failed = *P.status != 0;
    for (int64_t j = 0; j < R; ++j) {
      if (P.rotated_values) rotate_block(accr + j * D, D, blk);
      float* out = P.output + ((b * hq_count + hq0 + j) * P.S + s) * D;
      KVC_FOR(e, D, blk) out[e] = failed ? NAN : (acc[j * D + e] + accr[j * D + e]) / stat[4 * j + 1];
    }
    return;
  }
  for (int64_t j = 0; j < R; ++j) {
    float* out = P.partial + (((b * hq_count + hq0 + j) * P.S + s) * P.chunks + chunk) * (2 + 2 * D);
    KVC_FOR(z, 1, blk) {
      out[0] = stat[4 * j];
      out[1] = stat[4 * j + 1];
    }
    KVC_FOR(e, D, blk) {
      out[2 + e] = acc[j * D + e];
      out[2 + D + e] = accr[j * D + e];
    }
  }
  // the work item's last chunk to finish merges its rows
  global_fence();
  block_sync();
  KVC_FOR(z, 1, blk) stat[3] = fetch_add(P.done + item) == uint32_t(P.chunks - 1) ? 1.0f : 0.0f;
  block_sync();
  const bool last = stat[3] != 0.0f;
  block_sync();
  if (!last) return;
  global_fence();
  for (int64_t j = 0; j < R; ++j) merge_program(P, (b * hq_count + hq0 + j) * P.S + s, blk, smem);
}

}  // namespace kvc_dev
