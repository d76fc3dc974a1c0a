"""The graph of a layer whose cache stores cross-layer prediction residuals (:mod:`kvcompile.kv.predict`).

A map with predictors stores, from layer 1 on, ``r = X - P`` where ``P`` is a linear prediction from
the layer before's *stored* forms; attention reads ``X̂ = P + D(r)``.  The graph computes what
:meth:`kvcompile.cache.mixed.MixedPrecisionLayer._update_predicted` computes, in standard ops, and
passes from one layer to the next, within the step, the layer's forms (float32 ``[B, H, rows, D]``
over all kv heads; graph values, never graph I/O):

* ``entry``: the new positions as stored (``P_0 + D_0(Q_0(x - P_0))``, tier 0 = sink or recent);
* ``moves[t]``: the rows moving into tier t this step, before and after the move
  (``before = P_{t-1} + D_{t-1}(r)``, ``after = P_t + D_t(Q_t(before - P_t))``);
* ``full``: every position as stored after the step, what attention reads.

Each ``P`` is :meth:`~kvcompile.kv.predict.CrossLayerPredictors.predict` of the layer before's form
of the same rows in the same tier (values: this layer's keys and the layer before's values)::

    P = R(p) ([R(-p) K̂, V̂] W + c)   (keys),   [R(-p) K̂, V̂] W + c   (values)

with the product in float64 rounded once to float32, as the torch reference does.  The head groups'
segments are :func:`kvcompile.ops.cache_update.update_body` with its ``on_move`` and ``trace`` hooks,
inlined (a residual cache has no custom op: its reading cost is the predictions, standard MatMuls).

Cost per layer and step: two ``[P+S, 2HD] x [2HD, HD]`` products over the whole context (``full``,
keys then values) plus small ones over the new and moving rows; ``bench/onnx_runtime.py`` measures it.
Every group of such a map is packed (an all-fp16 group stores fp16 residuals in segments), so the
moves re-encode fp16 rows too.
"""

from __future__ import annotations

import numpy as np

from kvcompile.export.decoder import _select_heads
from kvcompile.export.layout import HeadGroup
from kvcompile.ops.builder import Builder
from kvcompile.ops.cache_update import rope_body, update_body

FLOAT, DOUBLE = 1, 11  # ONNX element types


def add_predictor_weights(w, predictors) -> dict:
    """Initializers of the predictors (float32, cast to float64 in the graph, which ONNX Runtime folds
    once): ``{(stream, layer): (weight name, bias name)}``."""
    names = {}
    for stream, layers in predictors.maps.items():
        for layer, (weight, bias) in layers.items():
            names[(stream, layer)] = (w.add(f"predictors.{stream}.{layer}.weight", weight.numpy()),
                                      w.add(f"predictors.{stream}.{layer}.bias", bias.numpy()))
    return names


def predict(b: Builder, weights: tuple[str, str], stream: str, first: str, second: str, start: str,
            rope: tuple[str, str], heads: int, head_dim: int) -> str:
    """``P`` ``[B, H, T, D]`` of rows at positions ``start ..`` (1-D int64) from ``first`` (keys, after
    RoPE) and ``second`` (values) ``[B, H, T, D]``; ``rope``: the layer's full ``(cos, sin)`` tables."""
    first = rope_body(b, first, rope, start, head_dim, forward=False)
    flat = [b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), b.i64(0, 0, heads * head_dim))
            for x in (first, second)]  # [B, T, H D]; a 0 copies the (possibly empty) dimension
    rows = b.op("Cast", b.op("Concat", *flat, axis=-1), to=DOUBLE)
    weight, bias = (b.op("Cast", name, to=DOUBLE) for name in weights)
    out = b.op("Cast", b.op("Add", b.op("MatMul", rows, weight), bias), to=FLOAT)
    out = b.op("Transpose", b.op("Reshape", out, b.i64(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])
    return rope_body(b, out, rope, start, head_dim, forward=True) if stream == "key" else out


def _join(b: Builder, parts: list[tuple[tuple[int, ...], str]], total: int) -> str:
    """Per-group tensors ``[(heads, [B, h, T, D])]`` -> ``[B, total, T, D]`` in head order."""
    if len(parts) == 1:
        return parts[0][1]
    order = [h for heads, _ in parts for h in heads]
    x = b.op("Concat", *(t for _, t in parts), axis=1)
    return x if order == list(range(total)) else b.op("Gather", x, b.const(list(np.argsort(order)), np.int64), axis=1)


def predicted_states(b: Builder, pmap, layer: int, groups: dict[str, list[HeadGroup]], new: dict[str, str],
                     p_len: str, rope: tuple[str, str], weights: dict, previous: dict | None,
                     codec_nodes: bool = True) -> dict:
    """One layer's cache update: ``new`` ``{stream: [B, H, S, D]}`` (keys after RoPE) appended to the
    residual segments of ``groups`` ``{stream: [HeadGroup]}``; ``previous`` the layer before's
    record (None at layer 0, which predicts nothing).  Returns this layer's record
    ``{"entry"|"full": {stream: name}, "moves": {tier: {stream: (before, after)}}}``; attention
    reads ``record["full"]``.  ``codec_nodes``: formats the native library reads are quantized and
    de-quantized by ``KVQuantize`` / ``KVDequantize`` nodes (the library's kernels, else their
    function bodies), the others by their lowerings inlined."""
    heads, d = pmap.num_kv_heads, pmap.head_dim
    record: dict = {"entry": {}, "moves": {}, "full": {}}

    def prediction(stream: str, pick, start: str) -> str | None:
        if previous is None:
            return None
        first = pick(previous if stream == "key" else record)["key"]
        return predict(b, weights[(stream, layer)], stream, first, pick(previous)["value"], start, rope, heads, d)

    for stream in ("key", "value"):
        x = new[stream]
        p0 = prediction(stream, lambda r: r["entry"], p_len)
        residual = x if p0 is None else b.op("Sub", x, p0)
        move_predictions: dict = {}  # tier -> (P before, P after), all heads
        entries, fulls, moves = [], [], {}
        for g in groups[stream]:
            def on_move(tier, first, rows, g=g):
                if tier not in move_predictions:
                    move_predictions[tier] = tuple(
                        prediction(stream, lambda r, i=i: {s: f[i] for s, f in r["moves"][tier].items()}, first)
                        for i in (0, 1))
                old, new_p = move_predictions[tier]
                before = rows if old is None else b.op("Add", _select_heads(b, old, g.heads, heads), rows)
                moves.setdefault(tier, []).append((g, before))
                return before if new_p is None else b.op("Sub", before, _select_heads(b, new_p, g.heads, heads))

            trace: dict = {}
            present, full = update_body(b, g.op_attrs(pmap), [p.past for p in g.ports],
                                        _select_heads(b, residual, g.heads, heads), on_move=on_move, trace=trace,
                                        codec_nodes=codec_nodes)
            for port, name in zip(g.ports, present):
                b.op("Identity", name, outputs=[port.present])
            entries.append((g.heads, trace["entry"]))
            fulls.append((g.heads, full))
            for tier, kept in trace["moves"].items():
                moves[tier][-1] = (g, moves[tier][-1][1], kept)
        entry = _join(b, entries, heads)
        record["entry"][stream] = entry if p0 is None else b.op("Add", p0, entry)
        for tier, rows in moves.items():
            before = _join(b, [(g.heads, x) for g, x, _ in rows], heads)
            kept = _join(b, [(g.heads, k) for g, _, k in rows], heads)
            new_p = move_predictions[tier][1]
            record["moves"].setdefault(tier, {})[stream] = (before, kept if new_p is None else b.op("Add", new_p, kept))
        full = _join(b, fulls, heads)
        p_all = None if previous is None else prediction(stream, lambda r: r["full"], b.i64(0))
        record["full"][stream] = full if p_all is None else b.op("Add", p_all, full)
    return record
