"""Calibration defaults, importable without torch (the CLI's help text uses them)."""

DEFAULT_SCHEMES = ["fp16", "int8", "fp8", "int4", "int4-g64", "int4-ch", "int4-ch-g64", "int4-rot", "nf4", "int3", "int3-g64", "int3-ch", "int3-ch-g64",
                   "int2", "int2-g64", "int2-ch", "int2-ch-g64", "int2-rot", "int2-g64-rot",
                   "lm4-rot", "lm3-rot", "lm3-g64-rot", "lm2-rot", "lm2-g64-rot"]
DEFAULT_SINKS = [0, 1, 4]
DEFAULT_WINDOWS = [0, 16, 32, 128]
ESTIMATORS = ("hybrid", "fisher", "attention")
