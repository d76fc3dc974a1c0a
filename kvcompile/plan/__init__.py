"""Planning: the optimizer (budget or quality target), presets and measured refinement.

The :class:`~kvcompile.kv.precision_map.PrecisionMap` artifact lives in :mod:`kvcompile.kv`; it is
re-exported here for callers that think of it as the plan's output.
"""

from kvcompile.kv.precision_map import PrecisionMap

__all__ = ["PrecisionMap"]
