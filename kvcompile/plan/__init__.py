"""Precision maps: the artifact, presets, and (later) the optimizing planner."""

from kvcompile.plan.precision_map import PrecisionMap, bulk_end

__all__ = ["PrecisionMap", "bulk_end"]
