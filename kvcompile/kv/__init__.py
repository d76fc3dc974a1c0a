"""The segment model: which cached position is stored in which form, at what cost, in which store.

Everything above it (cache, ops, export, targets, measure, calibrate, plan, validate) imports it;
it imports none of them (only quant, artifacts and errors).

* :mod:`kvcompile.kv.precision_map` — the :class:`PrecisionMap` artifact (scheme per site and class);
* :mod:`kvcompile.kv.segments` — the segment algebra (boundaries, class lengths, memory), once,
  over Python ints, ONNX shape ops and TensorRT dimension expressions;
* :mod:`kvcompile.kv.grouping` — which kv heads share a store;
* :mod:`kvcompile.kv.store` — :class:`SegmentStore`, the packed segments every cache appends through;
* :mod:`kvcompile.kv.rope` — :class:`RopeTable`, RoPE on read for keys stored before RoPE (``-pr``).
"""

from kvcompile.kv.precision_map import STREAMS, PrecisionMap
from kvcompile.kv.segments import CLASSES, MEMORY_ACCOUNTING, SegmentRule, bulk_end, class_lengths

__all__ = ["CLASSES", "MEMORY_ACCOUNTING", "STREAMS", "PrecisionMap", "SegmentRule", "bulk_end", "class_lengths"]
