"""The native CPU library (native/, C++) against the torch reference.

KVAttention's present segments must be *bit-identical* to the reference (the cache a later step
reads, and what the torch cache holds); its attention output is compared within a tolerance:
both sides read the same de-quantized keys and values (the library's de-quantization is
bit-exact too), so they differ only in the order of float32 sums.  Two sums move the output:

* the weighted sum of value rows: the output is a convex combination of them, and L float32
  terms summed in another order move it by at most about L * 2^-24 of the largest |v| (L <= 603
  here: 3.6e-5);
* each score q.k: a dot product of D terms is off by at most D * 2^-24 * |q| |k| (Euclidean norms)
  on either side, and a score error e moves a softmax average by at most 2 e max |v|.

So the bound per (batch row, head) is ``max|v| * (4e-5 + 4 D 2^-24 scale max|q| max|k|)``; the
adversarial data (an outlier channel x40, a head x300) makes the second term matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the native library runs in onnxruntime (installed by install.sh)")

from kvcompile.calibrate.defaults import DEFAULT_SCHEMES  # noqa: E402
from kvcompile.errors import KvcompileError  # noqa: E402
from kvcompile.kernels import native  # noqa: E402
from kvcompile.ops import KV_ATTENTION  # noqa: E402
from kvcompile.ops.attention import stream_attrs  # noqa: E402
from kvcompile.ops.cache_update import run_cache_update, segment_ports  # noqa: E402
from kvcompile.quant import get_scheme  # noqa: E402
from kvcompile.quant.base import native_descriptor, native_readable, part_layout  # noqa: E402
from kvcompile.quant.lloyd import NATIVE_GROUPS, lloyd_max_codebook  # noqa: E402
from kvcompile.quant.nf4 import nf4_codebook  # noqa: E402
from tests.conftest import adversarial  # noqa: E402

NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
BYTES = {torch.int8: 1, torch.float16: 2, torch.float32: 4}
# everything in the planner's default menu (the library reads all of it), plus variants
SCHEMES = [s for s in DEFAULT_SCHEMES if native_readable(get_scheme(s))] + ["int8-ch", "int4-sym", "int2-sym-ch-g16", "int3-s32",
                                                        "int8-ch-s32", "nf4-g32", "nf4-nodq", "int4-g16-rot", "lm2",
                                                        "lm4-g16", "lm3-g16-rot", "lm4-ch-g16"]


def session(attrs, use_native=True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if use_native:
        native.register(options)
    return ort.InferenceSession(KV_ATTENTION.single_node_model(attrs).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def test_the_library_is_built_and_found():
    assert native.library_path() is not None, native.BUILD_HINT


@pytest.mark.parametrize("name", SCHEMES + ["int2-ch-o1"])
def test_the_library_reads_each_scheme_name_as_the_python_registry_does(name):
    scheme = get_scheme(name)
    got = native.describe_scheme(name, 64)
    want = native_descriptor(scheme)
    if want is None:
        assert isinstance(got, str) and name in got and "\n" not in got
        return
    fields, parts = got
    assert fields == want
    assert parts == [(BYTES[p.dtype], p.width, p.rows_per) for p in part_layout(scheme, 64)]


def test_non_canonical_and_unstorable_names_are_refused_in_one_line():
    for name, head_dim in [("int4-g32", 64), ("int4-ch-sym", 64), ("int5", 64), ("int4-g48", 64), ("int4-rot", 48),
                           ("nf4-g16", 64), ("bf16", 64), ("lm2-g32", 64), ("lm5", 64), ("lm2-g8", 64),
                           ("lm3-rot-g64", 64), ("lm2-rot", 96), ("lm2-ch-rot", 64), ("lm2-g64-ch", 64),
                           ("lm2-ch-g8", 64)]:
        reason = native.describe_scheme(name, head_dim)
        assert isinstance(reason, str) and name in reason and "\n" not in reason


def test_the_whole_default_menu_is_read_natively():
    assert set(DEFAULT_SCHEMES) <= set(SCHEMES)


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", NATIVE_GROUPS)
def test_the_lloyd_max_codebooks_are_the_reference_ones_bit_for_bit(bits, group, centred):
    """native/src/lloyd_codebooks.h (tools/gen_lloyd_codebooks.py) against the Python computation
    (centred: the per-channel lm<b>-ch books)."""
    got = np.asarray(native.lloyd_codebook(bits, group, centred), np.float32)
    assert np.array_equal(got.view(np.int32), lloyd_max_codebook(bits, group, centred).numpy().view(np.int32))


def test_fp8_rounding_is_torchs_on_every_tie_and_neighbourhood():
    from tests.unit.test_ops import e4m3_neighbourhoods

    y = e4m3_neighbourhoods()
    assert np.array_equal(native.e4m3_bytes(y.numpy()), y.to(torch.float8_e4m3fn).view(torch.uint8).numpy())


def test_the_nf4_codebook_is_the_reference_one_bit_for_bit():
    assert np.array_equal(np.asarray(native.nf4_codebook(), np.float32).view(np.int32),
                          nf4_codebook().numpy().view(np.int32))


def attention_case(key, value, sink_tokens=2, recent_window=8, q_per_kv=3, key_ages="", value_ages="", head_dim=64):
    return {"key_sink_scheme": key[0], "key_recent_scheme": key[1], "key_bulk_scheme": key[2], "key_age_tiers": key_ages,
            "value_sink_scheme": value[0], "value_recent_scheme": value[1], "value_bulk_scheme": value[2],
            "value_age_tiers": value_ages, "sink_tokens": sink_tokens, "recent_window": recent_window,
            "head_dim": head_dim, "q_per_kv": q_per_kv, "scale": head_dim ** -0.5}


def step_inputs(batch: int, kv_heads: int, r: int, n: int, d: int, seed: int, step: int):
    """Query, key and value of one step: adversarial keys and values, queries partly aligned with them."""
    q = adversarial(n, d, seed=seed + 3 * step)[:batch, :1].repeat(1, kv_heads * r, 1, 1) * 0.1 \
        + torch.randn(batch, kv_heads * r, n, d, generator=torch.Generator().manual_seed(step))
    return q, adversarial(n, d, seed=seed + 3 * step + 1)[:batch, :kv_heads], \
        adversarial(n, d, seed=seed + 3 * step + 2)[:batch, :kv_heads]


def assert_within_bound(got, want, q, stored_keys, stored_values, r: int, scale: float, step: int) -> None:
    """The output error within ``max|v| (4e-5 + 4 D 2^-24 scale max|q| max|k|)`` per (batch row, head)
    (module docstring), over the keys and values attention read as stored."""
    d = q.shape[-1]
    v_max = stored_values.abs().amax(dim=(2, 3)).repeat_interleave(r, dim=1)
    k_norm = stored_keys.norm(dim=-1).amax(dim=2).repeat_interleave(r, dim=1)
    score_error = d * 2.0**-24 * scale * q.norm(dim=-1).amax(dim=2) * k_norm
    bound = (v_max * (4e-5 + 4 * score_error))[..., None, None].numpy()
    error = np.abs(got - want.numpy())
    assert (error <= bound + 1e-30).all(), f"step {step}: attention error {float((error / bound).max()):.3g} x bound"


def run_steps(attrs, steps, batch=2, kv_heads=2, seed=0, use_native=True, run=None):
    """Feed prefill/decode steps through the op in ONNX Runtime (or ``run(attrs, inputs) -> outputs``,
    numpy arrays in the op's port order) and the reference; check each step."""
    sess = session(attrs, use_native) if run is None else None
    ports = KV_ATTENTION.inputs(attrs)
    past = [np.zeros((batch, kv_heads, 0, int(p.shape[-1])), NP[p.dtype]) for p in ports[3:]]
    r, d = attrs["q_per_kv"], attrs["head_dim"]
    done = 0
    for step, n in enumerate(steps):
        q, k, v = step_inputs(batch, kv_heads, r, n, d, seed, step)
        want = KV_ATTENTION.reference(attrs, q, k, v, *[torch.from_numpy(p) for p in past])
        if run is not None:
            got = run(attrs, [q.numpy(), k.numpy(), v.numpy(), *past])
        else:
            got = sess.run(None, {"query": q.numpy(), "key": k.numpy(), "value": v.numpy(),
                                  **{p.name: a for p, a in zip(ports[3:], past)}})
        for i, (a, w) in enumerate(zip(got[1:], want[1:])):
            assert a.shape == tuple(w.shape) and np.array_equal(a, w.numpy()), f"step {step}: present part {i} differs"
        # the values attention read, as stored: bound the output error by their magnitude
        v_attrs = stream_attrs(attrs, "value")
        n_value = len(segment_ports(v_attrs, "past"))
        stored_values = run_cache_update(v_attrs, [*[torch.from_numpy(p) for p in past[-n_value:]], v])[-1]
        k_attrs = stream_attrs(attrs, "key")
        stored_keys = run_cache_update(k_attrs, [*[torch.from_numpy(p) for p in past[:-n_value]], k])[-1]
        assert_within_bound(got[0], want[0], q, stored_keys, stored_values, r, attrs["scale"], step)
        past = got[1:]
        done += n
    return done


# ragged prefill and decode across window (8) and block (32, 64) boundaries
STEPS = [7, 1, 1, 40, 1, 3, 1, 64, 1, 1, 17, 1]

CASES = {
    "kivi-style": attention_case(("fp16", "fp16", "int2-ch"), ("fp16", "fp16", "int2")),
    "no sinks, no window": attention_case(("int8", "int4", "int4-ch-g64"), ("int8", "int4", "nf4"), sink_tokens=0,
                                          recent_window=0),
    "rotated": attention_case(("fp16", "int8", "int2-rot"), ("fp16", "int8", "int4-rot")),
    "tiers": attention_case(("fp16", "fp16", "int2"), ("int8", "fp16", "int2-ch-g16"), key_ages="int8:5,int4-ch-g16:7",
                            value_ages="nf4-nodq:3"),
    "mixed widths": attention_case(("int3-s32", "int8", "int3-ch"), ("nf4-g32", "int4-sym", "int3-g64")),
    "lloyd-max": attention_case(("fp16", "lm4", "lm2-rot"), ("lm4-g16", "lm3-g64-rot", "lm2-g64-rot")),
    "lloyd-max per channel": attention_case(("fp16", "fp16", "lm2-ch"), ("fp16", "int8", "lm3-ch-g64"),
                                            key_ages="lm4-ch-g16:5", value_ages="lm3-ch-g16:20"),
    "fp8": attention_case(("fp8", "fp8", "int2-ch"), ("fp16", "fp8", "fp8")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_attention_matches_the_reference_over_prefill_and_decode(case):
    assert run_steps(CASES[case], STEPS) == sum(STEPS)


def test_native_attention_handles_mqa_batch_one_and_multi_head_attention():
    attrs = attention_case(("fp16", "fp16", "int4-ch"), ("fp16", "int8", "int4"), q_per_kv=4)
    run_steps(attrs, [5, 1, 30, 1], batch=1, kv_heads=1)
    attrs = attention_case(("fp16", "fp16", "int2"), ("fp16", "fp16", "int2"), q_per_kv=1)
    run_steps(attrs, [9, 1, 1], batch=2, kv_heads=3)


@pytest.mark.parametrize("bulk", SCHEMES)
def test_every_menu_format_is_stored_bit_exact_and_read_natively(bulk):
    scheme = get_scheme(bulk)
    key = ("fp16", "fp16", bulk)
    value = ("fp16", "fp16", bulk if scheme.token_group == 1 else "int4")
    run_steps(attention_case(key, value, sink_tokens=1, recent_window=4), [scheme.token_group + 9, 1, 1, 70, 1])


@pytest.mark.parametrize("head_dim", [32, 128, 256])
def test_other_head_dims(head_dim):
    """The tiny test model's 32, and 128 / 256 (Gemma 3): tiles beyond the stack buffer, wider groups."""
    attrs = attention_case(("fp16", "int8", "int2-ch"), ("fp16", "int4-g64" if head_dim >= 64 else "int4",
                                                            "int2-rot" if head_dim != 32 else "int2"), head_dim=head_dim)
    run_steps(attrs, [9, 1, 40, 1, 300, 1], batch=1)


def test_the_function_body_and_the_library_agree_on_one_model():
    attrs = CASES["tiers"]
    run_steps(attrs, [12, 1, 33], use_native=False)
    run_steps(attrs, [12, 1, 33], use_native=True)


def test_malformed_input_is_one_clear_line():
    attrs = CASES["kivi-style"]
    sess = session(attrs)
    ports = KV_ATTENTION.inputs(attrs)
    q, k, v = torch.randn(1, 6, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
    # a past whose segments do not follow the map's rule: 5 recent positions, no sinks
    past = {p.name: np.zeros((1, 2, 5 if ".values" in p.name and "recent" in p.name else 0, int(p.shape[-1])),
                             NP[p.dtype]) for p in ports[3:]}
    with pytest.raises(Exception, match="rule's split of 5 positions"):
        sess.run(None, {"query": q.numpy(), "key": k.numpy(), "value": v.numpy(), **past})
    empty = {p.name: np.zeros((1, 2, 0, int(p.shape[-1])), NP[p.dtype]) for p in ports[3:]}
    bad = k.clone()
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(Exception, match="NaN or inf"):
        sess.run(None, {"query": q.numpy(), "key": bad.numpy(), "value": v.numpy(), **empty})
    with pytest.raises(Exception, match=r"query \[B, H\*r, S, D\]"):
        sess.run(None, {"query": q[:, :5].numpy(), "key": k.numpy(), "value": v.numpy(), **empty})


def test_a_missing_library_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMPILE_NATIVE_LIBRARY", str(tmp_path / "nothing.so"))
    assert not native.enabled()
    with pytest.raises(KvcompileError, match="native kvcompile library is missing.*install.sh"):
        native.register(ort.SessionOptions())
    monkeypatch.delenv("KVCOMPILE_NATIVE_LIBRARY")
    monkeypatch.setenv("KVCOMPILE_NATIVE", "0")
    assert not native.enabled() and native.library_path() is not None


def test_long_decode_splits_positions_across_threads_and_merges_them():
    """Decode over > 256 positions runs in chunks merged by log-sum-exp (split-K)."""
    attrs = attention_case(("fp16", "int8", "int2-ch"), ("fp16", "int8", "int4"))
    run_steps(attrs, [600, 1, 1, 1], batch=1)


def codec_session(spec, attrs):
    """One KVQuantize or KVDequantize node, declared as the library's kernel (it must win over the body)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    native.register(options)
    return ort.InferenceSession(spec.single_node_model(attrs).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", SCHEMES)
def test_the_librarys_quantize_and_dequantize_kernels_are_the_references_bit_for_bit(name):
    """KVQuantize / KVDequantize (what a predicted export's graph stores and reads with) write the
    reference's parts and read back its floats, on adversarial data, batch 2 x 3 heads."""
    from kvcompile.ops import KV_DEQUANTIZE, KV_QUANTIZE

    scheme = get_scheme(name)
    attrs = {"scheme": name, "head_dim": 64}
    t = 2 * max(scheme.token_group, 16)
    x = adversarial(t, 64, seed=3)
    want = scheme.quantize(x)
    parts = codec_session(KV_QUANTIZE, attrs).run(None, {"states": x.numpy()})
    layout = part_layout(scheme, 64)
    assert len(parts) == len(layout)
    for got, p in zip(parts, layout):
        assert np.array_equal(got.view(np.uint8), want.parts[p.name].numpy().view(np.uint8)), p.name
    names = [p.name for p in KV_DEQUANTIZE.inputs(attrs)]
    (back,) = codec_session(KV_DEQUANTIZE, attrs).run(None, dict(zip(names, parts)))
    assert np.array_equal(back, scheme.dequantize(want).numpy())


def test_the_codec_kernels_refuse_bad_input_in_one_line():
    from kvcompile.ops import KV_DEQUANTIZE, KV_QUANTIZE

    attrs = {"scheme": "int2-ch", "head_dim": 64}
    bad = torch.randn(1, 2, 32, 64)
    bad[0, 1, 3, 5] = float("inf")
    with pytest.raises(Exception, match="KVQuantize int2-ch: .*(NaN|inf)"):
        codec_session(KV_QUANTIZE, attrs).run(None, {"states": bad.numpy()})
    with pytest.raises(Exception, match="KVQuantize int2-ch: 31 positions; expected a multiple of 32"):
        codec_session(KV_QUANTIZE, attrs).run(None, {"states": np.zeros((1, 2, 31, 64), np.float32)})
    parts = codec_session(KV_QUANTIZE, attrs).run(None, {"states": np.zeros((1, 2, 32, 64), np.float32)})
    names = [p.name for p in KV_DEQUANTIZE.inputs(attrs)]
    feed = dict(zip(names, parts))
    feed[names[1]] = feed[names[1]][:, :1]  # scales of one head for two heads' codes
    with pytest.raises(Exception, match="KVDequantize int2-ch: part scale does not have the format's shape"):
        codec_session(KV_DEQUANTIZE, attrs).run(None, feed)
