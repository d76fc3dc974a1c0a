"""Storage-scheme interface, the quantized-tensor container and the scheme registry.

A *storage scheme* says how one KV stream (the keys or the values of one kv head) is stored per
position.  Inputs are float tensors ``x`` of shape ``[..., T, D]``: T positions (tokens) of
head dimension D.  A scheme's ``quantize`` returns a :class:`QuantizedTensor` whose parts are
the real tensors a runtime would keep (packed codes, scales, zero points), so ``nbytes`` is
the true memory and ``bits_per_element`` can be checked against it.

Grouping axis:
* ``token``: groups of ``group_size`` consecutive channels inside one position; a position can be
  stored on its own (``token_group == 1``).
* ``channel``: groups of ``group_size`` consecutive positions of one channel (KIVI's per-channel
  keys); positions are stored in blocks of ``token_group == group_size``.

Schemes are found by name through a registry of *families*.  A family parses names of its own
grammar (``int4-ch-g64``) into a scheme object; adding a family is one module that calls
:func:`register_family`, plus one entry in the tests' list of schemes.
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvcompile.errors import SchemeError

FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedTensor:
    """The stored form of a ``[..., T, D]`` float tensor under one scheme.

    ``parts`` maps part names (``codes``, ``scale``, ``zero``, ...) to the tensors that are kept;
    ``shape`` is the logical (dequantized) shape.
    """

    scheme: str
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def num_tokens(self) -> int:
        return self.shape[-2]

    # Every part keeps the token axis at -2; a part with T / r rows holds one row per r positions
    # (r = 1 for codes, r = G for per-channel scales), so slicing must respect multiples of r.
    def slice_tokens(self, start: int, stop: int) -> "QuantizedTensor":
        """Positions ``[start, stop)``; both must be multiples of the scheme's position block."""
        t = self.num_tokens
        parts = {}
        for name, part in self.parts.items():
            r = t // part.shape[-2]
            if start % r or stop % r:
                raise ValueError(f"{self.scheme}: cannot slice positions [{start}, {stop}) across blocks of {r}")
            parts[name] = part[..., start // r : stop // r, :]
        return QuantizedTensor(self.scheme, (*self.shape[:-2], stop - start, self.shape[-1]), parts)

    @staticmethod
    def cat_tokens(items: "list[QuantizedTensor | None]") -> "QuantizedTensor | None":
        """Concatenate along positions (None entries are skipped)."""
        items = [q for q in items if q is not None and q.num_tokens]
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        first = items[0]
        parts = {name: torch.cat([q.parts[name] for q in items], dim=-2) for name in first.parts}
        t = sum(q.num_tokens for q in items)
        return QuantizedTensor(first.scheme, (*first.shape[:-2], t, first.shape[-1]), parts)


class StorageScheme(ABC):
    """A KV storage format.  Subclasses are frozen dataclasses with a canonical ``name``."""

    name: str
    #: bits of one stored code (16 for fp16), before scales and padding.
    bits: int
    #: ``"token"`` or ``"channel"`` (see module docstring).
    axis: str = "token"

    @property
    def token_group(self) -> int:
        """How many consecutive positions must be quantized together (1 = any single position)."""
        return 1

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """Quantize ``x`` [..., T, D]; T must be a multiple of ``token_group``."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Float32 tensor of shape ``q.shape``."""

    @abstractmethod
    def bits_per_element(self, head_dim: int) -> float:
        """Exact stored bits per element, counting codes, container padding, scales and zero points."""

    @abstractmethod
    def error_bound(self, q: QuantizedTensor) -> torch.Tensor:
        """Per-element bound on ``|x - dequantize(quantize(x))|`` in the *storage domain*.

        For rotated schemes the storage domain is ``x @ H``; because ``H`` is orthogonal the
        per-row L2 error is the same in both domains.  Shape: ``q.shape``.
        """

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class DerivedScheme(StorageScheme):
    """A format built on another one, ``base`` (outliers, pre-RoPE keys, a residual sketch): its
    name is the base's plus :meth:`suffix`; code width, grouping axis and position block are the
    base's.  Its extra parts are named in ``own_parts``; :meth:`base_part` strips them."""

    base: StorageScheme
    own_parts = ()

    def suffix(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return f"{self.base.name}{self.suffix()}"

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def axis(self) -> str:
        return self.base.axis

    @property
    def token_group(self) -> int:
        return self.base.token_group

    def base_part(self, q: QuantizedTensor) -> QuantizedTensor:
        """``q`` as the base format stores it (this format's own parts removed)."""
        return QuantizedTensor(self.base.name, q.shape, {k: v for k, v in q.parts.items() if k not in self.own_parts})


def derived_parser(suffix: str, make: Callable[..., "StorageScheme"]) -> "Parser":
    """A family parser for names ``<base><suffix>``: ``suffix`` is a regular expression whose named
    groups are passed to ``make(base, **groups)``; a name whose base is not a scheme is not ours."""
    pattern = re.compile(rf"(?P<base>.+){suffix}")

    def parse(name: str) -> StorageScheme | None:
        m = pattern.fullmatch(name) if isinstance(name, str) else None
        if not m:
            return None
        try:
            base = get_scheme(m["base"])
        except SchemeError:
            return None
        return make(base, **{k: v for k, v in m.groupdict().items() if k != "base"})

    return parse


# ----------------------------------------------------------------------------- input checks


def check_input(x: torch.Tensor, scheme: StorageScheme, max_abs: float | None = None) -> torch.Tensor:
    """Validate a tensor to quantize and return it as contiguous float32."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise SchemeError(f"{scheme.name}: expected a floating-point tensor [..., T, D], got {type(x).__name__}")
    if x.dim() < 2:
        raise SchemeError(f"{scheme.name}: expected shape [..., T, D], got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise SchemeError(f"{scheme.name}: expected a head dimension D >= 1, got shape {tuple(x.shape)}")
    if x.shape[-2] % scheme.token_group:
        raise SchemeError(
            f"{scheme.name}: stores positions in blocks of {scheme.token_group}, got T={x.shape[-2]}"
        )
    x = x.detach().to(torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise SchemeError(f"{scheme.name}: input has NaN or inf; expected finite K/V values")
    return check_range(x, scheme, max_abs)


def check_range(x: torch.Tensor, scheme: StorageScheme, max_abs: float | None) -> torch.Tensor:
    """Raise if ``x`` holds values that the scheme's float16 parameters cannot represent."""
    if max_abs is not None and x.numel() and x.abs().max().item() > max_abs:
        hint = "; use a scheme with float32 scales (suffix -s32)" if max_abs <= FP16_MAX else ""
        raise SchemeError(f"{scheme.name}: |x| up to {x.abs().max().item():.3g} exceeds what its scales can represent "
                          f"(expected |x| <= {max_abs:.6g}){hint}")
    return x


def round_to_dtype(t: torch.Tensor, dtype: torch.dtype, direction: str) -> torch.Tensor:
    """Round float32 ``t`` to ``dtype`` toward ``+inf`` (``"up"``) or ``-inf`` (``"down"``).

    Scales are rounded up and minima down so that the stored parameters still cover the data:
    then no value clips and the round-to-nearest error bound (half a step) holds exactly.
    """
    if dtype == torch.float32:
        return t.to(dtype)
    if direction == "down":  # float16 is symmetric: round_down(t) = -round_up(-t)
        return -round_to_dtype(-t, dtype, "up")
    r = t.to(dtype)
    return torch.where(r.float() < t, next_up_fp16(r), r)


def next_up_fp16(r: torch.Tensor) -> torch.Tensor:
    """The next float16 above each element of float16 ``r`` (``torch.nextafter`` on float16 CPU
    tensors returns its input unchanged on its scalar code path, so step the bit pattern instead)."""
    bits = r.view(torch.int16).to(torch.int32)
    up = torch.where(bits >= 0, bits + 1, bits - 1)  # magnitude up for +, down for -
    up = torch.where(bits == -32768, torch.ones_like(bits), up)  # -0 -> smallest positive subnormal
    return up.to(torch.int16).view(torch.float16)


def empty_quantized(scheme: "StorageScheme", shape: tuple[int, ...]) -> QuantizedTensor:
    """The stored form of an empty ``[..., T, D]`` tensor (T = 0 or a zero batch): every part empty,
    with the part's dtype and width (:func:`part_layout`), so empty segments concatenate and slice."""
    *lead, t, d = shape
    parts = {p.name: torch.zeros(*lead, t // p.rows_per, p.width, dtype=p.dtype) for p in part_layout(scheme, d)}
    return QuantizedTensor(scheme.name, tuple(shape), parts)


def channel_groups(scheme: "StorageScheme", x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` [..., D] viewed as [..., D/group, group] (groups of consecutive channels of one position)."""
    d = x.shape[-1]
    if d % group:
        raise SchemeError(f"{scheme.name}: head dim {d} is not a multiple of the group size {group}")
    return x.reshape(*x.shape[:-1], d // group, group)


def is_empty(x) -> bool:
    return math.prod(x.shape if torch.is_tensor(x) else x) == 0


# ----------------------------------------------------------------------------- registry

Parser = Callable[[str], "StorageScheme | None"]
_FAMILIES: dict[str, tuple[Parser, tuple[str, ...]]] = {}


def register_family(family: str, parse: Parser, examples: tuple[str, ...]) -> None:
    """Register a scheme family: ``parse(name)`` returns a scheme or None if the name is not its own."""
    _FAMILIES[family] = (parse, examples)
    _lookup.cache_clear()


def scheme_names() -> list[str]:
    """Canonical example names of every registered family (what ``kvcompile schemes`` lists)."""
    return [n for _, examples in _FAMILIES.values() for n in examples]


def get_scheme(name: str) -> StorageScheme:
    """Look a scheme up by name (``fp16``, ``int4``, ``int2-ch-g64``, ``nf4``, ``fp8``, ...)."""
    if isinstance(name, StorageScheme):  # already resolved
        return name
    if not isinstance(name, str) or len(name) > 64:
        raise SchemeError(f"expected a storage scheme name (a short string such as 'int4'), got {str(name)[:40]!r}")
    return _lookup(name)


@functools.lru_cache(maxsize=None)
def _lookup(name: str) -> StorageScheme:
    for parse, _ in _FAMILIES.values():
        scheme = parse(name)
        if scheme is not None:
            return scheme
    raise SchemeError(f"unknown storage scheme {name!r}; expected one of {', '.join(scheme_names())} (see `kvcompile schemes`)")


# ----------------------------------------------------------------------------- stored layout


@dataclass(frozen=True)
class PartLayout:
    """One stored part of a scheme: ``[..., T / rows_per, width]`` of ``dtype`` for T positions."""

    name: str
    dtype: torch.dtype
    rows_per: int  # positions per stored row: 1, or G for per-channel parameters
    width: int


@functools.lru_cache(maxsize=None)
def part_layout(scheme: StorageScheme, head_dim: int) -> tuple[PartLayout, ...]:
    """The parts ``scheme.quantize`` returns for a head dimension, in their stored order.

    Read off one quantization of a block of ``token_group`` positions, so it cannot disagree
    with the reference implementation.  The first part always has one row per position.
    """
    t = scheme.token_group
    q = scheme.quantize(torch.linspace(-1, 1, t * head_dim).reshape(1, 1, t, head_dim))
    return tuple(PartLayout(name, p.dtype, t // p.shape[-2], p.shape[-1]) for name, p in q.parts.items())


@functools.lru_cache(maxsize=1024)
def storable_scheme(name: str, head_dim: int) -> StorageScheme:
    """The scheme ``name`` if it is its canonical name and can store vectors of ``head_dim``.

    Raises :class:`SchemeError` otherwise (unknown or non-canonical name, a group size that does not
    divide ``head_dim``, a rotation of a non-power-of-two ``head_dim``): artifact loaders use it so
    that a map or calibration naming such a scheme is refused on load, not on use.
    """
    scheme = get_scheme(name)
    if scheme.name != name:
        raise SchemeError(f"{name!r} is not the canonical name; write {scheme.name!r}")
    part_layout(scheme, head_dim)  # quantizes one block: group sizes, packing and rotation must fit head_dim
    return scheme


# ----------------------------------------------------------------------------- family traits


#: kinds of stored tile the kernels read
KIND_FP16, KIND_TOKEN, KIND_CHANNEL = 0, 1, 2


@dataclass(frozen=True)
class KernelFormat:
    """How the kernels read a family: which of its schemes they support (``unsupported`` returns a
    reason or None), their compile-time arguments (``KIND, BITS, G, SYM, LEVELS``) and the parts
    they load (``(codes, scale, zero)`` tensors; unused ones may repeat another)."""

    unsupported: Callable[["StorageScheme"], str | None]
    arguments: Callable[["StorageScheme"], dict]
    pointers: Callable[["StorageScheme", dict], tuple]


#: kinds of format the native CPU library (``native/``) reads
NATIVE_FP16, NATIVE_INTEGER, NATIVE_NF4, NATIVE_LLOYD, NATIVE_FP8 = 0, 1, 2, 3, 4
#: fields of a native format descriptor, in the order ``kvc_describe_scheme`` writes them
NATIVE_FIELDS = ("kind", "bits", "group", "channel", "symmetric", "scale_bytes", "rotate", "double_quant")


@dataclass(frozen=True)
class FamilyTraits:
    """What a storage family provides beyond its torch reference (in the spirit of ggml's type
    traits): ``onnx`` = ``(quantize, dequantize)`` lowerings to standard ONNX ops
    (:mod:`kvcompile.quant.onnx_ops`), ``kernel`` = :class:`KernelFormat` (Triton), ``native`` =
    the scheme's descriptor for the native CPU library (``{field: int}`` over
    :data:`NATIVE_FIELDS`; the library parses scheme names itself, and a test checks that it reads
    every name to this descriptor); None where it has none.  The family's module registers them
    beside its scheme class, so adding a family is one module."""

    onnx: tuple[Callable, Callable] | None = None
    kernel: KernelFormat | None = None
    native: Callable[["StorageScheme"], dict] | None = None


_TRAITS: dict[type, FamilyTraits] = {}


def register_traits(scheme_class: type, traits: FamilyTraits) -> None:
    _TRAITS[scheme_class] = traits


def update_traits(scheme_class: type, **changes) -> None:
    """Replace some of a family's traits (``onnx=...``, ``kernel=...``), keeping the others."""
    from dataclasses import replace

    register_traits(scheme_class, replace(_TRAITS.get(scheme_class, FamilyTraits()), **changes))


def family_traits(scheme: "StorageScheme") -> FamilyTraits:
    """The traits of ``scheme``'s family (empty traits if it registered none)."""
    return _TRAITS.get(type(scheme), FamilyTraits())


def native_descriptor(scheme: "StorageScheme") -> dict | None:
    """The native library's descriptor of ``scheme`` (None: the library cannot read it)."""
    native = family_traits(scheme).native
    return native(scheme) if native is not None else None


def native_readable(scheme: "StorageScheme") -> bool:
    """Whether the native CPU library stores and reads ``scheme`` (else KVAttention falls back to
    its function body for that head group)."""
    return native_descriptor(scheme) is not None


def families_with(trait: str) -> list[str]:
    """Names of the scheme classes that have ``trait`` (``"onnx"``, ``"kernel"`` or ``"native"``)."""
    return sorted(c.__name__ for c, t in _TRAITS.items() if getattr(t, trait) is not None)
