"""Lloyd-Max scalar codes, optionally after a Hadamard rotation (TurboQuant-style).

TurboQuant (Zandieh et al., arXiv 2504.19874) rotates each vector at random so that its
coordinates are near-Gaussian and independent, then stores each coordinate with the
MSE-optimal scalar quantizer of that distribution (Lloyd 1982, Max 1960).  Here:

* the rotation is the orthonormal Hadamard transform of :mod:`kvcompile.quant.hadamard` (``-rot``,
  optional), which spreads an outlier channel over the whole vector;
* per group of G coordinates of one position an absmax scale ``s = round_up_fp16(max |x|)``, so
  every ``y = x / s`` lies in ``[-1, 1]``;
* the ``2^b`` levels ``c_0 < ... < c_{2^b - 1}`` in ``(-1, 1)`` are the Lloyd-Max quantizer of the
  distribution of ``y`` for groups of G independent N(0, 1) values, symmetric.
  :func:`lloyd_max_codebook` computes them by Lloyd's iteration (nearest-level cells, then cell
  means) on 4,096 seeded groups in float64; ``LEVELS`` pins the G = 32 result so that a drift in
  the computation is caught.  The top level sits below 1: the group's largest value is clipped
  to it, which costs less than spending a level on one value per group.

``x_hat = s * c_code``; in the storage (rotated) domain
``|x - x_hat| <= s * max(max_k (c_{k+1} - c_k) / 2, 1 - c_top)``.  Bits: ``b + 16 / G`` per element.
Against ``int<b>`` per-token (``b + 32 / G``: a scale and a zero point per group) it saves the zero
point and spends the levels where Gaussian values are dense: on N(0, 1) data, ``lm2`` (2.5 bits)
has 0.73x the mean squared error of ``int2`` (3.0 bits) and 0.56x that of ``int2-g64`` (2.5 bits).
Name grammar: ``lm<b>[-ch][-g<G>][-rot]``, b in {2, 3, 4}, G = 32 by default.

Per channel (``-ch``, no ``-rot``): groups of G consecutive *positions* of one channel, as KIVI's
keys, normalized by the group's range instead of its absmax: a centre
``m = round_down_fp16((min x + max x) / 2)`` and a half-range ``h = round_up_fp16(max x - m)``
(so ``|x - m| <= h``), ``y = (x - m) / h`` in ``[-1, 1]``, levels the Lloyd-Max quantizer of that
``y`` for groups of G independent N(0, 1) values (``lloyd_max_codebook(b, G, centred=True)``).
``x_hat = m + h * c_code``; the same bound with ``h`` for ``s``.  Bits: ``b + 32 / G``, as
``int<b>-ch-g<G>`` (whose uniform levels it replaces).  This is KVQuant's per-channel non-uniform
key format (Hooper et al., arXiv 2401.18079, sec. 3.1, 3.4) with one codebook for all layers
instead of one per layer: on SmolLM2's keys and values, codebooks fitted per layer or per
(layer, head) on calibration text have a held-out squared error within 1.1 % of the Gaussian
one's on average (``python bench/codebooks.py``, ``bench/results/codebooks.json``).

The native library (``native/``) and the TensorRT plugin read groups of 16, 32, 64 and 128: their
codebooks are generated into ``native/src/lloyd_codebooks.h`` by ``tools/gen_lloyd_codebooks.py``
(a test checks them bit for bit); an export runs a head group with another group size through the
``KVAttention`` function body (``KVAttentionPortable``).  No Triton kernel: the kernel-mode torch
cache refuses these formats.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch

from kvcompile.errors import SchemeError
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import (FP16_MAX, NATIVE_LLOYD, channel_groups, FamilyTraits, QuantizedTensor, StorageScheme,
                                  check_input, check_range, empty_quantized, is_empty, register_family, register_traits,
                                  round_to_dtype)
from kvcompile.quant.hadamard import rotate
from kvcompile.quant.packing import pack_bits, unpack_bits

DEFAULT_GROUP = 32
BITS = (2, 3, 4)
_NAME = re.compile(r"lm(?P<bits>[0-9]+)(?P<ch>-ch)?(?:-g(?P<group>[0-9]+))?(?P<rot>-rot)?")
_SAMPLES, _ITERATIONS = 4096, 100
#: the positive levels of :func:`lloyd_max_codebook` for G = 32 (rounded to 6 digits)
LEVELS = {2: (0.196384, 0.665403), 3: (0.101205, 0.313613, 0.558902, 0.882434),
          4: (0.05002, 0.152912, 0.258341, 0.369152, 0.490195, 0.625292, 0.779659, 0.970227)}
#: the same for ``centred=True`` (the per-channel ``lm<b>-ch`` formats)
LEVELS_CENTRED = {2: (0.223871, 0.741296), 3: (0.112442, 0.344239, 0.602887, 0.922081),
                  4: (0.054384, 0.163311, 0.27486, 0.391332, 0.515376, 0.652373, 0.805333, 0.981254)}


@functools.lru_cache(maxsize=64)
def lloyd_max_codebook(bits: int, group: int, centred: bool = False) -> torch.Tensor:
    """The ``2^bits`` levels, ascending, in (-1, 1) (float32): Lloyd's iteration on ``|y|``, the
    coordinates of seeded N(0, 1) groups of ``group`` divided by the group's absmax (``centred``:
    minus the group's midrange, divided by its half-range), then mirrored.  Deterministic (fixed
    seed, float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_SAMPLES, group, generator=gen, dtype=torch.float64)
    if centred:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        y = ((x - (high + low) / 2) / ((high - low) / 2)).abs().reshape(-1)
    else:
        x = x.abs()
        y = (x / x.amax(-1, keepdim=True)).reshape(-1)
    half = 2 ** (bits - 1)
    levels = torch.linspace(0.5 / half, 1.0, half, dtype=torch.float64)
    for _ in range(_ITERATIONS):
        cells = torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros(half, dtype=torch.float64).index_add_(0, cells, y)
        counts = torch.zeros(half, dtype=torch.float64).index_add_(0, cells, torch.ones_like(y))
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
    return torch.cat([-levels.flip(0), levels]).float()


def nearest_level(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest each ``y`` (float32), the lower one of equal distances: what
    ``(y[..., None] - levels).abs().argmin(-1)`` gives, without its ``[..., 2^b]`` temporary.

    ``levels`` ascend, so ``fl(y - c_j)`` falls with j (float subtraction is monotone) and its
    magnitude falls until the last level at or below ``y`` (index ``j``) and rises after: the
    nearest is ``j`` or ``j + 1``.  Distances equal only in a true tie, since the levels lie 0.05
    or more apart in ``[-1, 1]``, far above float32's spacing there, so the first of equal is ``j``.
    """
    below = torch.zeros(y.shape, dtype=torch.uint8)  # j clamped to [0, 2^b - 2]: levels 1 .. 2^b - 2 at or below y
    for level in levels[1:-1].tolist():
        below += y >= level
    below = below.long()
    above = below + 1
    return torch.where((y - levels[above]).abs() < (y - levels[below]).abs(), above, below)


@dataclass(frozen=True)
class LloydMaxScheme(StorageScheme):
    bits: int = 2
    group_size: int = DEFAULT_GROUP
    rotate: bool = False
    axis: str = "token"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise SchemeError(f"lm: bits must be one of {BITS}, got {self.bits}")
        if not 2 <= self.group_size <= 65536:
            raise SchemeError(f"lm: group size must be from 2 to 65536, got {self.group_size}")
        if self.axis == "channel" and self.rotate:
            raise SchemeError("lm: -rot mixes channels and is only defined for per-token groups, not -ch")

    @property
    def name(self) -> str:
        return (f"lm{self.bits}" + ("-ch" if self.axis == "channel" else "")
                + (f"-g{self.group_size}" if self.group_size != DEFAULT_GROUP else "") + ("-rot" if self.rotate else ""))

    @property
    def token_group(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    @property
    def codebook(self) -> torch.Tensor:
        return lloyd_max_codebook(self.bits, self.group_size, self.axis == "channel")

    def bits_per_element(self, head_dim: int) -> float:
        if self.axis == "channel":  # a centre and a half-range per channel per G positions
            return self.bits + 32 / self.group_size
        return self.bits + 16 * (head_dim // self.group_size) / head_dim

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., T, D]`` as ``[..., T, D/G, G]`` (per token) or ``[..., T/G, G, D]`` (per channel)."""
        if self.axis == "token":
            return channel_groups(self, x, self.group_size)
        *lead, t, d = x.shape
        return x.reshape(*lead, t // self.group_size, self.group_size, d)

    def _reduce_dim(self) -> int:
        return -1 if self.axis == "token" else -2

    def normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(y, parameters)``: ``x`` [..., T, D] (checked, rotated for ``-rot``) grouped as
        :meth:`_grouped` and normalized into ``[-1, 1]``, and the stored parameters (``scale``, and
        ``centre`` per channel) with the reduced axis kept.  The codes are the nearest levels of ``y``."""
        # per channel, (max - centre) must fit a float16 half-range
        x = check_input(x, self, None if self.rotate else FP16_MAX / (2 if self.axis == "channel" else 1))
        if self.rotate:
            x = check_range(rotate(x), self, FP16_MAX)  # the scales hold the rotated values
        g, r = self._grouped(x), self._reduce_dim()
        if self.axis == "channel":
            low, high = g.amin(r, keepdim=True), g.amax(r, keepdim=True)
            centre = round_to_dtype((low + high) / 2, torch.float16, "down")  # <= midrange: max - centre bounds both
            scale = round_to_dtype(high - centre.float(), torch.float16, "up")
            scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
            return (g - centre.float()) / scale.float(), {"scale": scale, "centre": centre}
        scale = round_to_dtype(g.abs().amax(r, keepdim=True), torch.float16, "up")
        scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
        return g / scale.float(), {"scale": scale}

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        if is_empty(check_input(x, self)):
            return empty_quantized(self, tuple(x.shape))
        y, params = self.normalized(x)
        codes = nearest_level(y.contiguous(), self.codebook).to(torch.uint8).reshape(x.shape)
        r = self._reduce_dim()
        parts = {"codes": pack_bits(codes, self.bits), **{k: v.squeeze(r) for k, v in params.items()}}
        return QuantizedTensor(self.name, tuple(x.shape), parts)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if is_empty(q.shape):
            return torch.zeros(q.shape)
        codes = unpack_bits(q.parts["codes"], self.bits, q.shape[-1]).long()
        r = self._reduce_dim()
        values = self._grouped(self.codebook[codes]) * q.parts["scale"].float().unsqueeze(r)
        if self.axis == "channel":
            values = q.parts["centre"].float().unsqueeze(r) + values
        values = values.reshape(q.shape)
        return rotate(values) if self.rotate else values

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        book = self.codebook
        worst = max((book.diff().max() / 2).item(), 1.0 - book[-1].item())  # a gap, or |y| = 1 clipped to the top
        bound = q.parts["scale"].float().unsqueeze(self._reduce_dim()) * worst * (1 + 1e-6)
        return (self._grouped(torch.zeros(q.shape)) + bound).reshape(q.shape)


def _parse(name: str) -> LloydMaxScheme | None:
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if not m:
        return None
    return LloydMaxScheme(bits=int(m["bits"]), group_size=int(m["group"]) if m["group"] else DEFAULT_GROUP,
                          rotate=bool(m["rot"]), axis="channel" if m["ch"] else "token")


register_family("lloyd-max", _parse, ("lm2-rot", "lm3-rot", "lm4-rot", "lm2-g64-rot", "lm2", "lm2-ch", "lm3-ch"))


# ----------------------------------------------------------------------------- ONNX lowering, native reader (no kernel)

def _lm_quantize(b: ox.GraphBuilder, s: LloydMaxScheme, x: str, head_dim: int) -> list[str]:
    if s.rotate:
        x = ox.rotate(b, x, head_dim)
    g = b.reshape(x, ox.grouped_shape(b, x, s.group_size, s.axis))
    r = b.i64(s._reduce_dim())
    if s.axis == "channel":
        low, high = b.op("ReduceMin", g, r, keepdims=1), b.op("ReduceMax", g, r, keepdims=1)
        centre, centre_f = ox.stored_zero(b, b.op("Div", b.op("Add", low, high), b.const(2.0)), True)
        scale, scale_f = ox.stored_scale(b, b.op("Sub", high, centre_f), True)
        y = b.op("Div", b.op("Sub", g, centre_f), scale_f)
        params = [scale, centre]
    else:
        scale, scale_f = ox.stored_scale(b, b.op("ReduceMax", b.op("Abs", g), r, keepdims=1), True)
        y = b.op("Div", g, scale_f)
        params = [scale]
    book = b.const(s.codebook.numpy())
    codes = b.op("ArgMin", b.op("Abs", b.op("Sub", b.op("Unsqueeze", y, b.i64(-1)), book)), axis=-1, keepdims=0)
    return [ox.pack(b, b.reshape(codes, b.op("Shape", x)), s.bits), *[b.op("Squeeze", p, r) for p in params]]


def _lm_dequantize(b: ox.GraphBuilder, s: LloydMaxScheme, parts: list[str], head_dim: int) -> str:
    values = b.op("Gather", b.const(s.codebook.numpy()), ox.unpack(b, parts[0], s.bits), axis=0)
    g = b.reshape(values, ox.grouped_shape(b, values, s.group_size, s.axis))
    r = b.i64(s._reduce_dim())
    x = b.op("Mul", g, b.op("Unsqueeze", b.op("Cast", parts[1], to=1), r))
    if s.axis == "channel":
        x = b.op("Add", b.op("Unsqueeze", b.op("Cast", parts[2], to=1), r), x)
    x = b.reshape(x, b.op("Shape", values))
    return ox.rotate(b, x, head_dim) if s.rotate else x


#: group sizes whose codebooks native/src/lloyd_codebooks.h holds (tools/gen_lloyd_codebooks.py)
NATIVE_GROUPS = (16, 32, 64, 128)


def _native(s: LloydMaxScheme) -> dict | None:
    if s.group_size not in NATIVE_GROUPS:
        return None
    return {"kind": NATIVE_LLOYD, "bits": s.bits, "group": s.group_size, "channel": int(s.axis == "channel"), "symmetric": 0,
            "scale_bytes": 2, "rotate": int(s.rotate), "double_quant": 0}


register_traits(LloydMaxScheme, FamilyTraits(onnx=(_lm_quantize, _lm_dequantize), native=_native))


def _check_pinned() -> None:  # used by the tests
    for centred, pinned in ((False, LEVELS), (True, LEVELS_CENTRED)):
        for bits, levels in pinned.items():
            got = lloyd_max_codebook(bits, DEFAULT_GROUP, centred)[2 ** (bits - 1):].numpy()
            if not np.allclose(got, levels, atol=2e-6):
                raise AssertionError(f"lm{bits}{'-ch' if centred else ''}: computed levels {got} differ from the "
                                     f"pinned {levels}")
