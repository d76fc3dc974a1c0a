"""``kvcompile::KVQuantize`` and ``kvcompile::KVDequantize``: one storage scheme, one segment.

KVQuantize maps float32 states ``[B, H, T, D]`` to the scheme's stored parts (for example
``codes`` int8 ``[B, H, T, D*b/8]``, ``scale`` / ``zero`` float16 ``[B, H, T, D/G]``, or
``[B, H, T/G, D]`` for per-channel schemes); KVDequantize maps them back to float32
``[B, H, T, D]``.  The reference is the scheme's own torch ``quantize`` / ``dequantize``
(:mod:`kvcompile.quant`); the ONNX body is its lowering (:mod:`kvcompile.ops.lowering`).
"""

from __future__ import annotations

import torch

from kvcompile.ops.lowering import lowering
from kvcompile.ops.spec import Attribute, OpSpec, Port, register_op
from kvcompile.quant import QuantizedTensor, get_scheme
from kvcompile.quant.base import part_layout

ONNX_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8"}

ATTRIBUTES = (
    Attribute("scheme", "string", "storage scheme name (kvcompile schemes), e.g. int4, int2-ch-g64, nf4, fp16"),
    Attribute("head_dim", "int", "D, the head dimension"),
)


def part_ports(scheme_name: str, head_dim: int, prefix: str = "") -> tuple[Port, ...]:
    """Ports of a scheme's stored parts: ``[B, H, T/r, width]`` each."""
    ports = []
    for p in part_layout(get_scheme(scheme_name), head_dim):
        rows = "T" if p.rows_per == 1 else f"T/{p.rows_per}"
        ports.append(Port(prefix + p.name, ONNX_DTYPE_NAMES[p.dtype], ("B", "H", rows, str(p.width))))
    return tuple(ports)


STATES = Port("states", "float32", ("B", "H", "T", "D"), "keys or values of H kv heads at T positions")


def _quantize_reference(attrs, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q = get_scheme(attrs["scheme"]).quantize(states)
    return tuple(q.parts.values())


def _dequantize_reference(attrs, *parts: torch.Tensor) -> tuple[torch.Tensor]:
    scheme = get_scheme(attrs["scheme"])
    layout = part_layout(scheme, attrs["head_dim"])
    shape = (*parts[0].shape[:-1], attrs["head_dim"])
    q = QuantizedTensor(scheme.name, shape, {p.name: t for p, t in zip(layout, parts)})
    return (scheme.dequantize(q),)


def _quantize_body(b, attrs, inputs):
    quantize, _ = lowering(attrs["scheme"])
    return quantize(b, get_scheme(attrs["scheme"]), inputs[0], attrs["head_dim"])


def _dequantize_body(b, attrs, inputs):
    _, dequantize = lowering(attrs["scheme"])
    return [dequantize(b, get_scheme(attrs["scheme"]), list(inputs), attrs["head_dim"])]


KV_QUANTIZE = register_op(OpSpec(
    name="KVQuantize", version=1,
    doc="Quantize and pack float32 K or V states [B,H,T,D] into the parts of one storage scheme.",
    attributes=ATTRIBUTES,
    inputs=lambda a: (STATES,),
    outputs=lambda a: part_ports(a["scheme"], a["head_dim"]),
    reference=_quantize_reference,
    body=_quantize_body,
))

KV_DEQUANTIZE = register_op(OpSpec(
    name="KVDequantize", version=1,
    doc="Unpack and dequantize the parts of one storage scheme to float32 states [B,H,T,D].",
    attributes=ATTRIBUTES,
    inputs=lambda a: part_ports(a["scheme"], a["head_dim"]),
    outputs=lambda a: (STATES,),
    reference=_dequantize_reference,
    body=_dequantize_body,
))
