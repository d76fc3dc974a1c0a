"""Orthonormal Hadamard rotation along the head dimension.

Rotating each key/value vector by ``H = H_D / sqrt(D)`` (Sylvester construction, D a power of two)
spreads an outlier channel over all channels before quantization (as llama.cpp's rotated KV
cache and TurboQuant do).  ``H`` is symmetric and orthogonal, ``H @ H = I``, so attention is
unchanged if the rotation is undone after dequantizing (what the torch cache does) or folded
into the query and the output projection: ``q·k = (qH)·(kH)`` and ``sum a v = (sum a vH) H``.

The rotation is computed as a fast Walsh-Hadamard transform: ``log2 D`` butterfly stages, stage
``h`` mapping each pair ``(a, b) = (x_i, x_{i+h})`` (``i mod 2h < h``) to ``(a + b, a - b)``,
then one multiplication by ``1/sqrt(D)``.  Every output element is a fixed sequence of
elementwise float32 additions, so it does not depend on how many positions are rotated at once.
A matrix product does: BLAS blocks its sums differently for one row than for many, which made a
whole window (the simulation) and one position at a time (decoding) differ in the last bit.
The ONNX lowering (:func:`kvcompile.ops.lowering.rotate`) runs the same stages, bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch

from kvcompile.errors import SchemeError


def check_power_of_two(dim: int) -> None:
    if dim < 1 or dim & (dim - 1):
        raise SchemeError(f"Hadamard rotation needs a power-of-two head dimension, got {dim}")


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int) -> torch.Tensor:
    """``[dim, dim]`` float32 orthonormal Hadamard matrix (dim a power of two); for tests and docs."""
    check_power_of_two(dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).float()


def rotation_scale(dim: int) -> float:
    """The float32 factor ``1/sqrt(dim)`` applied after the butterflies."""
    return float(torch.tensor(1.0 / math.sqrt(dim), dtype=torch.float32))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last axis (its own inverse), as a fast Walsh-Hadamard transform.

    ``x``: ``[..., D]`` float, D a power of two.  Equal to ``x @ hadamard_matrix(D)`` up to float
    rounding, and bit-identical for a row whatever the leading shape.
    """
    *lead, d = x.shape
    check_power_of_two(d)
    y = x
    h = 1
    while h < d:
        pairs = y.reshape(*lead, d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape) * rotation_scale(d)
