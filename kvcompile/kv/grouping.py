"""Which kv heads share a store: heads grouped by their schemes.

A stream's kv heads whose (sink, recent, bulk) scheme triples are equal are stored together, as
one packed tensor per segment part with a head axis; attention over K and V together groups the
heads whose K *and* V triples are equal.  Groups are listed in order of their first head.
"""

from __future__ import annotations

from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.quant import StorageScheme

Triple = tuple[StorageScheme, StorageScheme, StorageScheme]  # (sink, recent, bulk)


def stream_groups(pmap: PrecisionMap, layer: int, stream: str) -> list[tuple[Triple, list[int]]]:
    """``[(scheme triple, kv heads)]`` of one (layer, stream), heads ascending within a group."""
    groups: dict[tuple, list[int]] = {}
    for head in range(pmap.num_kv_heads):
        groups.setdefault(pmap.triple(layer, head, stream), []).append(head)
    return list(groups.items())


def joint_groups(pmap: PrecisionMap, layer: int) -> list[list[int]]:
    """kv heads of ``layer`` whose K triples and V triples are both equal (attention reads them together)."""
    groups: dict[tuple, list[int]] = {}
    for head in range(pmap.num_kv_heads):
        groups.setdefault((pmap.triple(layer, head, "key"), pmap.triple(layer, head, "value")), []).append(head)
    return list(groups.values())
