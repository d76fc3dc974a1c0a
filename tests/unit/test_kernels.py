"""Triton kernels on CPU tensors through Triton's interpreter, against the torch references.

The append kernel must be bit-identical to ``IntegerScheme.quantize``; decode attention is
compared with de-quantize-then-attend in float64 (tolerance 2e-6: float32 accumulation order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="kernels need triton (installed by install.sh)")

from kvcompile.cache import MixedPrecisionCache, enable_kernel_attention  # noqa: E402
from kvcompile.errors import CacheError, SchemeError  # noqa: E402
from kvcompile.kernels import available, decode_attention, quantize, unsupported_reason  # noqa: E402
from kvcompile.kernels.attention import Segment, Stored, reference_decode_attention  # noqa: E402
from kvcompile.kv.precision_map import PrecisionMap  # noqa: E402
from kvcompile.plan.presets import resolve_map  # noqa: E402
from kvcompile.quant import get_scheme  # noqa: E402

from tests.conftest import adversarial, make_tiny_gemma3, make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not available("cpu")[0], reason=available("cpu")[1])

KERNEL_SCHEMES = ["int8", "int4", "int2", "int4-sym", "int2-sym", "int2-ch", "int4-ch-g64", "int8-s32", "int4-g16",
                  "int2-sym-ch-s32"]


@pytest.mark.parametrize("name", KERNEL_SCHEMES)
def test_append_kernel_is_bit_identical_to_the_reference(name):
    scheme = get_scheme(name)
    for t in (scheme.token_group, 3 * scheme.token_group):
        x = adversarial(t)
        got, want = quantize(scheme, x), scheme.quantize(x)
        assert got.parts.keys() == want.parts.keys() and got.shape == want.shape
        for key in want.parts:
            assert got.parts[key].dtype == want.parts[key].dtype
            assert torch.equal(got.parts[key], want.parts[key]), (name, key)


def test_append_kernel_refuses_what_it_cannot_do():
    with pytest.raises(SchemeError, match="3"):
        quantize(get_scheme("int3"), torch.zeros(1, 1, 1, 64))
    with pytest.raises(SchemeError, match="NaN"):
        quantize(get_scheme("int4"), torch.full((1, 1, 1, 64), float("nan")))
    assert unsupported_reason(get_scheme("nf4")) and unsupported_reason(get_scheme("int4-rot"))
    assert unsupported_reason(get_scheme("fp16")) is None


def stored(name: str, t: int, seed: int, heads: int = 2, scale: float = 1.0) -> Stored:
    s = get_scheme(name)
    x = torch.randn(2, heads, t, 64, generator=torch.Generator().manual_seed(seed)) * scale
    return Stored(s, s.quantize(x).parts, t)


@pytest.mark.parametrize("rep", [1, 3, 4])
def test_decode_attention_matches_reference_with_gqa_and_misaligned_segments(rep):
    # positions: 3 fp16 sinks; K bulk per-channel (64) then K recent fp16 (29);
    # V bulk per-token int4 (80) then V recent int8 (13): runs cut where either stream changes
    k = [stored("fp16", 3, 0), stored("int2-ch", 64, 1, scale=3), stored("fp16", 29, 2)]
    v = [stored("fp16", 3, 3), stored("int4", 80, 4), stored("int8", 13, 5)]
    runs = [Segment(k[0], 0, v[0], 0, 3), Segment(k[1], 0, v[1], 0, 64), Segment(k[2], 0, v[1], 64, 16),
            Segment(k[2], 16, v[2], 0, 13)]
    q = torch.randn(2, 2 * rep, 64, generator=torch.Generator().manual_seed(9))
    want = reference_decode_attention(q, runs, 0.125)
    for block_t, splits in ((16, 1), (32, 3), (64, None)):  # one program per run, and split along positions
        got = decode_attention(q, runs, 0.125, block_t=block_t, splits=splits)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_decode_attention_single_position_and_large_scores():
    k, v = stored("int8", 1, 0, scale=50.0), stored("fp16", 1, 1)
    q = torch.randn(2, 2, 64) * 10
    torch.testing.assert_close(decode_attention(q, [Segment.whole(k, v)], 1.0),
                               reference_decode_attention(q, [Segment.whole(k, v)], 1.0), rtol=0, atol=2e-6)


def per_head_mixed(geometry) -> PrecisionMap:
    base = PrecisionMap.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, "int4",
                                sink_tokens=2, recent_window=5)
    return base.with_bulk({"key": (("int2-ch", "int4"), ("int8", "int2-ch")),
                           "value": (("int2", "int2"), ("int4-sym", "int8"))})


def recency_tiers(geometry) -> PrecisionMap:
    """fp16 window -> int8 -> per-channel int4 -> int2 bulk."""
    return PrecisionMap.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, "int2",
                                sink_tokens=2, recent_window=3, ages=((5, "int8"), (8, "int4-ch-g8")))


@pytest.mark.parametrize("label", ["kivi-2", "per-head-mixed", "recency-tiers"])
def test_kernel_cache_generates_the_same_tokens_as_the_reference(label, tiny_geometry):
    pmap = {"kivi-2": lambda g: resolve_map("kivi-2", g, sink_tokens=2, recent_window=8),
            "per-head-mixed": per_head_mixed, "recency-tiers": recency_tiers}[label](tiny_geometry)
    reference, fused = make_tiny_llama(), make_tiny_llama()
    enable_kernel_attention(fused)
    ids = torch.randint(0, 97, (2, 36), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids, cache=(c_ref := MixedPrecisionCache(pmap, 128)), use_cache=True).logits
        got = fused(ids, cache=(c_fused := MixedPrecisionCache(pmap, 128, kernels=True)), use_cache=True).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        token = want[:, -1:].argmax(-1)
        for _ in range(10):  # decode steps: fused attention on the packed cache
            want = reference(token, cache=c_ref, use_cache=True).logits
            got = fused(token, cache=c_fused, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            token = want.argmax(-1)
    assert c_fused.nbytes() == c_ref.nbytes()


@pytest.mark.parametrize("label", ["int4", "kivi-2"])
def test_kernel_cache_decodes_window_layers_past_the_window(label):
    """Tiny Gemma 3 (window 8): a decode step's fused kernel reads the window's last 8 positions,
    then the window keeps 7; the logits and the bytes held equal the reference cache's."""
    from kvcompile.models.adapters import adapter_for

    reference, fused = make_tiny_gemma3(seed=1), make_tiny_gemma3(seed=1)
    geometry = adapter_for(reference.config).geometry(reference.config)
    pmap = resolve_map(label, geometry, sink_tokens=2)
    enable_kernel_attention(fused)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(ids, cache=(c_ref := MixedPrecisionCache(pmap, 64)), use_cache=True).logits
        got = fused(ids, cache=(c_fused := MixedPrecisionCache(pmap, 64, kernels=True)), use_cache=True).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        token = want[:, -1:].argmax(-1)
        for _ in range(12):  # 6 + 12 positions: the window layers evict from the third step on
            want = reference(token, cache=c_ref, use_cache=True).logits
            got = fused(token, cache=c_fused, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            token = want.argmax(-1)
            assert [layer.held() for layer in c_fused.layers] == [layer.held() for layer in c_ref.layers]
    assert [layer.held() for layer in c_fused.layers] == [7, 18, 7]
    assert c_fused.nbytes() == c_ref.nbytes()


def test_kernel_cache_errors_are_clear(tiny_llama, tiny_geometry):
    with pytest.raises(CacheError, match="nf4"):
        MixedPrecisionCache(resolve_map("nf4", tiny_geometry), kernels=True)
    model = make_tiny_llama()  # attention not switched to kvcompile_kernels
    cache = MixedPrecisionCache(resolve_map("int4", tiny_geometry), kernels=True)
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), cache=cache, use_cache=True)
        with pytest.raises(CacheError, match="enable_kernel_attention"):
            model(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)
    assert available("cpu")[0]


def test_kernel_support_is_a_per_family_trait():
    """Each family's kernel support is one registered KernelFormat; a family without one is a
    one-line refusal naming the families that have kernels, and registering one enables it."""
    from dataclasses import dataclass

    from kvcompile import kernels
    from kvcompile.quant import get_scheme
    from kvcompile.quant.floating import FP16Scheme

    assert kernels.unsupported_reason(get_scheme("int4-ch-g32")) is None
    assert kernels.kernel_format(get_scheme("int2")).arguments(get_scheme("int2"))["LEVELS"] == 3
    assert kernels.kernel_format(get_scheme("int4-sym")).arguments(get_scheme("int4-sym"))["LEVELS"] == 7
    reason = kernels.unsupported_reason(get_scheme("nf4"))
    assert reason == "nf4: the NF4Scheme family has no kernel yet (FP16Scheme and IntegerScheme do)"

    @dataclass(frozen=True)
    class Halves(FP16Scheme):
        pass

    scheme = Halves()
    assert "Halves family has no kernel yet" in kernels.unsupported_reason(scheme)
    kernels.register_kernel_format(Halves, kernels.kernel_format(get_scheme("fp16")))
    try:
        assert kernels.unsupported_reason(scheme) is None
    finally:
        from kvcompile.quant.base import _TRAITS

        del _TRAITS[Halves]
