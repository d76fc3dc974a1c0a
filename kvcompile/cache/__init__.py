"""KV caches: the mixed-precision cache (and, later, the prefix cache of compressed blocks)."""

from kvcompile.cache.mixed import MixedPrecisionCache

__all__ = ["MixedPrecisionCache"]
