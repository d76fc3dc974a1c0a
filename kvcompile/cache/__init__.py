"""KV caches: the mixed-precision cache (and, later, the prefix cache of compressed blocks)."""

from kvcompile.cache.mixed import MixedPrecisionCache, enable_kernel_attention

__all__ = ["MixedPrecisionCache", "enable_kernel_attention"]
