"""KV caches: the mixed-precision cache and the prefix cache of compressed blocks."""

from kvcompile.cache.mixed import MixedPrecisionCache, enable_kernel_attention, model_ropes
from kvcompile.cache.prefix import PrefixCache, PrefixCacheStats

__all__ = ["MixedPrecisionCache", "PrefixCache", "PrefixCacheStats", "enable_kernel_attention", "model_ropes"]
