"""Which kv heads share a store: heads grouped by their schemes.

A stream's kv heads whose schemes are equal in every class (sink, recent, age tiers, bulk) are
stored together, as one packed tensor per segment part with a head axis; attention over K and V
together groups the heads whose K *and* V schemes are equal.  Groups are listed in order of their
first head.
"""

from __future__ import annotations

from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.quant import StorageScheme

def stream_groups(pmap: PrecisionMap, layer: int, stream: str) -> list[tuple[dict[str, StorageScheme], list[int]]]:
    """``[({class: scheme}, kv heads)]`` of one (layer, stream), heads ascending within a group."""
    groups: dict[tuple, list[int]] = {}
    for head in range(pmap.num_kv_heads):
        groups.setdefault(pmap.class_schemes(layer, head, stream), []).append(head)
    return [(dict(zip(pmap.classes, schemes)), heads) for schemes, heads in groups.items()]


def joint_groups(pmap: PrecisionMap, layer: int) -> list[list[int]]:
    """kv heads of ``layer`` whose K triples and V triples are both equal (attention reads them together)."""
    groups: dict[tuple, list[int]] = {}
    for head in range(pmap.num_kv_heads):
        groups.setdefault((pmap.class_schemes(layer, head, "key"), pmap.class_schemes(layer, head, "value")),
                          []).append(head)
    return list(groups.values())
