"""Grouped integer storage: ``int{2,3,4,8}``, asymmetric or symmetric, per token or per channel.

Name grammar (defaults omitted from the canonical name)::

    int<bits>[-sym][-ch][-g<group>][-s32][-rot]

* ``-sym``  symmetric (no zero point); default asymmetric (scale + minimum per group).
* ``-ch``   groups run along positions for one channel (KIVI keys); default along channels of one
  position.
* ``-g<G>`` group size, default 32.
* ``-s32``  float32 scales / zero points; default float16.
* ``-rot``  Hadamard-rotate each vector before quantizing (see :mod:`kvcompile.quant.hadamard`).

Asymmetric maths, per group with values ``x_i``: the zero point ``z = round_down_fp16(min x)`` and
scale ``s = round_up_fp16((max x - z) / (2^b - 1))`` are what is stored; codes are
``q_i = round((x_i - z) / s)`` in ``[0, 2^b - 1]`` and ``x_hat_i = z + s q_i``.  Because the stored
``z, s`` cover the group, nothing clips and ``|x_i - x_hat_i| <= s / 2`` exactly (up to float32
rounding of the arithmetic, ~1e-7 relative).  Symmetric: ``s = round_up(absmax / (2^(b-1) - 1))``,
``q_i = round(x_i / s)``, same bound.

Memory per element: ``8 * packed_length(D, b) / D`` for the codes (exactly b when D is a multiple
of 8, see :mod:`kvcompile.quant.packing`), plus ``n_params * scale_bits / G`` for scales (and zero
points) shared by a group of G elements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvcompile.errors import SchemeError
from kvcompile.quant.base import (FP16_MAX, QuantizedTensor, StorageScheme, check_input, check_range, empty_quantized,
                                  is_empty, register_family, round_to_dtype)
from kvcompile.quant.hadamard import rotate
from kvcompile.quant.packing import pack_bits, packed_length, unpack_bits
from kvcompile.quant import onnx_ops as ox
from kvcompile.quant.base import KIND_CHANNEL, KIND_TOKEN, NATIVE_INTEGER, FamilyTraits, KernelFormat, register_traits

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_GROUP = 32
_NAME = re.compile(r"int(?P<bits>[0-9]+)(?P<sym>-sym)?(?P<ch>-ch)?(?:-g(?P<group>[0-9]+))?(?P<s32>-s32)?(?P<rot>-rot)?")


@dataclass(frozen=True)
class IntegerScheme(StorageScheme):
    bits: int
    group_size: int = DEFAULT_GROUP
    axis: str = "token"
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    rotate: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise SchemeError(f"int{self.bits}: integer schemes support bits {SUPPORTED_BITS}, got {self.bits}")
        if not 1 <= self.group_size <= 65536:
            raise SchemeError(f"int{self.bits}: group size must be from 1 to 65536, got {self.group_size}")
        if self.axis == "channel" and self.rotate:
            raise SchemeError("-rot mixes channels and is only defined for per-token groups, not -ch")

    @property
    def name(self) -> str:  # canonical: defaults omitted
        parts = [f"int{self.bits}"]
        if self.symmetric:
            parts.append("sym")
        if self.axis == "channel":
            parts.append("ch")
        if self.group_size != DEFAULT_GROUP:
            parts.append(f"g{self.group_size}")
        if self.scale_dtype == torch.float32:
            parts.append("s32")
        if self.rotate:
            parts.append("rot")
        return "-".join(parts)

    @property
    def token_group(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    @property
    def levels(self) -> int:
        """Codes run over ``[0, levels]`` (asymmetric, ``2^b - 1``) or ``[-levels, levels]`` stored offset
        by ``levels`` (symmetric, ``2^(b-1) - 1``)."""
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def _scale_bits(self) -> int:
        return torch.finfo(self.scale_dtype).bits

    def bits_per_element(self, head_dim: int) -> float:
        code_bits = 8 * packed_length(head_dim, self.bits) / head_dim
        n_params = 1 if self.symmetric else 2
        return code_bits + n_params * self._scale_bits / self.group_size

    # grouped view: [..., n_groups, G, ...] with the reduction axis at -2 (channel) or -1 (token)
    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, d = x.shape
        if self.axis == "token":
            if d % self.group_size:
                raise SchemeError(f"{self.name}: head dim {d} is not a multiple of the group size {self.group_size}")
            return x.reshape(*lead, t, d // self.group_size, self.group_size)
        return x.reshape(*lead, t // self.group_size, self.group_size, d)

    def _reduce_dim(self) -> int:
        return -1 if self.axis == "token" else -2

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        # (max - min) must fit the scale's dtype too
        max_abs = (FP16_MAX if self.scale_dtype == torch.float16 else torch.finfo(torch.float32).max) / 2
        x = check_input(x, self)
        if is_empty(x):
            return empty_quantized(self, tuple(x.shape))
        if self.rotate:
            x = rotate(x)
        x = check_range(x, self, max_abs)
        g = self._grouped(x)
        r = self._reduce_dim()
        if self.symmetric:
            scale = round_to_dtype(g.abs().amax(r, keepdim=True) / self.levels, self.scale_dtype, "up")
            scale = torch.where(scale == 0, torch.finfo(self.scale_dtype).tiny, scale)
            q = torch.round(g / scale.float()).clamp(-self.levels, self.levels) + self.levels
            parts = {"scale": scale.squeeze(r)}
        else:
            zero = round_to_dtype(g.amin(r, keepdim=True), self.scale_dtype, "down")
            span = g.amax(r, keepdim=True) - zero.float()
            scale = round_to_dtype(span / self.levels, self.scale_dtype, "up")
            scale = torch.where(scale == 0, torch.finfo(self.scale_dtype).tiny, scale)
            q = torch.round((g - zero.float()) / scale.float()).clamp(0, self.levels)
            parts = {"scale": scale.squeeze(r), "zero": zero.squeeze(r)}
        codes = q.to(torch.uint8).reshape(x.shape)
        return QuantizedTensor(self.name, tuple(x.shape), {"codes": pack_bits(codes, self.bits), **parts})

    def _params(self, q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self._reduce_dim()
        scale = q.parts["scale"].float().unsqueeze(r)
        zero = q.parts["zero"].float().unsqueeze(r) if "zero" in q.parts else None
        return scale, zero

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if is_empty(q.shape):
            return torch.zeros(q.shape)
        codes = unpack_bits(q.parts["codes"], self.bits, q.shape[-1]).float()
        g = self._grouped(codes)
        scale, zero = self._params(q)
        if self.symmetric:
            x = (g - self.levels) * scale
        else:
            x = zero + g * scale
        x = x.reshape(q.shape)
        return rotate(x) if self.rotate else x

    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        scale, _ = self._params(q)
        g = torch.zeros(q.shape)
        return (self._grouped(g) + scale / 2).reshape(q.shape)


def _parse(name: str) -> IntegerScheme | None:
    m = _NAME.fullmatch(name) if isinstance(name, str) else None  # fullmatch: no trailing newline
    if not m:
        return None
    return IntegerScheme(
        bits=int(m["bits"]),
        group_size=int(m["group"]) if m["group"] else DEFAULT_GROUP,
        axis="channel" if m["ch"] else "token",
        symmetric=bool(m["sym"]),
        scale_dtype=torch.float32 if m["s32"] else torch.float16,
        rotate=bool(m["rot"]),
    )


register_family("integer", _parse, ("int8", "int4", "int3", "int2", "int4-ch", "int2-ch", "int8-sym", "int4-rot", "int2-rot"))


# ----------------------------------------------------------------------------- traits: ONNX and kernels

def _int_quantize(b: ox.GraphBuilder, s: IntegerScheme, x: str, head_dim: int) -> list[str]:
    if s.rotate:
        x = ox.rotate(b, x, head_dim)
    g = b.reshape(x, ox.grouped_shape(b, x, s.group_size, s.axis))
    r = b.i64(-1 if s.axis == "token" else -2)
    half = s.scale_dtype.itemsize == 2
    levels = float(s.levels)
    if s.symmetric:
        amax = b.op("ReduceMax", b.op("Abs", g), r, keepdims=1)
        scale, scale_f = ox.stored_scale(b, b.op("Div", amax, b.const(levels)), half)
        q = b.op("Add", b.op("Clip", b.op("Round", b.op("Div", g, scale_f)), b.const(-levels), b.const(levels)),
                 b.const(levels))
        params = [scale]
    else:
        zero, zero_f = ox.stored_zero(b, b.op("ReduceMin", g, r, keepdims=1), half)
        span = b.op("Sub", b.op("ReduceMax", g, r, keepdims=1), zero_f)
        scale, scale_f = ox.stored_scale(b, b.op("Div", span, b.const(levels)), half)
        q = b.op("Clip", b.op("Round", b.op("Div", b.op("Sub", g, zero_f), scale_f)), b.const(0.0), b.const(levels))
        params = [scale, zero]
    codes = b.reshape(b.op("Cast", q, to=7), b.op("Shape", x))
    return [ox.pack(b, codes, s.bits), *[b.op("Squeeze", p, r) for p in params]]


def _int_dequantize(b: ox.GraphBuilder, s: IntegerScheme, parts: list[str], head_dim: int) -> str:
    codes = b.op("Cast", ox.unpack(b, parts[0], s.bits), to=1)
    g = b.reshape(codes, ox.grouped_shape(b, codes, s.group_size, s.axis))
    r = b.i64(-1 if s.axis == "token" else -2)
    scale = b.op("Unsqueeze", b.op("Cast", parts[1], to=1), r)
    if s.symmetric:
        x = b.op("Mul", b.op("Sub", g, b.const(float(s.levels))), scale)
    else:
        zero = b.op("Unsqueeze", b.op("Cast", parts[2], to=1), r)
        x = b.op("Add", zero, b.op("Mul", g, scale))
    x = b.reshape(x, b.op("Shape", codes))
    return ox.rotate(b, x, head_dim) if s.rotate else x


#: code widths the Triton kernels unpack
KERNEL_BITS = (2, 4, 8)


def _kernel_unsupported(scheme: IntegerScheme) -> str | None:
    if scheme.bits not in KERNEL_BITS:
        return f"{scheme.name}: kernels pack {KERNEL_BITS}-bit codes, not {scheme.bits}"
    if scheme.rotate:
        return f"{scheme.name}: Hadamard-rotated schemes have no kernel yet"
    return None


def _native(s: IntegerScheme) -> dict:
    return {"kind": NATIVE_INTEGER, "bits": s.bits, "group": s.group_size, "channel": int(s.axis == "channel"),
            "symmetric": int(s.symmetric), "scale_bytes": s.scale_dtype.itemsize, "rotate": int(s.rotate),
            "double_quant": 0}


register_traits(IntegerScheme, FamilyTraits(
    onnx=(_int_quantize, _int_dequantize),
    native=_native,
    kernel=KernelFormat(
        unsupported=_kernel_unsupported,
        arguments=lambda s: {"KIND": KIND_TOKEN if s.axis == "token" else KIND_CHANNEL, "BITS": s.bits,
                             "G": s.group_size, "SYM": s.symmetric, "LEVELS": s.levels},
        pointers=lambda s, parts: (parts["codes"].contiguous(), parts["scale"].contiguous(),
                                   parts["zero"].contiguous() if "zero" in parts else parts["scale"].contiguous()))))
