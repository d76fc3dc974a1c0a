"""PrefixCache: keep the compressed KV cache of shared prompt prefixes and reuse it.

Requests that start with the same tokens (a system prompt, a few-shot preamble, one long document
asked several questions) would otherwise recompute and re-quantize that prefix every time.  The
prefix cache keeps, per distinct prefix, the *packed* state of a :class:`MixedPrecisionCache` after
exactly that prefix (codes, scales, zero points: the planned precision, not fp16), and restores it.

* Keys.  Prefixes are cut at multiples of ``block_size`` tokens.  The key of the prefix of k blocks
  is a hash chain ``h_k = sha256(h_{k-1} || tokens of block k)`` seeded with the precision map's
  content hash, so caches of different maps never mix, and finding the longest cached prefix of a
  prompt costs one hash per block.
* Memory.  An entry's bytes are its packed segments, copied into their own storage (so a cache
  slice does not pin its parent's memory); the total is kept under ``capacity_bytes``.
* Eviction.  On every lookup and insert, entries unused for more than ``ttl_seconds`` are dropped,
  then least recently used ones until the total fits.  An entry larger than the capacity is not
  stored (``rejected``).
* Threads.  One prefix cache can serve several request threads: every read and change of the
  entry table and the statistics happens under one lock, so the byte total is exact and under the
  cap after every operation.  The slow parts run outside it: hashing a prompt, copying a cache into
  an entry (``snapshot``) and restoring an entry into a new cache (entries are never written after
  insertion, so one evicted meanwhile is still whole for the request that found it).
* Exactness.  A hit restores exactly the state the inserting request built (entries are copies,
  never written by the requests that restore them).  That state depends on how the prefix was cut
  into chunks, as with any chunked prefill of a quantized cache: a chunk's later layers read earlier
  positions at the precision they had when the chunk ran.  :func:`generate` therefore always cuts
  at the same place, the last block boundary before the prompt's end, and runs the rest as one
  chunk; a request whose aligned prefix is cached generates exactly what it generated, or would
  have generated, cold (``tests/unit/test_prefix_cache.py``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from kvcompile.cache.mixed import MixedPrecisionCache, model_ropes
from kvcompile.errors import CacheError
from kvcompile.kv.precision_map import PrecisionMap


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that restored at least one block
    hit_tokens: int = 0  # prompt tokens restored instead of recomputed
    lookup_tokens: int = 0  # block-aligned prompt tokens looked up
    inserted: int = 0
    rejected: int = 0  # entries larger than the whole capacity
    evicted_lru: int = 0
    evicted_ttl: int = 0
    entries: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "token_hit_rate": self.token_hit_rate}


@dataclass
class _Entry:
    length: int
    state: object  # a MixedPrecisionCache snapshot (list[dict]) or a graph decoder's past tensors (dict)
    nbytes: int
    last_used: float
    kind: str = "torch"  # "torch" (MixedPrecisionCache) or "graph" (past inputs of an exported graph)


class PrefixCache:
    """Compressed KV states of prompt prefixes, block-aligned, under a memory cap with TTL + LRU eviction."""

    def __init__(self, pmap: PrecisionMap, block_size: int = 64, capacity_bytes: int = 256 * 2**20,
                 ttl_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic):
        if block_size < 1 or capacity_bytes < 0 or ttl_seconds <= 0:
            raise CacheError(f"PrefixCache needs block_size >= 1, capacity_bytes >= 0 and ttl_seconds > 0; got "
                             f"{block_size}, {capacity_bytes}, {ttl_seconds}")
        self.pmap = pmap
        self.block_size = block_size
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._stats = PrefixCacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _entries and _stats
        self._seed = hashlib.sha256(pmap.content_hash().encode()).digest()

    @property
    def stats(self) -> PrefixCacheStats:
        """A consistent copy of the statistics."""
        with self._lock:
            return replace(self._stats)

    def _block_keys(self, ids: Sequence[int]) -> list[str]:
        """Key of each block-aligned prefix of ``ids``: element k-1 for the first k blocks."""
        keys, h = [], self._seed
        for k in range(len(ids) // self.block_size):
            block = torch.as_tensor(ids[k * self.block_size:(k + 1) * self.block_size], dtype=torch.int64)
            h = hashlib.sha256(h + block.numpy().tobytes()).digest()
            keys.append(h.hex())
        return keys

    # The three helpers below run with the lock held.
    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self._entries.items() if now - e.last_used > self.ttl_seconds]:
            self._drop(key)
            self._stats.evicted_ttl += 1

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._stats.bytes -= entry.nbytes
        self._stats.entries -= 1

    def _touch(self, key: str) -> _Entry:
        entry = self._entries[key]
        entry.last_used = self.clock()
        self._entries.move_to_end(key)
        return entry

    def nbytes(self) -> int:
        with self._lock:
            return self._stats.bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def audit(self) -> dict:
        """The byte total as counted, the sum of the entries' sizes, and the cap, read at one instant."""
        with self._lock:
            return {"counted_bytes": self._stats.bytes, "entry_bytes": sum(e.nbytes for e in self._entries.values()),
                    "entries": len(self._entries), "counted_entries": self._stats.entries,
                    "capacity_bytes": self.capacity_bytes}

    def lookup(self, ids: Sequence[int], max_context: int = 8192, kernels: bool = False,
               rope=None) -> tuple[MixedPrecisionCache, int]:
        """A new cache holding the longest cached block-aligned prefix of ``ids``, and its length (0 on a miss);
        ``rope``: as :class:`MixedPrecisionCache` takes it (maps that store keys before RoPE)."""
        cache = MixedPrecisionCache(self.pmap, max_context=max_context, kernels=kernels, rope=rope)
        state, length = self.lookup_state(ids, "torch")
        return (cache.restore(state), length) if state is not None else (cache, 0)

    def lookup_state(self, ids: Sequence[int], kind: str) -> tuple[object | None, int]:
        """The stored state (of ``kind``, see :class:`_Entry`) of the longest cached block-aligned
        prefix of ``ids`` and its length, or ``(None, 0)``.  States are never written after insertion."""
        keys = self._block_keys(ids)
        with self._lock:
            self._expire()
            if not keys:  # shorter than one block: nothing could be cached, not counted as a lookup
                return None, 0
            self._stats.lookups += 1
            self._stats.lookup_tokens += len(keys) * self.block_size
            entry = next((self._touch(k) for k in reversed(keys) if k in self._entries and self._entries[k].kind == kind),
                         None)
            if entry is None:
                return None, 0
            self._stats.hits += 1
            self._stats.hit_tokens += entry.length
        return entry.state, entry.length

    def insert(self, ids: Sequence[int], cache: MixedPrecisionCache) -> bool:
        """Store ``cache``'s state as the prefix ``ids`` (its whole content; a multiple of ``block_size`` tokens).

        Returns whether it was stored (False: already present, or larger than the whole capacity)."""
        if cache.pmap.content_hash() != self.pmap.content_hash():
            raise CacheError("PrefixCache.insert: the cache was built with another precision map than this prefix cache's")
        length = cache.get_seq_length()
        if length != len(ids) or length % self.block_size or length == 0:
            raise CacheError(f"PrefixCache.insert: expected a cache holding exactly the {len(ids)} given tokens, a "
                             f"non-zero multiple of block_size {self.block_size}; it holds {length}")
        if getattr(cache.layers[0], "batch_size", 1) != 1:
            raise CacheError(f"PrefixCache stores one sequence per entry; the cache has batch {cache.layers[0].batch_size}")
        return self.insert_state(ids, "torch", cache.nbytes(), cache.snapshot)

    def insert_state(self, ids: Sequence[int], kind: str, size: int, snapshot: Callable[[], object]) -> bool:
        """Store the state ``snapshot()`` (a copy, taken outside the lock) of ``size`` bytes as the
        prefix ``ids`` (a non-zero multiple of ``block_size`` tokens); see :meth:`insert`."""
        if len(ids) % self.block_size or not ids:
            raise CacheError(f"PrefixCache.insert: expected a non-zero multiple of block_size {self.block_size} "
                             f"tokens, got {len(ids)}")
        key = self._block_keys(ids)[-1]
        with self._lock:
            self._expire()
            if key in self._entries:
                self._touch(key)
                return False
            if size > self.capacity_bytes:
                self._stats.rejected += 1
                return False
        state = snapshot()  # the copy, outside the lock
        with self._lock:
            if key in self._entries:  # another thread inserted the same prefix meanwhile
                self._touch(key)
                return False
            while self._entries and self._stats.bytes + size > self.capacity_bytes:
                self._drop(next(iter(self._entries)))
                self._stats.evicted_lru += 1
            self._entries[key] = _Entry(len(ids), state, size, self.clock(), kind)
            self._stats.inserted += 1
            self._stats.entries += 1
            self._stats.bytes += size
        return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)


@dataclass
class PrefixGeneration:
    tokens: list[int]  # generated token ids (prompt excluded)
    reused_tokens: int  # prompt tokens restored from the prefix cache
    computed_tokens: int  # prompt tokens run through the model
    prefill_seconds: float  # until the first generated token's logits
    cache: object  # the final MixedPrecisionCache (torch) or graph decoder state


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], prefix_cache: PrefixCache, max_new_tokens: int = 32,
             max_context: int = 8192, eos_token_id: int | None = None) -> PrefixGeneration:
    """Greedy generation that reuses and feeds ``prefix_cache``.

    The prompt is cut at ``A``, the last multiple of the block size below its length.  The longest
    cached part of ``[0, A)`` is restored, the rest of it computed (and the state at A inserted),
    then ``[A, len)`` runs as one chunk.  When all of ``[0, A)`` is cached the generated tokens
    equal those of a cold request; a partial hit equals a cold request chunked at the same places.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise CacheError("generate: the prompt is empty; expected at least one token")
    t0 = time.perf_counter()
    aligned = (len(ids) - 1) // prefix_cache.block_size * prefix_cache.block_size
    cache, reused = prefix_cache.lookup(ids[:aligned], max_context=max_context,
                                        rope=model_ropes(model, prefix_cache.pmap, max_context))
    computed = 0
    if reused < aligned:
        model(torch.tensor([ids[reused:aligned]]), cache=cache, use_cache=True)
        computed += aligned - reused
        prefix_cache.insert(ids[:aligned], cache)
    logits = model(torch.tensor([ids[aligned:]]), cache=cache, use_cache=True).logits
    computed += len(ids) - aligned
    prefill = time.perf_counter() - t0
    out = _greedy(logits, lambda token: model(torch.tensor([[token]]), cache=cache, use_cache=True).logits,
                  max_new_tokens, eos_token_id)
    return PrefixGeneration(out, reused, computed, prefill, cache)


def _greedy(logits, step: Callable[[int], object], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy tokens from the prompt's ``logits`` [1, S, V] on, ``step(token)`` giving the next logits."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id or len(out) == max_new_tokens:
            break
        logits = step(token)
    return out


def generate_with_decoder(decoder, prompt_ids: Sequence[int], prefix_cache: PrefixCache, max_new_tokens: int = 32,
                          eos_token_id: int | None = None) -> PrefixGeneration:
    """:func:`generate` for a decoder over an exported graph (the ONNX Runtime backend, any
    :class:`~kvcompile.runtime.base.GraphDecoder`): the prefix state is the graph's packed past
    tensors after the prefix, restored into the session's inputs on a hit.

    The same cut as :func:`generate` (the last block boundary before the prompt's end), so a
    request whose aligned prefix is cached generates what it generated cold.  ``cache`` of the
    result is the decoder's final state."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise CacheError("generate: the prompt is empty; expected at least one token")
    if decoder.export.pmap.content_hash() != prefix_cache.pmap.content_hash():
        raise CacheError("generate: the export was built with another precision map than the prefix cache's")
    t0 = time.perf_counter()
    aligned = (len(ids) - 1) // prefix_cache.block_size * prefix_cache.block_size
    stored, reused = prefix_cache.lookup_state(ids[:aligned], "graph")
    state = {"past": stored, "length": reused} if stored is not None else decoder.start(1)
    computed = 0
    if reused < aligned:
        _, state = decoder.step(np.asarray([ids[reused:aligned]], dtype=np.int64), state)
        computed += aligned - reused
        past = state["past"]
        prefix_cache.insert_state(ids[:aligned], "graph", int(sum(a.nbytes for a in past.values())),
                                  lambda: {name: a.copy() for name, a in past.items()})
    logits, state = decoder.step(np.asarray([ids[aligned:]], dtype=np.int64), state)
    computed += len(ids) - aligned
    prefill = time.perf_counter() - t0
    final = {"state": state}

    def step(token: int):
        logits, final["state"] = decoder.step(np.asarray([[token]], dtype=np.int64), final["state"])
        return logits

    out = _greedy(logits, step, max_new_tokens, eos_token_id)
    return PrefixGeneration(out, reused, computed, prefill, final["state"])
