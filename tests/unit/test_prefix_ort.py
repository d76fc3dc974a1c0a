"""The prefix cache with the ONNX Runtime backend: the graph's packed past tensors are the state."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.cache import PrefixCache  # noqa: E402
from kvcompile.cache.prefix import generate_with_decoder  # noqa: E402
from kvcompile.errors import CacheError  # noqa: E402
from kvcompile.export import export_onnx  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.runtime import generate, open_decoder  # noqa: E402


@pytest.fixture(scope="module")
def export(tiny_lm, tiny_geometry, tmp_path_factory):
    pmap = resolve_map("kivi-2", tiny_geometry, sink_tokens=2, recent_window=8)
    return export_onnx(tiny_lm, pmap, tmp_path_factory.mktemp("prefix") / "e", max_context=160)


def test_a_cached_prefix_is_restored_into_the_session_and_generates_what_a_cold_request_does(export):
    decoder = open_decoder(export, "ort", threads=1)
    prefix = PrefixCache(export.pmap, block_size=16, capacity_bytes=2**20)
    shared = list(range(3, 51))  # 48 tokens: 3 blocks
    prompts = [shared + [60 + i, 61, 62] for i in range(3)]
    first = generate_with_decoder(decoder, prompts[0], prefix, max_new_tokens=6)
    assert (first.reused_tokens, first.computed_tokens) == (0, 51)
    for prompt in prompts[1:]:
        hit = generate_with_decoder(decoder, prompt, prefix, max_new_tokens=6)
        assert (hit.reused_tokens, hit.computed_tokens) == (48, 3)
        # a cold request cut at the same place (48) generates the same tokens
        cold = generate_with_decoder(decoder, prompt, PrefixCache(export.pmap, block_size=16), max_new_tokens=6)
        assert hit.tokens == cold.tokens and cold.reused_tokens == 0
    s = prefix.stats
    assert (s.lookups, s.hits, s.entries) == (3, 2, 1)
    # the entry holds the packed cache: its bytes are the graph's past tensors after 48 positions
    state = {"past": {}, "length": 0}
    _, state = decoder.step(np.asarray([shared], dtype=np.int64), decoder.start(1))
    assert s.bytes == decoder.cache_bytes(state)
    # a plain greedy run of the whole prompt agrees too (unchunked prefill: same tokens on this model)
    assert generate(decoder, prompts[1], 6).tokens == hit.tokens


def test_entries_of_the_torch_cache_are_not_restored_into_a_graph_and_maps_must_match(export, tiny_lm, tiny_geometry):
    from kvcompile.cache.prefix import generate as generate_torch

    prefix = PrefixCache(export.pmap, block_size=16)
    prompt = list(range(3, 40))
    generate_torch(tiny_lm.model, prompt, prefix, max_new_tokens=2)
    g = generate_with_decoder(open_decoder(export, "ort", threads=1), prompt, prefix, max_new_tokens=2)
    assert g.reused_tokens == 0  # a torch snapshot is another kind of state
    other = PrefixCache(resolve_map("int8", tiny_geometry), block_size=16)
    with pytest.raises(CacheError, match="another precision map"):
        generate_with_decoder(open_decoder(export, "ort", threads=1), prompt, other)
