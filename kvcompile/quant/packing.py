"""Bit packing of small unsigned codes into signed integer containers.

Codes are unsigned integers in ``[0, 2**bits)`` along the last axis.  ``per = container_bits //
bits`` codes share one container, the first code in the lowest bits (little-endian within the
container).  The last container of a row is zero-padded; ``container_bits - per * bits`` bits of
every container are padding when ``bits`` does not divide the container (3-bit codes: 10 per
int32, 2 padding bits).  Containers are *signed* (int8 / int32) because TensorRT plugin I/O has
no UINT8; the bytes are the same as unsigned storage.
"""

from __future__ import annotations

import math

import torch

_CONTAINERS = {8: torch.int8, 32: torch.int32}


def container_for(bits: int) -> int:
    """Container width used for ``bits``-bit codes: int8 when bits divides 8, else int32."""
    return 8 if 8 % bits == 0 else 32


def packed_length(n: int, bits: int) -> int:
    """Number of containers for a row of ``n`` codes."""
    return math.ceil(n / (container_for(bits) // bits))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` [..., n] (values in [0, 2**bits)) into containers [..., packed_length(n, bits)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    cbits = container_for(bits)
    per = cbits // bits
    n = codes.shape[-1]
    pad = packed_length(n, bits) * per - n
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(-1)
    if cbits == 8:
        return word.to(torch.uint8).view(torch.int8)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement wrap into int32
    return word.to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes [..., n]."""
    cbits = container_for(bits)
    per = cbits // bits
    if cbits == 8:
        word = packed.view(torch.uint8).to(torch.int64)
    else:
        word = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
