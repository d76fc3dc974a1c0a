"""KVWindowAttention: its ONNX function body and the native library against the torch reference.

As for KVAttention (tests/unit/test_native.py, whose module docstring derives the tolerance): the
present window must be bit-identical to the reference, the attention output within
``max|v| * (4e-5 + 4 D 2^-24 scale max|q| max|k|)`` per (batch row, head).  The steps cross the
window (8) in prefill and decode, so eviction and the window mask are both exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the ops run in onnxruntime (installed by install.sh)")

from kvcompile.kernels import native  # noqa: E402
from kvcompile.ops import KV_WINDOW_ATTENTION  # noqa: E402
from kvcompile.ops.attention import causal_attention  # noqa: E402
from kvcompile.ops.window_attention import window_attrs  # noqa: E402
from tests.unit.test_native import assert_within_bound, step_inputs  # noqa: E402

NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def session(attrs, use_native=True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if use_native:
        native.register(options)
    return ort.InferenceSession(KV_WINDOW_ATTENTION.single_node_model(attrs).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run_steps(attrs, steps, batch=2, kv_heads=2, seed=0, use_native=True, run=None):
    """Feed prefill/decode steps through the op in ONNX Runtime (or ``run(attrs, inputs) -> outputs``,
    numpy arrays in the op's port order) and the reference; check each step.  Returns the present
    rows after each step."""
    sess = session(attrs, use_native) if run is None else None
    ports = KV_WINDOW_ATTENTION.inputs(attrs)
    past = [np.zeros((batch, kv_heads, 0, int(p.shape[-1])), NP[p.dtype]) for p in ports[3:]]
    r, d, w = attrs["q_per_kv"], attrs["head_dim"], attrs["window"]
    held = []
    for step, n in enumerate(steps):
        q, k, v = step_inputs(batch, kv_heads, r, n, d, seed, step)
        want = KV_WINDOW_ATTENTION.reference(attrs, q, k, v, *[torch.from_numpy(p) for p in past])
        if run is not None:
            got = run(attrs, [q.numpy(), k.numpy(), v.numpy(), *past])
        else:
            got = sess.run(None, {"query": q.numpy(), "key": k.numpy(), "value": v.numpy(),
                                  **{p.name: a for p, a in zip(ports[3:], past)}})
        for i, (a, b) in enumerate(zip(got[1:], want[1:])):
            assert a.shape == tuple(b.shape) and np.array_equal(a, b.numpy()), f"step {step}: present part {i} differs"
        rows = got[1].shape[2]
        assert rows == min(past[0].shape[2] + n, w - 1)
        # bound the output error by what attention read: the keys and values as stored
        keys, values = _stored(attrs, past, k, v)
        assert_within_bound(got[0], want[0], q, keys, values, r, attrs["scale"], step)
        past = got[1:]
        held.append(rows)
    return held


def _stored(attrs, past, k, v):
    """The de-quantized ``past ++ new`` the reference attends over: (keys, values)."""
    from kvcompile.kv.store import WindowStore
    from kvcompile.quant import QuantizedTensor, get_scheme
    from kvcompile.quant.base import part_layout

    out, it = [], iter(past)
    for stream, x in (("key", k), ("value", v)):
        scheme = get_scheme(attrs[f"{stream}_scheme"])
        layout = part_layout(scheme, attrs["head_dim"])
        parts = {p.name: torch.from_numpy(next(it)) for p in layout}
        store = WindowStore([], scheme, attrs["window"])
        rows = parts[layout[0].name].shape[2]
        if rows:
            store.segments["window"] = QuantizedTensor(scheme.name, (*x.shape[:2], rows, attrs["head_dim"]), parts)
        store.append(x, 0)
        out.append(store.read())
    return out


STEPS = [5, 1, 1, 1, 12, 1, 1, 40, 1, 3, 1]

CASES = {
    "int4 keys, int8 values": ("int4", "int8", 8, 3, 64),
    "fp16 keys, nf4 values": ("fp16", "nf4", 8, 3, 64),
    "rotated": ("int2-rot", "int4-rot", 8, 3, 64),
    "gemma: mqa, head dim 256": ("int4-g64", "int4", 8, 4, 256),
    "window 2 keeps one position": ("int8", "int8", 2, 1, 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "function body"])
def test_window_attention_matches_the_reference_across_the_window(case, use_native):
    key, value, window, r, d = CASES[case]
    attrs = window_attrs(key, value, window, d, r, d ** -0.5)
    kv_heads = 1 if r == 4 else 2
    held = run_steps(attrs, STEPS, kv_heads=kv_heads, use_native=use_native)
    assert max(held) == window - 1 and held[0] == min(5, window - 1)


def test_long_decode_in_a_wide_window_splits_positions_and_merges_them():
    """A window of 700: decode over > 256 stored positions runs in chunks merged by log-sum-exp."""
    attrs = window_attrs("int4", "int4", 700, 64, 2, 0.125)
    assert run_steps(attrs, [690, 1, 30, 1], batch=1, kv_heads=1)[-1] == 699


def test_the_reference_reads_only_the_window():
    """The oracle itself: query i's output is causal attention over its last W positions alone."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 10, 16, generator=g), torch.randn(1, 1, 10, 16, generator=g), torch.randn(1, 1, 10, 16,
                                                                                                          generator=g)
    out = causal_attention(q, k, v, 2, 0.25, window=4)
    for i in range(10):
        lo = max(0, i - 3)
        want = causal_attention(q[:, :, i:i + 1], k[:, :, lo:i + 1], v[:, :, lo:i + 1], 2, 0.25)
        assert torch.allclose(out[:, :, i:i + 1], want, atol=1e-6)


def test_bad_input_is_one_clear_line():
    attrs = window_attrs("int4", "int8", 8, 64, 1, 0.125)
    sess = session(attrs)
    ports = KV_WINDOW_ATTENTION.inputs(attrs)
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
    too_long = {p.name: np.zeros((1, 2, 8, int(p.shape[-1])), NP[p.dtype]) for p in ports[3:]}
    with pytest.raises(Exception, match="holds 8 positions, expected at most window - 1 = 7"):
        sess.run(None, {"query": q.numpy(), "key": k.numpy(), "value": v.numpy(), **too_long})
    empty = {p.name: np.zeros((1, 2, 0, int(p.shape[-1])), NP[p.dtype]) for p in ports[3:]}
    bad = k.clone()
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(Exception, match="KVWindowAttention: .*NaN or inf"):
        sess.run(None, {"query": q.numpy(), "key": bad.numpy(), "value": v.numpy(), **empty})
    with pytest.raises(ValueError, match="int4-ch groups positions"):
        window_attrs("int4-ch", "int8", 8, 64, 1, 0.125)
    with pytest.raises(ValueError, match="window must be >= 2"):
        window_attrs("int4", "int8", 1, 64, 1, 0.125)
