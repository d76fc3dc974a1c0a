"""MixedPrecisionCache: a ``transformers`` Cache that stores every position at its planned precision.

For each layer and each stream (keys, values) the kv heads are grouped by their
schemes (:mod:`kvcompile.kv.grouping`); each group is a :class:`~kvcompile.kv.store.SegmentStore`
of packed segments, three for a map without recency tiers:

    positions  [0, n)        sink    scheme  (first n = sink_tokens positions)
               [n, e)        bulk    scheme  (e from :mod:`kvcompile.kv.segments`)
               [e, L)        recent  scheme  (last recent_window positions + an incomplete bulk block)

A new position is quantized into the sink or recent segment.  When it ages out of the window
(``e`` grows) it is taken from the recent segment, de-quantized and re-quantized into the bulk
scheme: the original float values are gone by then, as in a real cache.  Per-channel bulk
schemes move G positions at a time.  A map with recency tiers moves positions recent -> age1 ->
... -> bulk the same way, one re-quantization per tier.  ``update`` returns the de-quantized K/V of *all* cached
positions (the new ones included, at the precision they are stored at), which is what attention
then reads; no float copy is kept, so :meth:`MixedPrecisionCache.nbytes` is the true footprint.

With ``kernels=True`` (GPU, or CPU under ``TRITON_INTERPRET=1``) new positions are quantized by
the Triton append kernel (bit-identical to the reference) and a decode step does not
de-quantize at all: ``update`` returns :class:`PackedView` markers and the ``kvcompile_kernels``
attention implementation (:func:`enable_kernel_attention`) runs the fused decode-attention
kernel on the packed segments.  Prefill steps attend over de-quantized states as before.

A sliding-window layer of the map (``pmap.window(layer) = W``) stores each group in a
:class:`~kvcompile.kv.store.WindowStore` instead: one per-token scheme, the last ``W - 1``
positions kept between updates, so the layer never holds more than its window (plus the
positions of the update in progress).  ``update`` returns the stored and new positions, and
:meth:`MixedPrecisionLayer.get_mask_sizes` tells ``transformers``' sliding-window mask where they
start.  In the kernel mode a decode step appends, the fused kernel reads the window's W positions
(exactly the ones the new query may read), and the window is evicted to its last W - 1 after.

A map that stores keys before RoPE (``-pr`` schemes) needs the model's RoPE tables
(``rope=``, :func:`model_ropes`): those keys are rotated back by their position when stored and
forward when read (:mod:`kvcompile.kv.rope`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcompile.errors import CacheError
from kvcompile.kv.grouping import joint_groups, stream_groups
from kvcompile.kv.precision_map import STREAMS, PrecisionMap
from kvcompile.kv.rope import RopeTable
from kvcompile.kv.store import SegmentStore, WindowStore, reference_quantize
from kvcompile.quant import QuantizedTensor


class MixedPrecisionLayer(CacheLayerMixin):
    """One decoder layer's K and V at the precisions a :class:`PrecisionMap` assigns."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, pmap: PrecisionMap, layer_idx: int, max_context: int, kernels: bool = False,
                 rope: RopeTable | None = None, chain: "_PredictionChain | None" = None):
        super().__init__()
        self.pmap = pmap
        self.chain = chain
        self.rope = rope
        self.layer_idx = layer_idx
        self.max_context = max_context
        self.kernels = kernels
        self.length = 0
        self.window = pmap.window(layer_idx)
        self.is_sliding = bool(self.window)  # read by transformers' mask functions
        self.stores: dict[str, list[SegmentStore | WindowStore]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._setup(key_states.device, key_states.dtype, key_states.shape[0])

    def _setup(self, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        if self.kernels:
            from kvcompile.kernels import available

            ok, reason = available(torch.device(device).type)
            if not ok:
                raise CacheError(f"MixedPrecisionCache(kernels=True) cannot run on {torch.device(device).type}: {reason}")
            from kvcompile.kernels import quantize_for_store as quantize
        else:
            quantize = reference_quantize
        for stream in STREAMS:
            self.stores[stream] = [
                WindowStore(heads, schemes["bulk"], self.window, quantize) if self.window else
                SegmentStore(heads, schemes, self.pmap.segment_rule(self.layer_idx, heads[0], stream), quantize,
                             self.rope if stream == "key" else None)
                for schemes, heads in stream_groups(self.pmap, self.layer_idx, stream)
            ]
        self.is_initialized = True

    def _check(self, states: torch.Tensor, stream: str) -> None:
        expected = (self.pmap.num_kv_heads, self.pmap.head_dim)
        if states.dim() != 4 or (states.shape[1], states.shape[3]) != expected:
            raise CacheError(f"layer {self.layer_idx} {stream}s: expected [batch, {expected[0]}, tokens, {expected[1]}], "
                             f"got {list(states.shape)}")
        if not torch.isfinite(states).all():
            raise CacheError(f"layer {self.layer_idx}: {stream} states contain NaN or inf; expected finite values "
                             "(the model diverged before the cache)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.length + new > self.max_context:
            raise CacheError(f"context of {self.length + new} positions exceeds the cache's maximum of {self.max_context} "
                             "(max_context); create the cache with a larger max_context")
        if self.chain is not None:
            return self._update_predicted(key_states, value_states)
        if self.kernels and new == 1:  # decode: store only; attention reads the packed segments
            for stream, states in (("key", key_states), ("value", value_states)):
                self._check(states, stream)
                for g in self.stores[stream]:
                    g.append(states[:, g.heads] if len(self.stores[stream]) > 1 else states, self.length)
            self.length += new
            view = PackedView(self)
            return view, view
        out = []
        for stream, states in (("key", key_states), ("value", value_states)):
            self._check(states, stream)
            groups = self.stores[stream]
            for g in groups:
                g.append(states[:, g.heads] if len(groups) > 1 else states, self.length)
            held = groups[0].length
            if held == 0:  # an empty update of an empty cache: nothing stored, nothing to read
                full = torch.empty(states.shape[0], states.shape[1], 0, states.shape[3])
            elif len(groups) == 1:
                full = groups[0].read()
            else:
                full = torch.empty(states.shape[0], states.shape[1], held, states.shape[3])
                for g in groups:
                    full[:, g.heads] = g.read()
            out.append(full.to(device=self.device, dtype=self.dtype))
            if self.window:
                for g in groups:
                    g.evict()
        self.length += new
        return out[0], out[1]

    def _update_predicted(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`update` of a map with cross-layer predictors (:mod:`kvcompile.kv.predict`).

        The stores hold residuals.  Every site of such a map moves the same positions at the same
        step, so the layer before (updated just now, in this step) hands over its forms of the new
        positions (``entry``), of each tier move's rows before and after it (``moves``) and of all
        positions (``full``).  A new position stores ``x - p_0``; a move into tier t re-encodes the
        rows as ``p_t + Q_t(form_{t-1} - p_t)``, ``p_t`` the prediction from the layer before's
        tier-t form; attention reads ``P(X̂_{l-1}) + residual``.  Values predict from this layer's keys,
        so keys go first."""
        chain, layer, start = self.chain, self.layer_idx, self.length
        prev = None
        if layer:
            if chain.previous is None or chain.previous[0] != layer - 1:
                raise CacheError(f"layer {layer}: cross-layer prediction needs the layer before updated first, in the "
                                 "same step; expected the layers updated in order")
            prev = chain.previous[1]
        record = {"entry": {}, "moves": {}, "full": {}}

        def prediction(stream: str, pick, position: int):
            """P of ``stream`` from ``pick(record)`` of the layer before (K, V) or of this layer (K) and the
            layer before (V), rows from ``position`` on; None at layer 0."""
            if prev is None:
                return None
            first = pick(prev if stream == "key" else record)["key"]
            return chain.predictors.predict(stream, layer, first, pick(prev)["value"], self.rope, position)

        for stream, states in (("key", key_states), ("value", value_states)):
            self._check(states, stream)
            x = states.float()
            p0 = prediction(stream, lambda r: r["entry"], start)
            residual = x if p0 is None else x - p0
            entry = torch.empty_like(x)
            moves = {}  # tier -> (p before, p after, form before, form after), every head

            def on_move(group, tier, first, leaving):
                if tier not in moves:
                    shape = (x.shape[0], x.shape[1], leaving.shape[-2], x.shape[-1])
                    old = prediction(stream, lambda r: {s: f[0] for s, f in r["moves"][tier].items()}, first)
                    new = prediction(stream, lambda r: {s: f[1] for s, f in r["moves"][tier].items()}, first)
                    moves[tier] = (old, new, torch.empty(shape), torch.empty(shape))
                old, new, form_before, form_after = moves[tier]
                h = group.heads
                form = leaving if old is None else old[:, h] + leaving
                target = form if new is None else form - new[:, h]
                scheme = group.schemes[group.rule.tiers[tier]]
                kept = scheme.dequantize(scheme.quantize(target))  # what the store keeps of ``target``
                form_before[:, h] = form
                form_after[:, h] = kept if new is None else new[:, h] + kept
                return target

            groups = self.stores[stream]
            for group in groups:
                part = residual[:, group.heads] if len(groups) > 1 else residual
                sinks = group.rule.new_sinks(start, part.shape[-2])
                for cls, rows in (("sink", slice(0, sinks)), ("recent", slice(sinks, part.shape[-2]))):
                    q = part[..., rows, :]
                    if q.shape[-2]:
                        kept = group.schemes[cls].dequantize(group.schemes[cls].quantize(q))
                        entry[:, group.heads, rows] = kept if p0 is None else p0[:, group.heads, rows] + kept
                group.append(part, start, lambda tier, first, leaving, g=group: on_move(g, tier, first, leaving))
            record["entry"][stream] = entry
            for tier, (_, _, before, after) in moves.items():
                record["moves"].setdefault(tier, {})[stream] = (before, after)
            full = torch.empty(x.shape[0], x.shape[1], groups[0].length, x.shape[-1])
            for group in groups:
                full[:, group.heads] = group.read()
            p_all = prediction(stream, lambda r: r["full"], 0)
            record["full"][stream] = full if p_all is None else full + p_all
        chain.previous = (layer, record)
        self.length += key_states.shape[-2]
        return (record["full"]["key"].to(device=self.device, dtype=self.dtype),
                record["full"]["value"].to(device=self.device, dtype=self.dtype))

    def decode_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Fused decode attention over the packed cache: ``query`` [B, Hq, 1, D] -> [B, 1, Hq, D].

        Heads are processed in groups that share both their K and their V scheme triples; within
        a group the positions are cut into runs where the K segment and the V segment are both
        fixed (their bulk blocks can end at different positions), each run one kernel segment.
        """
        from kvcompile.kernels.attention import Segment, decode_attention

        b, hq, _, d = query.shape
        rep = hq // self.pmap.num_kv_heads
        out = torch.empty(b, hq, d, dtype=torch.float32, device=query.device)
        # positions in store order: all of them, or a window layer's (after this step's append, the
        # query's own window: the last W)
        total = self.stores["key"][0].length if self.window else self.length
        for heads in joint_groups(self.pmap, self.layer_idx):
            runs = []
            stored = {s: next(g for g in self.stores[s] if heads[0] in g.heads).stored(heads) for s in STREAMS}
            cuts = sorted({0, total, *(start for s in STREAMS for start, _ in stored[s])})
            for a, z in zip(cuts[:-1], cuts[1:]):
                (ks, k), (vs, v) = (next((st, x) for st, x in reversed(stored[s]) if st <= a) for s in STREAMS)
                runs.append(Segment(k, a - ks, v, a - vs, z - a))
            q_heads = torch.tensor([h * rep + r for h in heads for r in range(rep)], device=query.device)
            out[:, q_heads] = decode_attention(query[:, q_heads, 0].float(), runs, scaling)
        if self.window:  # read: now drop what no later query reads
            for groups in self.stores.values():
                for g in groups:
                    g.evict()
        return out[:, None].to(query.dtype)

    def held(self) -> int:
        """Positions stored now (all of them, or a window layer's last W - 1 at most)."""
        if not self.window or not self.is_initialized:
            return self.length
        return self.stores["key"][0].length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the next update returns, position of the first of them)."""
        held = self.held()
        return held + query_length, self.length - held

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_context

    def reset(self) -> None:
        self.length = 0
        self.stores = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise CacheError("MixedPrecisionCache does not support beam search reordering yet; use greedy or sampling")

    def nbytes(self) -> int:
        return sum(g.nbytes() for groups in self.stores.values() for g in groups)

    def snapshot(self) -> dict:
        """The packed state (segments copied into their own storage, so its size is its true bytes)."""
        if not self.is_initialized:
            return {"length": 0}
        compact = lambda q: None if q is None else QuantizedTensor(  # noqa: E731
            q.scheme, q.shape, {k: v.clone() for k, v in q.parts.items()})
        return {"length": self.length, "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size,
                "segments": {stream: [{c: compact(q) for c, q in g.segments.items()} for g in groups]
                             for stream, groups in self.stores.items()}}

    def restore(self, state: dict) -> None:
        """Become the layer whose :meth:`snapshot` is ``state`` (segments are shared, never written in place)."""
        self.reset()
        if not state["length"]:
            return
        self._setup(state["device"], state["dtype"], state["batch_size"])
        for stream, groups in self.stores.items():
            for g, segments in zip(groups, state["segments"][stream], strict=True):
                g.segments = dict(segments)
        self.length = state["length"]


class PackedView:
    """What a kernel-mode cache returns as "keys" and "values" of a decode step: the layer itself,
    for the ``kvcompile_kernels`` attention to read packed.  Any other attention fails clearly."""

    def __init__(self, layer: "MixedPrecisionLayer"):
        self.layer = layer

    def __getattr__(self, name):
        raise CacheError("a MixedPrecisionCache with kernels=True needs the model's attention set to "
                         "'kvcompile_kernels': call kvcompile.cache.enable_kernel_attention(model)")


class _PredictionChain:
    """What cross-layer prediction passes from one layer's update to the next one's in the same step:
    ``previous = (layer, {"entry"|"moves"|"full": forms})`` (float32, one layer's worth, transient)."""

    def __init__(self, predictors):
        self.predictors = predictors
        self.previous = None


class MixedPrecisionCache(Cache):
    """A ``transformers`` Cache storing K/V per position at the precisions of ``pmap``.

    Use it like any cache: ``model(ids, cache=c)`` or ``model.generate(ids, cache=c)``.
    ``max_context`` (default: the map's model limit passed by the caller, else 8192) bounds the
    number of positions; exceeding it raises :class:`CacheError`.  ``kernels=True`` uses the
    Triton kernels (see the module docstring; needs :func:`enable_kernel_attention` on the model).
    ``rope``: per layer, the model's RoPE tables over ``max_context`` positions (:func:`model_ropes`);
    needed only when the map stores keys before RoPE or predicts across layers.
    """

    def __init__(self, pmap: PrecisionMap, max_context: int = 8192, kernels: bool = False,
                 rope: "list[RopeTable] | None" = None):
        self.pmap = pmap
        self.max_context = max_context
        chain = None
        if pmap.predictors is not None:
            if kernels:
                raise CacheError("MixedPrecisionCache(kernels=True): the map stores cross-layer prediction residuals, "
                                 "which the kernels do not read; expected kernels=False")
            from kvcompile.kv.predict import resolve

            if rope is None:
                raise CacheError("the map stores cross-layer prediction residuals, predicted from keys before RoPE; "
                                 "pass the model's RoPE tables: MixedPrecisionCache(pmap, max_context, "
                                 "rope=model_ropes(model, pmap, max_context))")
            chain = _PredictionChain(resolve(pmap.predictors))
            predictors = chain.predictors
            if (predictors.num_layers, predictors.num_kv_heads, predictors.head_dim) != \
                    (pmap.num_layers, pmap.num_kv_heads, pmap.head_dim):
                raise CacheError(f"the map's predictors are for {predictors.num_layers} layers x {predictors.num_kv_heads} "
                                 f"kv heads x {predictors.head_dim}; expected the map's geometry")
        if pmap.keys_pre_rope():
            if rope is None:
                raise CacheError("the map stores keys before RoPE (-pr schemes); pass the model's RoPE tables: "
                                 "MixedPrecisionCache(pmap, max_context, rope=model_ropes(model, pmap, max_context))")
        if rope is not None and (pmap.keys_pre_rope() or chain is not None):
            if len(rope) != pmap.num_layers or min(r.positions for r in rope) < max_context:
                raise CacheError(f"rope: expected {pmap.num_layers} layer tables of at least {max_context} positions, "
                                 f"got {len(rope)} of {min((r.positions for r in rope), default=0)}")
        if kernels:
            from kvcompile.kernels import unsupported_reason

            for site in pmap.sites():
                for scheme in pmap.class_schemes(*site):
                    if (reason := unsupported_reason(scheme)) is not None:
                        raise CacheError(f"MixedPrecisionCache(kernels=True): {reason}")
        super().__init__(layers=[MixedPrecisionLayer(pmap, i, max_context, kernels, rope[i] if rope else None, chain)
                                 for i in range(pmap.num_layers)])

    def nbytes(self) -> int:
        """Bytes of packed K/V actually held (codes, scales, zero points), all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def snapshot(self) -> list[dict]:
        """Packed state of every layer, for :meth:`restore` (used by :class:`kvcompile.cache.PrefixCache`)."""
        return [layer.snapshot() for layer in self.layers]

    def restore(self, state: list[dict]) -> "MixedPrecisionCache":
        """Replace this cache's content with a :meth:`snapshot` taken from a cache of the same map."""
        if len(state) != len(self.layers):
            raise CacheError(f"snapshot has {len(state)} layers; this cache has {len(self.layers)}")
        for layer, layer_state in zip(self.layers, state):
            layer.restore(layer_state)
        return self

    def bits_per_element(self) -> float:
        """Stored bits per element of the K/V the cache holds now (window layers: their window)."""
        length = self.get_seq_length()
        batch = self.batch_size if length else 0
        held = sum(layer.held() for layer in self.layers)
        elements = 2 * self.pmap.num_kv_heads * self.pmap.head_dim * held * max(batch, 1)
        return 8 * self.nbytes() / elements if length else 0.0


def model_ropes(model, pmap: PrecisionMap, max_context: int) -> "list[RopeTable] | None":
    """The ``rope=`` argument of a cache of ``pmap`` for ``model``: its per-layer RoPE tables when
    the map stores keys before RoPE or predicts across layers, else None (nothing to compute)."""
    if not pmap.keys_pre_rope() and pmap.predictors is None:
        return None
    from kvcompile.models.rope import layer_ropes

    return layer_ropes(model, max_context)


KERNEL_ATTENTION = "kvcompile_kernels"


def _kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Decode steps of a kernel-mode cache: fused kernel on the packed cache; anything else: sdpa."""
    if isinstance(key, PackedView):
        return key.layer.decode_attention(query, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def enable_kernel_attention(model) -> None:
    """Route ``model``'s attention through ``kvcompile_kernels`` (needed by ``kernels=True`` caches)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(KERNEL_ATTENTION, _kernel_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KERNEL_ATTENTION, sdpa_mask)
    model.set_attn_implementation(KERNEL_ATTENTION)
