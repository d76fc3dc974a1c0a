"""Bit packing of small unsigned codes into signed int8 containers, without padding bits.

Codes are unsigned integers in ``[0, 2**bits)`` along the last axis.  They are packed in *blocks*
of ``lcm(bits, 8)`` bits: ``per = lcm / bits`` codes fill ``lcm / 8`` bytes exactly (8 three-bit
codes in 3 bytes, 2 four-bit codes in 1 byte), the first code in the lowest bits of the block,
bytes little-endian.  Only the last block of a row is zero-padded when the row length is not a
multiple of ``per``.  Containers are *signed* int8 because TensorRT plugin I/O has no UINT8; the
bytes are the same as unsigned storage.
"""

from __future__ import annotations

import math

import torch


def block_shape(bits: int) -> tuple[int, int]:
    """(codes per block, bytes per block) for ``bits``-bit codes."""
    block_bits = math.lcm(bits, 8)
    return block_bits // bits, block_bits // 8


def packed_length(n: int, bits: int) -> int:
    """Number of int8 containers for a row of ``n`` codes."""
    per, nbytes = block_shape(bits)
    return math.ceil(n / per) * nbytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` [..., n] (values in [0, 2**bits)) into int8 [..., packed_length(n, bits)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    per, nbytes = block_shape(bits)
    n = codes.shape[-1]
    c = codes.to(torch.int64)
    pad = math.ceil(n / per) * per - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    block = (c << (torch.arange(per, dtype=torch.int64, device=c.device) * bits)).sum(-1)  # < 2**56
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=c.device) * 8
    packed = (block.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.reshape(*packed.shape[:-2], -1).to(torch.uint8).view(torch.int8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes [..., n]."""
    per, nbytes = block_shape(bits)
    raw = packed.view(torch.uint8).to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    block = (raw << (torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8)).sum(-1)
    codes = (block.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int64, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
