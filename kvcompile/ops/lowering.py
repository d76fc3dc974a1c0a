"""Storage schemes in standard ONNX ops: the bodies of ``KVQuantize`` / ``KVDequantize``.

Each family's lowering lives in its own module beside its torch reference (``kvcompile.quant.integer``,
``.floating``, ``.nf4``, built from :mod:`kvcompile.quant.onnx_ops`) and is registered in its
:class:`~kvcompile.quant.base.FamilyTraits`; it reproduces the reference operation for operation, in
the same float32 order, so that ONNX Runtime produces the *same bits* (tested on edge values in
``tests/unit/test_ops.py``), ``-rot`` schemes included: the Hadamard rotation is a butterfly of
elementwise adds on both sides, not a matmul.  Inputs are ``[B, H, T, D]`` float32 tensors with any
T, including 0 (an empty cache segment).  A scheme without a lowering is rejected at export with a
one-line error.
"""

from __future__ import annotations

from typing import Callable

from kvcompile.errors import ExportError
from kvcompile.ops.builder import Builder
from kvcompile.quant import get_scheme
from kvcompile.quant.base import StorageScheme, families_with, family_traits, update_traits
from kvcompile.quant.onnx_ops import (grouped_shape, pack, rotate, round_fp16, stored_scale,  # noqa: F401
                                      stored_zero, to_int8_container, unpack)
from kvcompile.quant.packing import block_shape


#: ``quantize(builder, scheme, x, head_dim) -> part names`` (in :func:`part_layout` order)
QuantizeLowering = Callable[[Builder, StorageScheme, str, int], list[str]]
#: ``dequantize(builder, scheme, part names, head_dim) -> float32 [B,H,T,D]``
DequantizeLowering = Callable[[Builder, StorageScheme, list[str], int], str]


def register_lowering(scheme_class: type, quantize: QuantizeLowering, dequantize: DequantizeLowering) -> None:
    """Replace a family's ONNX lowering (its module registers the real one; tests inject faults)."""
    update_traits(scheme_class, onnx=(quantize, dequantize))


def lowering(scheme: StorageScheme | str) -> tuple[QuantizeLowering, DequantizeLowering]:
    scheme = get_scheme(scheme)
    onnx = family_traits(scheme).onnx
    if onnx is None:
        names = [c.replace("Scheme", "").lower() for c in families_with("onnx")]
        raise ExportError(f"storage scheme {scheme.name!r} has no ONNX lowering yet; the onnx target supports "
                          f"the families {', '.join(names)}")
    return onnx


def check_lowerable(scheme: StorageScheme, head_dim: int) -> None:
    """Raise :class:`ExportError` if ``scheme`` cannot be emitted for ``head_dim``."""
    lowering(scheme)
    bits = getattr(scheme, "bits", 16)
    if bits < 16 and head_dim % block_shape(bits)[0]:
        raise ExportError(f"{scheme.name}: head dim {head_dim} is not a multiple of {block_shape(bits)[0]} codes "
                          "per packed block, which the ONNX lowering needs")
