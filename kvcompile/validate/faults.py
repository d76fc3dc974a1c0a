"""Broken exports on purpose: faults that ``kvcompile validate`` must catch.

Each fault is an export whose graph does not implement the map its manifest claims, the way an
exporter bug would:

* ``window_off_by_one``: the graph's recent window is one position shorter than the map's;
* ``dropped_sink``: the graph keeps one sink position fewer than the map;
* ``swapped_head_groups``: the graph stores kv heads 0 and 1 with each other's schemes;
* ``wrong_predictors`` (maps with cross-layer predictors): the graph's predictor weights are 1 %
  too large (:func:`wrong_predictors`);
* ``wrong_scale``: the graph's integer de-quantizer reads every scale 5 % too large (a wrong
  constant or dtype in the scale path).  It lives in the ONNX lowering, so it shows when the
  function bodies run (``native=False``); the native library's formats are checked bit for bit
  by ``tests/unit/test_native.py``.

The first three keep the faithful graph of a map A and claim another map F that differs from A
as described (:func:`claimed_map`): validating compares the graph (A) with the torch reference of
F.  ``wrong_scale`` is exported under :func:`wrong_scale_lowering` and claims the true map.  Used
by ``tests/integration/test_validate_faults.py`` and ``bench/validate_faults.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from kvcompile.kv.precision_map import PrecisionMap

MAP_FAULTS = ("window_off_by_one", "dropped_sink", "swapped_head_groups")
FAULTS = (*MAP_FAULTS, "wrong_scale")


def probe_map(geometry) -> PrecisionMap:
    """The map the faults are injected into: every kind of segment, and kv heads that differ.

    KIVI-2 (per-channel 2-bit keys, per-token 2-bit values, groups of 32) behind an fp16 window of 32
    and 4 fp16 sinks, except kv head 1 of every layer, which is KIVI-4.
    """
    from kvcompile.plan.presets import resolve_map

    two = resolve_map("kivi-2", geometry, sink_tokens=4, recent_window=32)
    four = resolve_map("kivi-4", geometry, sink_tokens=4, recent_window=32)
    schemes = {stream: {cls: tuple((row[0], four.schemes[stream][cls][i][1], *row[2:]) for i, row in enumerate(grid))
                        for cls, grid in classes.items()} for stream, classes in two.schemes.items()}
    return replace(two, schemes=schemes, description="kivi-2 w32 +4 sinks, kv head 1 kivi-4", _resolved={})


def claimed_map(pmap: PrecisionMap, fault: str) -> PrecisionMap:
    """The map a graph built from ``pmap`` would wrongly claim under ``fault`` (one of MAP_FAULTS)."""
    if fault == "window_off_by_one":
        return replace(pmap, recent_window=pmap.recent_window + 1, _resolved={})
    if fault == "dropped_sink":
        return replace(pmap, sink_tokens=pmap.sink_tokens + 1, _resolved={})
    if fault == "swapped_head_groups":
        if pmap.num_kv_heads < 2:
            raise ValueError("swapped_head_groups needs at least 2 kv heads")
        schemes = {stream: {cls: tuple((row[1], row[0], *row[2:]) for row in grid) for cls, grid in classes.items()}
                   for stream, classes in pmap.schemes.items()}
        if schemes == pmap.schemes:
            raise ValueError("swapped_head_groups needs kv heads 0 and 1 to differ somewhere in the map")
        return replace(pmap, schemes=schemes, _resolved={})
    raise ValueError(f"unknown map fault {fault!r}; expected one of {', '.join(MAP_FAULTS)}")


@contextlib.contextmanager
def wrong_predictors(factor: float = 1.01):
    """Within the block, graphs exported for maps with cross-layer predictors multiply every predictor
    weight by ``factor`` (a wrong constant on the prediction path); the export still carries, and its
    manifest claims, the true predictors, which the torch reference reads."""
    import numpy as np

    from kvcompile.export import predicted

    original = predicted.add_predictor_weights

    def faulty(w, predictors):
        names = original(w, predictors)
        for weight, _ in names.values():
            w.arrays[weight] = w.arrays[weight] * np.float32(factor)
        return names

    predicted.add_predictor_weights = faulty
    try:
        yield
    finally:
        predicted.add_predictor_weights = original


@contextlib.contextmanager
def wrong_scale_lowering(factor: float = 1.05):
    """Within the block, exported integer de-quantizers read every scale ``factor`` times too large."""
    from kvcompile.ops import lowering as low
    from kvcompile.quant.integer import IntegerScheme

    quantize, dequantize = low.lowering("int8")

    def faulty_dequantize(b, scheme, parts, head_dim):
        stored = 10 if scheme.scale_dtype.itemsize == 2 else 1  # ONNX FLOAT16 / FLOAT
        scale = b.op("Cast", b.op("Mul", b.op("Cast", parts[1], to=1), b.const(factor)), to=stored)
        return dequantize(b, scheme, [parts[0], scale, *parts[2:]], head_dim)

    low.register_lowering(IntegerScheme, quantize, faulty_dequantize)
    try:
        yield
    finally:
        low.register_lowering(IntegerScheme, quantize, dequantize)
