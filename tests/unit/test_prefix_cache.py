"""PrefixCache: exact reuse of compressed prefixes, memory cap, TTL + LRU eviction, statistics."""

from __future__ import annotations

import pytest
import torch

from kvcompile.cache import MixedPrecisionCache, PrefixCache
from kvcompile.cache.prefix import generate
from kvcompile.errors import CacheError
from kvcompile.kv.precision_map import PrecisionMap
from tests.conftest import make_tiny_llama

BLOCK = 16


def kivi_like() -> PrecisionMap:
    """2 layers x 2 kv heads x head_dim 32: per-channel int2 keys (blocks of 32), per-token int4 values, sinks + window."""
    return PrecisionMap.uniform(2, 2, 32, key="int2-ch", value="int4", sink_tokens=2, recent_window=8)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def prompt(seed: int, length: int, shared: list[int] | None = None) -> list[int]:
    rest = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (shared or []) + rest


def filled(model, pmap, ids) -> MixedPrecisionCache:
    cache = MixedPrecisionCache(pmap)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


def assert_same_state(a: MixedPrecisionCache, b: MixedPrecisionCache) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.snapshot(), b.snapshot()):
        for stream in la["segments"]:
            for ga, gb in zip(la["segments"][stream], lb["segments"][stream]):
                for c in ga:
                    assert (ga[c] is None) == (gb[c] is None)
                    if ga[c] is not None:
                        assert all(torch.equal(ga[c].parts[k], gb[c].parts[k]) for k in ga[c].parts)


def pre_rope_keys() -> PrecisionMap:
    """The KIVI-like map with its per-channel keys stored before RoPE."""
    return PrecisionMap.uniform(2, 2, 32, key="int2-ch-pr", value="int4", sink_tokens=2, recent_window=8)


@pytest.mark.parametrize("make_map", [kivi_like, pre_rope_keys])
def test_a_hit_generates_exactly_what_a_miss_does_and_skips_the_prefix(model, make_map):
    pmap = make_map()
    shared = prompt(0, 4 * BLOCK)
    prefix = PrefixCache(pmap, block_size=BLOCK)
    first = generate(model, prompt(1, 7, shared), prefix, max_new_tokens=12)
    assert (first.reused_tokens, first.computed_tokens) == (0, 4 * BLOCK + 7)
    assert len(prefix) == 1 and prefix.stats.inserted == 1 and prefix.stats.hits == 0
    # a second request with the same prefix and another question restores 4 blocks
    second = generate(model, prompt(2, 9, shared), prefix, max_new_tokens=12)
    assert (second.reused_tokens, second.computed_tokens) == (4 * BLOCK, 9)
    cold = generate(model, prompt(2, 9, shared), PrefixCache(pmap, block_size=BLOCK), max_new_tokens=12)
    assert second.tokens == cold.tokens
    assert_same_state(second.cache, cold.cache)
    s = prefix.stats
    assert (s.lookups, s.hits, s.hit_tokens) == (2, 1, 4 * BLOCK) and s.hit_rate == 0.5
    assert s.bytes == prefix.nbytes() > 0


def test_restored_prefix_is_the_stored_state_and_using_it_does_not_change_the_entry(model):
    pmap = kivi_like()
    ids = prompt(3, 6 * BLOCK)
    whole = filled(model, pmap, ids)
    prefix = PrefixCache(pmap, block_size=BLOCK)
    assert prefix.insert(ids, whole)
    restored, length = prefix.lookup(ids + [5, 6, 7])
    assert length == 6 * BLOCK
    assert_same_state(restored, whole)
    with torch.no_grad():  # a request decodes on: windows age into per-channel blocks, segments are replaced
        for token in range(40):
            model(torch.tensor([[token]]), cache=restored, use_cache=True)
    assert restored.get_seq_length() == 6 * BLOCK + 40
    assert_same_state(prefix.lookup(ids)[0], whole)
    # the stored entry costs its packed bytes, far below fp16
    fp16_bytes = 2 * 2 * 2 * 32 * 6 * BLOCK * 2  # layers x K/V x heads x dim x positions x 2 bytes
    assert prefix.nbytes() == whole.nbytes() < 0.5 * fp16_bytes


def test_longest_cached_prefix_wins_and_other_maps_never_match(model):
    pmap = kivi_like()
    ids = prompt(4, 4 * BLOCK)
    prefix = PrefixCache(pmap, block_size=BLOCK)
    prefix.insert(ids[: 2 * BLOCK], filled(model, pmap, ids[: 2 * BLOCK]))
    prefix.insert(ids, filled(model, pmap, ids))
    assert prefix.lookup(ids + [1])[1] == 4 * BLOCK
    assert prefix.lookup(ids[: 3 * BLOCK] + [1] * BLOCK)[1] == 2 * BLOCK  # diverges in block 4
    assert prefix.lookup([ids[0] + 1] + ids[1:])[1] == 0
    assert prefix.lookup(ids[: BLOCK - 1])[1] == 0 and prefix.stats.lookups == 3  # under one block: no lookup
    other = PrefixCache(PrecisionMap.uniform(2, 2, 32, key="int8"), block_size=BLOCK)
    other._entries = prefix._entries  # same stored states, different map: keys are seeded with the map
    assert other.lookup(ids + [1])[1] == 0


def test_memory_cap_evicts_least_recently_used_and_rejects_oversized(model):
    pmap = kivi_like()
    caches = {i: (prompt(10 + i, 2 * BLOCK), None) for i in range(3)}
    caches = {i: (ids, filled(model, pmap, ids)) for i, (ids, _) in caches.items()}
    one = caches[0][1].nbytes()
    prefix = PrefixCache(pmap, block_size=BLOCK, capacity_bytes=2 * one)
    prefix.insert(*caches[0])
    prefix.insert(*caches[1])
    assert prefix.lookup(caches[0][0])[1] == 2 * BLOCK  # 0 becomes most recently used
    prefix.insert(*caches[2])  # over the cap: evicts 1, the least recently used
    assert prefix.lookup(caches[1][0])[1] == 0 and prefix.lookup(caches[0][0])[1] == 2 * BLOCK
    assert prefix.stats.evicted_lru == 1 and prefix.nbytes() <= 2 * one and len(prefix) == 2
    tiny = PrefixCache(pmap, block_size=BLOCK, capacity_bytes=one - 1)
    assert not tiny.insert(*caches[0]) and tiny.stats.rejected == 1 and len(tiny) == 0


def test_entries_expire_after_their_ttl(model):
    now = [0.0]
    pmap = kivi_like()
    ids = prompt(20, 2 * BLOCK)
    prefix = PrefixCache(pmap, block_size=BLOCK, ttl_seconds=10, clock=lambda: now[0])
    prefix.insert(ids, filled(model, pmap, ids))
    now[0] = 8.0
    assert prefix.lookup(ids)[1] == 2 * BLOCK  # a hit renews the entry
    now[0] = 17.0
    assert prefix.lookup(ids)[1] == 2 * BLOCK
    now[0] = 27.5
    assert prefix.lookup(ids)[1] == 0 and prefix.stats.evicted_ttl == 1 and prefix.nbytes() == 0


def test_bad_inserts_fail_with_one_line(model):
    pmap = kivi_like()
    prefix = PrefixCache(pmap, block_size=BLOCK)
    ids = prompt(30, BLOCK + 3)
    with pytest.raises(CacheError, match="multiple of block_size 16"):
        prefix.insert(ids, filled(model, pmap, ids))
    with pytest.raises(CacheError, match="another precision map"):
        prefix.insert(ids[:BLOCK], filled(model, PrecisionMap.uniform(2, 2, 32, key="int8"), ids[:BLOCK]))
    with pytest.raises(CacheError, match="block_size >= 1"):
        PrefixCache(pmap, block_size=0)


def test_eight_threads_keep_the_byte_total_exact_and_under_the_cap(model):
    """8 threads x 1,000 random lookups and inserts on one cache that must evict all the time."""
    import random
    import threading

    pmap = kivi_like()
    pool = [(ids, filled(model, pmap, ids)) for ids in (prompt(s, (1 + s % 4) * BLOCK) for s in range(8))]
    sizes = sorted(c.nbytes() for _, c in pool)
    prefix = PrefixCache(pmap, block_size=BLOCK, capacity_bytes=sizes[-1] + sizes[-2])  # two large entries at most
    failures: list[str] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(1000):
            ids, cache = rng.choice(pool)
            if rng.random() < 0.5:
                prefix.insert(ids, cache)
            else:
                restored, length = prefix.lookup(ids)
                if length and restored.get_seq_length() != length:
                    failures.append(f"restored {restored.get_seq_length()} positions for a {length}-token hit")
            a = prefix.audit()
            if not (a["counted_bytes"] == a["entry_bytes"] <= a["capacity_bytes"] and a["entries"] == a["counted_entries"]):
                failures.append(str(a))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    s = prefix.stats
    assert s.inserted - s.evicted_lru - s.evicted_ttl == s.entries == len(prefix) and s.evicted_lru > 0
    assert s.lookups > 3000 and 0 < s.hits <= s.lookups
    # still working afterwards: a fresh insert of the largest entry fits and is found
    prefix.clear()
    ids, cache = max(pool, key=lambda p: p[1].nbytes())
    assert prefix.insert(ids, cache) and prefix.lookup(ids)[1] == len(ids)
