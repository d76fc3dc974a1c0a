"""Triton kernels for the packed KV cache: quantize-on-append and decode attention.

* :func:`quantize` — integer schemes (2/4/8 bits, asymmetric or symmetric, per-token or per-channel
  groups, float16 or float32 parameters): bit-identical to the scheme's torch ``quantize``.
* :func:`decode_attention` — one query position per sequence attending over a head group's
  segments (sinks, bulk, age tiers, recent) read *packed* (fp16 or integer), GQA, the sequence split into
  chunks whose partial softmax states are merged stably.

Triton runs on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1`` (exact, slow), which is how
CI tests them.  Each kernel's oracle is the torch reference of the storage formats.  Importing
this package does not import triton; :func:`available` says whether the kernels can run here.
"""

from __future__ import annotations

import os

import kvcompile.quant  # noqa: F401  (registers the families and their traits)
from kvcompile.quant.base import KernelFormat, StorageScheme, families_with, family_traits, update_traits
from kvcompile.quant.integer import KERNEL_BITS, IntegerScheme


def available(device: str = "cuda") -> tuple[bool, str]:
    """``(ok, reason)``: whether the Triton kernels can run on ``device`` tensors here."""
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if device == "cpu":
        knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the flag once, at import
        interpret = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
        if not interpret:
            return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter)"
        return True, "Triton interpreter"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, torch.cuda.get_device_name()


def register_kernel_format(scheme_class: type, traits: KernelFormat) -> None:
    """Give a storage family kernel support (its module normally registers it in its traits)."""
    update_traits(scheme_class, kernel=traits)


def kernel_format(scheme: StorageScheme) -> KernelFormat:
    """The kernel traits of ``scheme``'s family (see :func:`unsupported_reason` first)."""
    return family_traits(scheme).kernel


def unsupported_reason(scheme: StorageScheme) -> str | None:
    """Why the kernels cannot handle ``scheme`` (None if they can)."""
    traits = family_traits(scheme).kernel
    if traits is None:
        have = " and ".join(families_with("kernel"))
        return f"{scheme.name}: the {type(scheme).__name__} family has no kernel yet ({have} do)"
    return traits.unsupported(scheme)


def quantize(scheme: StorageScheme, x):
    from kvcompile.kernels.append import quantize as _quantize

    return _quantize(scheme, x)


def quantize_for_store(scheme: StorageScheme, x):
    """A :data:`kvcompile.kv.store.Quantizer`: the append kernel for integer schemes, the
    reference (a cast) for fp16; bit-identical to the scheme's torch ``quantize`` either way."""
    if isinstance(scheme, IntegerScheme):
        return quantize(scheme, x)
    return scheme.quantize(x)


def decode_attention(query, segments, sm_scale: float, block_t: int = 64, splits: int | None = None):
    from kvcompile.kernels.attention import decode_attention as _decode

    return _decode(query, segments, sm_scale, block_t=block_t, splits=splits)


__all__ = ["KernelFormat", "kernel_format", "register_kernel_format", "available", "decode_attention", "quantize", "quantize_for_store", "unsupported_reason", "KERNEL_BITS"]
