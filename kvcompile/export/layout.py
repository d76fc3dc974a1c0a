"""How a PrecisionMap's cache appears as graph inputs and outputs.

For each layer and stream (key, value) the kv heads are grouped by their (sink, recent, bulk)
scheme triple (:func:`kvcompile.kv.grouping.stream_groups`, as in the torch cache).  A group is either

* *plain*: all three classes fp16, so the segments concatenate to one fp16 tensor and no custom
  op is needed; named as ONNX Runtime GenAI does, ``past_key_values.{l}.key`` /
  ``present.{l}.key``, ``[batch, heads, past_sequence, head_dim]``;
* *packed*: one ``KVCacheUpdate`` node whose segments' parts are graph I/O named
  ``past_key_values.{l}.key[.h{heads}].{segment}.{part}`` (``present.`` for outputs), e.g.
  ``past_key_values.3.key.bulk.codes`` int8 ``[batch, heads, past_sequence, 16]``.  The ``.h0-2``
  head tag appears only when a layer's heads are split into several groups.

The layout is a pure function of the map and the geometry, and is written into the export
manifest, so runtimes need no other knowledge of the map to feed the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvcompile.kv.grouping import stream_groups
from kvcompile.kv.precision_map import STREAMS, PrecisionMap


@dataclass(frozen=True)
class CachePort:
    """One cache tensor: graph input ``past`` and output ``present``, ``[B, heads, rows, width]``."""

    past: str
    present: str
    dtype: str  # "float16" | "float32" | "int8"
    width: int
    rows_per: int  # positions per row (1, or G for per-channel parameters)


@dataclass(frozen=True)
class HeadGroup:
    layer: int
    stream: str  # "key" | "value"
    heads: tuple[int, ...]
    sink_scheme: str
    recent_scheme: str
    bulk_scheme: str
    age_tiers: str  # the KVCacheUpdate attribute: "scheme:window,..." of the age tiers ("" = none)
    plain: bool
    ports: tuple[CachePort, ...]

    def op_attrs(self, pmap: PrecisionMap) -> dict:
        """Attributes of this group's KVCacheUpdate node."""
        return {"sink_scheme": self.sink_scheme, "recent_scheme": self.recent_scheme, "bulk_scheme": self.bulk_scheme,
                "sink_tokens": pmap.sink_tokens, "recent_window": pmap.recent_window, "head_dim": pmap.head_dim,
                "age_tiers": self.age_tiers}


def cache_layout(pmap: PrecisionMap) -> list[HeadGroup]:
    """Head groups of every (layer, stream), in graph order."""
    from kvcompile.ops.cache_update import KV_CACHE_UPDATE, format_age_tiers

    groups = []
    for layer in range(pmap.num_layers):
        for stream in STREAMS:
            by_triple = stream_groups(pmap, layer, stream)
            split = len(by_triple) > 1
            for schemes, heads in by_triple:
                sink, recent, bulk = (schemes[c].name for c in ("sink", "recent", "bulk"))
                ages = format_age_tiers((schemes[f"age{i}"].name, w) for i, w in enumerate(pmap.age_windows, 1))
                base = f"{layer}.{stream}" + (f".h{'-'.join(map(str, heads))}" if split else "")
                plain = all(s.name == "fp16" for s in schemes.values())
                if plain:
                    ports = (CachePort(f"past_key_values.{base}", f"present.{base}", "float16", pmap.head_dim, 1),)
                else:
                    attrs = {"sink_scheme": sink, "recent_scheme": recent, "bulk_scheme": bulk,
                             "sink_tokens": pmap.sink_tokens, "recent_window": pmap.recent_window,
                             "head_dim": pmap.head_dim, "age_tiers": ages}
                    ports = tuple(
                        CachePort(f"past_key_values.{base}.{p.name.removeprefix('past_')}",
                                  f"present.{base}.{p.name.removeprefix('past_')}", p.dtype, int(p.shape[-1]),
                                  1 if p.shape[2] == "T" else int(p.shape[2].split("/")[1]))
                        for p in KV_CACHE_UPDATE.inputs(attrs)[:-1])
                groups.append(HeadGroup(layer, stream, tuple(heads), sink, recent, bulk, ages, plain, ports))
    return groups


def layout_to_json(groups: list[HeadGroup]) -> list[dict]:
    return [asdict(g) for g in groups]
