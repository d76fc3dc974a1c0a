"""Calibration: per-site sensitivity of model quality to KV quantization (see docs/theory.md)."""

from kvcompile.calibrate.artifact import Calibration
from kvcompile.calibrate.estimate import DEFAULT_SCHEMES, ESTIMATORS, calibrate

__all__ = ["Calibration", "DEFAULT_SCHEMES", "ESTIMATORS", "calibrate"]
