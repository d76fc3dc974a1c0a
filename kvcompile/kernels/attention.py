"""Decode attention over a packed, mixed-precision KV cache (split along the sequence).

For one new position per sequence, query heads ``j*R .. j*R+R-1`` attend to kv head j (GQA,
``R = q_heads / kv_heads``) over every cached position, whatever segment (sink, bulk, recent)
and format (fp16, or integer codes with per-token or per-channel parameters) it is stored in::

    o = sum_t softmax_t(q . k_t * sm_scale) v_t

Each program handles one (sequence, kv head) and a contiguous split of one segment's positions:
it de-quantizes K/V tiles of ``BLOCK_T`` positions in registers (never writing them back) and
keeps an online-softmax state ``(m, l, acc)`` = (running max score, sum of exp(s - m),
sum of exp(s - m) v).  Partial states of all splits of all segments are merged stably::

    M = max_i m_i,   o = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i

(flash-decoding; Dao et al. 2023).  Bytes read per position are the packed bytes, which is what
makes low-bit caches faster than fp16 when decoding is bandwidth-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvcompile.kv.store import Stored  # noqa: F401  (segments are built from the store's records)
from kvcompile.quant.base import StorageScheme



@triton.jit
def _load_tile(codes_ptr, scale_ptr, zero_ptr, bh, t_offs, t_mask, T, D: tl.constexpr, KIND: tl.constexpr,
               BITS: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, LEVELS: tl.constexpr):
    """De-quantized float32 tile [BLOCK_T, D]: positions ``t_offs`` (within a stored segment of T
    positions) of head row ``bh``."""
    d = tl.arange(0, D)
    rows = bh * T + t_offs
    if KIND == 0:
        x = tl.load(codes_ptr + rows[:, None] * D + d[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        W: tl.constexpr = D // PER
        byte = tl.load(codes_ptr + rows[:, None] * W + (d // PER)[None, :], mask=t_mask[:, None], other=0)
        code = ((byte.to(tl.int32) & 255) >> ((d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
        if KIND == 1:  # per-token groups: parameters [bh, T, D/G]
            p_off = rows[:, None] * (D // G) + (d // G)[None, :]
        else:  # per-channel groups: parameters [bh, T/G, D]
            p_off = (bh * (T // G) + t_offs // G)[:, None] * D + d[None, :]
        scale = tl.load(scale_ptr + p_off, mask=t_mask[:, None], other=0.0).to(tl.float32)
        if SYM:
            x = (code.to(tl.float32) - LEVELS) * scale
        else:
            zero = tl.load(zero_ptr + p_off, mask=t_mask[:, None], other=0.0).to(tl.float32)
            x = zero + code.to(tl.float32) * scale
    return x


@triton.jit
def _decode_partials_kernel(q_ptr, kc, ks, kz, vc, vs, vz, m_ptr, l_ptr, acc_ptr, T, K_T, K_START, V_T, V_START,
                            sm_scale, tiles_per_split,
                            n_splits, split_offset, total_splits, HKV: tl.constexpr, REP: tl.constexpr,
                            REP_P: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                            K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_G: tl.constexpr, K_SYM: tl.constexpr,
                            K_LEVELS: tl.constexpr, V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_G: tl.constexpr,
                            V_SYM: tl.constexpr, V_LEVELS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * REP + r)[:, None] * D + d[None, :], mask=(r < REP)[:, None], other=0.0)
    m = tl.full([REP_P], -1.0e30, tl.float32)
    l = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, D], tl.float32)
    for i in range(0, tiles_per_split):
        t_offs = (split * tiles_per_split + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t_offs < T
        k = _load_tile(kc, ks, kz, bh, K_START + t_offs, t_mask, K_T, D, K_KIND, K_BITS, K_G, K_SYM, K_LEVELS)
        v = _load_tile(vc, vs, vz, bh, V_START + t_offs, t_mask, V_T, D, V_KIND, V_BITS, V_G, V_SYM, V_LEVELS)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * sm_scale  # [REP_P, BLOCK_T]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = (bh * REP_P + r) * total_splits + split_offset + split
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)


@dataclass(frozen=True)
class Segment:
    """A run of ``length`` positions whose keys sit at ``key_start`` in ``key`` and values at
    ``value_start`` in ``value`` (K and V segments need not align: their bulk blocks differ)."""

    key: Stored
    key_start: int
    value: Stored
    value_start: int
    length: int

    @classmethod
    def whole(cls, key: Stored, value: Stored) -> "Segment":
        assert key.positions == value.positions
        return cls(key, 0, value, 0, key.positions)


def _format_args(scheme: StorageScheme, prefix: str) -> dict:
    from kvcompile.kernels import kernel_format

    return {f"{prefix}_{k}": v for k, v in kernel_format(scheme).arguments(scheme).items()}


def _pointers(scheme: StorageScheme, parts: dict) -> tuple:
    from kvcompile.kernels import kernel_format

    return kernel_format(scheme).pointers(scheme, parts)


def decode_attention(query: torch.Tensor, segments: list[Segment], sm_scale: float, block_t: int = 64,
                     splits: int | None = None) -> torch.Tensor:
    """``query`` [B, Hq, D] float32 -> attention output [B, Hq, D] float32 over all ``segments``.

    ``splits``: programs per (sequence, kv head) and segment (default: enough tiles per program
    to keep ~4 splits, at least one tile each).
    """
    from kvcompile.kernels import unsupported_reason

    segments = [s for s in segments if s.length > 0]
    if not segments:
        raise ValueError("decode_attention needs at least one cached position")
    b, hq, d = query.shape
    first = next(iter(segments[0].key.parts.values()))
    hkv = first.shape[1]
    rep = hq // hkv
    rep_p = max(1, 1 << (rep - 1).bit_length())
    plan = []
    for seg in segments:
        for scheme in (seg.key.scheme, seg.value.scheme):
            reason = unsupported_reason(scheme)
            if reason:
                raise ValueError(reason)
        tiles = math.ceil(seg.length / block_t)
        n = max(1, min(tiles, splits or 4))
        plan.append((seg, n, math.ceil(tiles / n)))
    total = sum(n for _, n, _ in plan)
    dev = query.device
    m = torch.empty(b * hkv, rep_p, total, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty(b * hkv, rep_p, total, d, device=dev)
    q = query.float().contiguous()
    offset = 0
    for seg, n, per in plan:
        kc, ks, kz = _pointers(seg.key.scheme, seg.key.parts)
        vc, vs, vz = _pointers(seg.value.scheme, seg.value.parts)
        _decode_partials_kernel[(b * hkv, n)](
            q, kc, ks, kz, vc, vs, vz, m, l, acc, seg.length, seg.key.positions, seg.key_start,
            seg.value.positions, seg.value_start, sm_scale, per, n, offset, total,
            HKV=hkv, REP=rep, REP_P=rep_p, D=d, BLOCK_T=block_t,
            **_format_args(seg.key.scheme, "K"), **_format_args(seg.value.scheme, "V"))
        offset += n
    # stable merge of the partial softmax states
    top = m.max(dim=-1, keepdim=True).values
    w = torch.exp(m - top)
    out = (acc * w[..., None]).sum(-2) / (l * w).sum(-1, keepdim=True)
    return out[:, :rep].reshape(b, hkv * rep, d)


def reference_decode_attention(query: torch.Tensor, segments: list[Segment], sm_scale: float) -> torch.Tensor:
    """The oracle: de-quantize every segment with the torch reference, then plain softmax attention (float64)."""
    from kvcompile.quant import QuantizedTensor

    def dequantized(stored: Stored, start: int, length: int) -> torch.Tensor:
        shape = (*next(iter(stored.parts.values())).shape[:2], stored.positions, query.shape[-1])
        full = stored.scheme.dequantize(QuantizedTensor(stored.scheme.name, shape, stored.parts))
        return full[:, :, start:start + length]

    keys = [dequantized(s.key, s.key_start, s.length) for s in segments if s.length]
    values = [dequantized(s.value, s.value_start, s.length) for s in segments if s.length]
    k = torch.cat(keys, dim=2).double()
    v = torch.cat(values, dim=2).double()
    b, hq, d = query.shape
    rep = hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", query.double(), k) * sm_scale
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v).float()
