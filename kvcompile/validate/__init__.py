"""Validation of exported artifacts against the torch reference: lockstep comparison and fault probes.

Quality measurement (perplexity, KL, the exact simulation) lives in :mod:`kvcompile.measure`."""
