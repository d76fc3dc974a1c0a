"""Custom ops of the ``kvcompile`` ONNX domain: one :class:`~kvcompile.ops.spec.OpSpec` each.

``KVQuantize`` / ``KVDequantize`` (one scheme, one segment), ``KVCacheUpdate`` (a head
group's sink/bulk/recent cache) and ``KVAttention`` (attention that reads and extends a head
group's packed K and V cache) and ``KVWindowAttention`` (the same over a sliding-window layer's
packed window).  Importing this package needs torch but not onnx; ONNX protos
are built on demand.
"""

from kvcompile.ops.attention import KV_ATTENTION, KV_ATTENTION_PORTABLE
from kvcompile.ops.cache_update import KV_CACHE_UPDATE
from kvcompile.ops.quantize import KV_DEQUANTIZE, KV_QUANTIZE
from kvcompile.ops.window_attention import KV_WINDOW_ATTENTION
from kvcompile.ops.spec import DOMAIN, OpSpec, collect_functions, get_op, op_names

__all__ = ["DOMAIN", "KV_ATTENTION", "KV_ATTENTION_PORTABLE", "KV_CACHE_UPDATE", "KV_DEQUANTIZE", "KV_QUANTIZE", "KV_WINDOW_ATTENTION", "OpSpec", "collect_functions", "get_op", "op_names"]
