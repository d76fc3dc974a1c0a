"""Validation: the exact cache simulation and the quality harness (later: polygraphy comparisons)."""
