"""How a PrecisionMap's cache appears as graph inputs and outputs.

For each layer the kv heads are grouped by their key *and* value schemes in every class
(:func:`kvcompile.kv.grouping.joint_groups`: the heads one ``KVAttention`` node reads), and each
group appears once per stream (key, value).  A group is either

* *plain*: every class fp16 in both streams (and no cross-layer prediction), so the segments
  concatenate to one fp16 tensor and no custom op is needed; named as ONNX Runtime GenAI does,
  ``past_key_values.{l}.key`` / ``present.{l}.key``, ``[batch, heads, past_sequence, head_dim]``;
* *packed*: the segments of a ``KVAttention`` node (or, unfused, of a ``KVCacheUpdate`` node per
  stream), whose parts are graph I/O named
  ``past_key_values.{l}.key[.h{heads}].{segment}.{part}`` (``present.`` for outputs), e.g.
  ``past_key_values.3.key.bulk.codes`` int8 ``[batch, heads, past_sequence, 16]``.  The ``.h0-2``
  head tag appears only when a layer's heads are split into several groups.

A sliding-window layer's group (``window`` > 0) holds one per-token scheme and only the last
``W - 1`` positions between steps: plain fp16 ``past_key_values.{l}.key`` as above, or the parts of
its scheme, ``past_key_values.{l}.key.window.{part}`` (e.g. ``.window.codes``), appended and read
through the inlined bodies of ``KVQuantize`` and ``KVDequantize``; its row count is its own
(the graph's ``past_window_sequence`` / ``total_window_sequence`` dimensions).

The layout is a pure function of the map and the geometry, and is written into the export
manifest, so runtimes need no other knowledge of the map to feed the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvcompile.kv.grouping import joint_groups
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
    window: int = 0  # a sliding-window layer's window W (its ports hold at most W - 1 positions)

    def op_attrs(self, pmap: PrecisionMap) -> dict:
        """Attributes of this group's KVCacheUpdate node."""
        return {"sink_scheme": self.sink_scheme, "recent_scheme": self.recent_scheme, "bulk_scheme": self.bulk_scheme,
                "sink_tokens": pmap.sink_tokens, "recent_window": pmap.recent_window, "head_dim": pmap.head_dim,
                "age_tiers": self.age_tiers}


def cache_layout(pmap: PrecisionMap) -> list[HeadGroup]:
    """Head groups of every (layer, stream), in graph order: per layer, the key groups then the
    value groups, each over the layer's joint head groups (:func:`~kvcompile.kv.grouping.joint_groups`)."""
    from kvcompile.ops.cache_update import KV_CACHE_UPDATE, format_age_tiers

    groups = []
    for layer in range(pmap.num_layers):
        joint = joint_groups(pmap, layer)
        split = len(joint) > 1
        # a map with cross-layer predictors re-encodes fp16 rows as they move between tiers too
        plain = [pmap.predictors is None and all(s.name == "fp16" for stream in STREAMS
                                                 for s in pmap.class_schemes(layer, heads[0], stream))
                 for heads in joint]
        for stream in STREAMS:
            for heads, is_plain in zip(joint, plain):
                schemes = {c: s.name for c, s in zip(pmap.classes, pmap.class_schemes(layer, heads[0], stream))}
                sink, recent, bulk = schemes["sink"], schemes["recent"], schemes["bulk"]
                ages = format_age_tiers((schemes[f"age{i}"], w) for i, w in enumerate(pmap.age_windows, 1))
                base = f"{layer}.{stream}" + (f".h{'-'.join(map(str, heads))}" if split else "")
                window = pmap.window(layer)
                if window and not is_plain:
                    from kvcompile.ops.quantize import part_ports

                    ports = tuple(CachePort(f"past_key_values.{base}.window.{p.name}", f"present.{base}.window.{p.name}",
                                            p.dtype, int(p.shape[-1]), 1) for p in part_ports(bulk, pmap.head_dim))
                elif is_plain:
                    ports = (CachePort(f"past_key_values.{base}", f"present.{base}", "float16", pmap.head_dim, 1),)
                else:
                    attrs = {"sink_scheme": sink, "recent_scheme": recent, "bulk_scheme": bulk,
                             "sink_tokens": pmap.sink_tokens, "recent_window": pmap.recent_window,
                             "head_dim": pmap.head_dim, "age_tiers": ages}
                    ports = tuple(
                        CachePort(f"past_key_values.{base}.{p.name.removeprefix('past_')}",
                                  f"present.{base}.{p.name.removeprefix('past_')}", p.dtype, int(p.shape[-1]),
                                  1 if p.shape[2] == "T" else int(p.shape[2].split("/")[1]))
                        for p in KV_CACHE_UPDATE.inputs(attrs) if p.name.startswith("past_"))
                groups.append(HeadGroup(layer, stream, tuple(heads), sink, recent, bulk, ages, is_plain, ports, window))
    return groups


def layout_to_json(groups: list[HeadGroup]) -> list[dict]:
    """The layout as JSON; ``window`` only on window-layer groups (older manifests have none)."""
    return [{k: v for k, v in asdict(g).items() if k != "window" or v} for g in groups]
