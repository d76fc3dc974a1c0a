"""Orthonormal Hadamard rotation along the head dimension.

Rotating each key/value vector by ``H = H_D / sqrt(D)`` (Sylvester construction, D a power of two)
spreads an outlier channel over all channels before quantization (as llama.cpp's rotated KV
cache and TurboQuant do).  ``H`` is symmetric and orthogonal, ``H @ H = I``, so attention is
unchanged if the rotation is undone after dequantizing (what the torch cache does) or folded
into the query and the output projection: ``q·k = (qH)·(kH)`` and ``sum a v = (sum a vH) H``.
"""

from __future__ import annotations

import functools

import torch

from kvcompile.errors import SchemeError


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int) -> torch.Tensor:
    """``[dim, dim]`` float32 orthonormal Hadamard matrix (dim a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise SchemeError(f"Hadamard rotation needs a power-of-two head dimension, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim**0.5


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last axis (its own inverse)."""
    return x @ hadamard_matrix(x.shape[-1]).to(x.device, x.dtype)
