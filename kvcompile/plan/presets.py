"""Named map presets and resolution of what a user passes as ``--map`` / ``--scheme``.

A preset builds a :class:`PrecisionMap` for a model geometry.  Built in:

* ``kivi-4`` / ``kivi-2``: KIVI-style (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
  Quantization for KV Cache", ICML 2024): keys per channel and values per token, asymmetric,
  group 32, with a full-precision (fp16) window of the 32 most recent positions, no sinks.

Any storage scheme name (``int4``, ``nf4``, ``int2-ch``, ...) is also accepted and gives a
*uniform* map: that scheme for every position of K and V, no sinks, no window.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from kvcompile.errors import KvcompileError
from kvcompile.models.adapters import KVGeometry
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.quant import get_scheme

PresetFactory = Callable[[KVGeometry], PrecisionMap]
PRESETS: dict[str, PresetFactory] = {}


def register_preset(name: str, factory: PresetFactory) -> None:
    PRESETS[name] = factory


def _kivi(bits: int) -> PresetFactory:
    def build(g: KVGeometry) -> PrecisionMap:
        return PrecisionMap.uniform(
            g.num_layers, g.num_kv_heads, g.head_dim, key=f"int{bits}-ch", value=f"int{bits}",
            recent_window=32, sink_tokens=0, description=f"KIVI-style {bits}-bit: K per channel, V per token, g32, fp16 window 32",
        )
    return build


register_preset("kivi-4", _kivi(4))
register_preset("kivi-2", _kivi(2))


def resolve_map(spec: str | PrecisionMap, geometry: KVGeometry, *, sink_tokens: int | None = None,
                recent_window: int | None = None, model: str = "") -> PrecisionMap:
    """A map from a JSON path, a preset name or a storage scheme name, with optional overrides."""
    if isinstance(spec, PrecisionMap):
        pmap = spec
    elif spec.endswith(".json") or Path(spec).is_file():
        pmap = PrecisionMap.load(spec)
    elif spec in PRESETS:
        pmap = PRESETS[spec](geometry)
    else:
        try:
            get_scheme(spec)
        except KvcompileError as e:
            if not str(e).startswith("unknown storage scheme"):
                raise  # a known family with bad parameters: its own message is more precise
            raise KvcompileError(
                f"{spec!r} is neither a map file, a preset ({', '.join(PRESETS)}) nor a storage scheme "
                "(see `kvcompile schemes`)"
            ) from None
        pmap = PrecisionMap.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, key=spec,
                                    description=f"uniform {spec}")
    if not isinstance(spec, PrecisionMap) and not (spec.endswith(".json") or Path(spec).is_file()):
        pmap = pmap.windowed(geometry.layer_windows)  # presets and uniform maps follow the model's windows
    pmap.check_model(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.layer_windows)
    overrides = {}
    if sink_tokens is not None:
        overrides["sink_tokens"] = sink_tokens
    if recent_window is not None:
        overrides["recent_window"] = recent_window
    if model and not pmap.model:
        overrides["model"] = model
    return replace(pmap, **overrides, _resolved={}) if overrides else pmap
