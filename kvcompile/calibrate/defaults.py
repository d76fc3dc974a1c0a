"""Calibration defaults, importable without torch (the CLI's help text uses them)."""

# The per-channel 2- and 3-bit formats are Lloyd-Max codes (lm<b>-ch[-g64]) rather than uniform ones
# (int<b>-ch[-g64], the same bits): bench/quality_per_bit.py --stages lloyd_channel measured the swap.
DEFAULT_SCHEMES = ["fp16", "int8", "fp8", "int4", "int4-g64", "int4-ch", "int4-ch-g64", "int4-rot", "nf4", "int3", "int3-g64", "lm3-ch", "lm3-ch-g64",
                   "int2", "int2-g64", "lm2-ch", "lm2-ch-g64", "int2-rot", "int2-g64-rot",
                   "lm4-rot", "lm3-rot", "lm3-g64-rot", "lm2-rot", "lm2-g64-rot"]
DEFAULT_SINKS = [0, 1, 4]
DEFAULT_WINDOWS = [0, 16, 32, 128]
ESTIMATORS = ("hybrid", "fisher", "attention")
