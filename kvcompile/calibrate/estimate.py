"""Estimate the quality cost of storing each KV site in each candidate format.

A *site* is (layer, kv head, K|V).  For a candidate bulk scheme s, ``n`` fp16 sinks and an fp16
recent window of ``w`` positions, the cost is the predicted increase of the mean per-position
KL(p_reference || p_quantized) when only that site's bulk is stored in s (docs/theory.md).

Estimators (one interface, :data:`ESTIMATORS`):

* ``fisher``: with ``x`` the stored K/V (post-RoPE keys) and ``Q_s`` the scheme's round trip of its
  fp16 window form,
  ``cost = 1/2 * sum_{t >= n, i} F^(w)_{t,i} * (x_{t,i} - Q_s(x)_{t,i})^2 / positions`` where
  ``F^(w)_{t,i}`` is the curvature with respect to element i of position t *as read by queries at
  distance >= w* (nearer queries read the fp16 window form): the diagonal Fisher information, ``E_y[(d log p(y) / dx)^2]`` with ``y``
  sampled from the reference model's own next-token distribution, from one backward pass per
  window and sample.  Because the score has zero mean and the sampled tokens are independent,
  the square of the gradient of the *summed* log-likelihood is an unbiased estimate of the summed
  per-position Fisher diagonals.  Its cost is in nats of KL per position.
* ``hybrid`` (default): the *exact* change of the layer's attention output when the site is
  stored in s (softmax included, read by the queries at distance >= w), weighted by the diagonal
  Fisher information with respect to that attention output (same backward pass):
  ``cost = 1/2 sum_{q,c} F^o_{q,c} (o_hat_{q,c} - o_{q,c})^2``.  Only the propagation through later
  layers is linearized, so large score errors (2-bit keys) that move attention mass are captured;
  evaluated at ``HYBRID_QUERIES`` evenly spaced query positions per window and scaled up.
* ``attention``: closed form, forward only.  First-order sensitivity of every attention output
  to a stored key or value: ``d o_q / d k_t = a_qt (v_t - o_q) q^T / sqrt(d)`` and
  ``d o_q / d v_t = a_qt I``, so ``F_K[t, i] = sum_q a_qt^2 |v_t - o_q|^2 q_i^2 / d`` and
  ``F_V[t, i] = sum_q a_qt^2``.  Its cost is attention-output squared error per position, which
  ranks sites within a layer but ignores how much later layers amplify each layer's error.

To split by query distance, the calibration forward pass gives attention one copy of K and V per
distance bucket ``[w_b, w_{b+1})`` (b over the window options) and masks each copy to its bucket;
the gradient with respect to the copy of bucket b is the part of the total gradient that flows
through queries at those distances, and ``F^(w)`` uses the sum of the buckets at distance >= w.
The boundary is per position (a G-position block of a per-channel scheme is read in its bulk form
a little later than this assumes), which slightly overstates per-channel costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcompile.calibrate.artifact import Calibration
from kvcompile.data import DEFAULT_CALIBRATION_TEXT, load_text
from kvcompile.errors import KvcompileError
from kvcompile.kv.rope import roundtrip_at, stores_pre_rope
from kvcompile.kv.segments import SegmentRule
from kvcompile.models.attention_state import attention_state, state_of
from kvcompile.quant import get_scheme
from kvcompile.measure.quality import token_windows

from kvcompile.calibrate.defaults import DEFAULT_SCHEMES, DEFAULT_SINKS, DEFAULT_WINDOWS, ESTIMATORS  # noqa: F401
CORRECTION_TOKENS = 256  # the correction pass scores the first 256 tokens of each of its windows
HYBRID_QUERIES = 48  # query positions per window at which the hybrid estimator evaluates exact attention
HYBRID_CHUNKS = 4  # the sampled queries in this many chunks, each over the keys it can read
IMPLEMENTATION = "kvcompile_calib"
STREAM_INDEX = {"key": 0, "value": 1}


@dataclass
class _Pass:
    """State of one calibration forward pass, read by the attention function."""

    estimator: str
    window_options: list[int]
    layers: dict[int, dict] = field(default_factory=dict)
    ropes: list | None = None  # per layer, when a scheme stores keys before RoPE
    predictors: object = None  # CrossLayerPredictors: costs are those of storing prediction residuals
    predictor_rope: object = None  # the model's RoPE tables, with predictors

    def predictions(self, layer: int) -> tuple:
        """``(P_K, P_V)`` [H, T, D] of ``layer`` from the exact K/V (every other site exact), or ``(None, None)``."""
        if self.predictors is None or layer == 0:
            return None, None
        prev, rec = self.layers[layer - 1], self.layers[layer]
        k = self.predictors.predict("key", layer, prev["key"], prev["value"], self.predictor_rope)[0]
        v = self.predictors.predict("value", layer, rec["key"], prev["value"], self.predictor_rope)[0]
        return k, v



def distance_buckets(seq_len: int, edges: list[int]) -> torch.Tensor:
    """``[buckets, T, T]`` bool: query i reads key j through bucket b iff ``edges[b] <= i - j < edges[b+1]``."""
    d = torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]
    bounds = [*edges, seq_len + 1]
    return torch.stack([(d >= lo) & (d < hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _calibration_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    state = state_of(module, "kvcompile_calib (calibration pass)")
    groups = query.shape[1] // key.shape[1]
    t = key.shape[-2]
    buckets = distance_buckets(t, state.window_options).to(query.device)
    if kwargs.get("sliding_window"):  # a sliding-window layer reads no key W or more positions back
        near = (torch.arange(t)[:, None] - torch.arange(t)[None, :] < kwargs["sliding_window"]).to(query.device)
        buckets = buckets & near
    causal = buckets.any(0)
    record = {"key": key.detach(), "value": value.detach()}
    if state.estimator in ("fisher", "hybrid"):
        k_copies = [key.clone() for _ in buckets]
        v_copies = [value.clone() for _ in buckets]
        for c in (*k_copies, *v_copies):
            c.retain_grad()
        scores = sum(m * (query @ _repeat(k, groups).transpose(-1, -2)) for m, k in zip(buckets, k_copies)) * scaling
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = sum((weights * m) @ _repeat(v, groups) for m, v in zip(buckets, v_copies))
        out.retain_grad()  # the hybrid estimator's Fisher is with respect to the attention output
        record.update(key_copies=k_copies, value_copies=v_copies, out=out, query=query.detach(), scaling=scaling,
                      groups=groups)
    else:
        scores = (query @ _repeat(key, groups).transpose(-1, -2)) * scaling
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = weights @ _repeat(value, groups)
        record.update(_closed_form(query.detach(), value.detach(), weights.detach(), out.detach(), buckets, groups))
    state.layers[module.layer_idx] = record
    return out.transpose(1, 2).contiguous(), None


def _closed_form(q, v, a, o, buckets, groups):
    """Per-bucket first-order sensitivities of attention outputs to stored K and V, [buckets, B, Hkv, T, D]."""
    b, hq, t, d = q.shape
    v_rep = _repeat(v, groups)
    # |v_t - o_q|^2 = |v_t|^2 - 2 v_t . o_q + |o_q|^2, as a [B, Hq, T_q, T_k] matrix
    dist2 = (v_rep.pow(2).sum(-1)[..., None, :] - 2 * o @ v_rep.transpose(-1, -2) + o.pow(2).sum(-1)[..., :, None]).clamp(min=0)
    a2 = a.pow(2)
    fk, fv = [], []
    for m in buckets:
        wk = a2 * dist2 * m
        k_sens = (wk.transpose(-1, -2) @ q.pow(2)) / d  # [B, Hq, T_k, D]
        v_sens = (a2 * m).sum(-2)[..., None].expand(b, hq, t, d)
        fk.append(k_sens.reshape(b, hq // groups, groups, t, d).sum(2))
        fv.append(v_sens.reshape(b, hq // groups, groups, t, d).sum(2))
    return {"key_sens": torch.stack(fk), "value_sens": torch.stack(fv)}


ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _calibration_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def _group_range(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Mean (max - min) of per-token groups of ``group`` channels, per head: [H]."""
    g = x.reshape(*x.shape[:-1], -1, group)
    return (g.amax(-1) - g.amin(-1)).mean(dim=(0, 2, 3))


def calibrate(lm, text: str = DEFAULT_CALIBRATION_TEXT, windows: int = 4, window: int = 512, estimator: str = "hybrid",
              schemes: list[str] | None = None, sink_options: list[int] | None = None,
              window_options: list[int] | None = None, samples: int = 1, seed: int = 0,
              correction_windows: int = 1, predictors=None, progress: bool = True) -> Calibration:
    """Measure the cost table of :class:`Calibration` on ``windows`` windows of ``window`` tokens of ``text``.

    ``correction_windows`` > 0 also measures, on the first 256 tokens of that many of the same windows, the real KL of every
    candidate scheme applied to all sites (no sinks, no window) and stores ``measured / predicted``
    per scheme as ``correction`` (the data-calibrated constant c of docs/theory.md, section 5).

    ``predictors`` (:class:`kvcompile.kv.predict.CrossLayerPredictors`): every cost is that of storing
    the site's residual from its cross-layer prediction (made from the exact layer before); the menu
    then holds per-token schemes stored after RoPE only (the default menu's others are left out).
    """
    from tqdm.auto import tqdm

    if estimator not in ESTIMATORS:
        raise KvcompileError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    asked = schemes is not None
    schemes = list(schemes or DEFAULT_SCHEMES)
    for name in schemes:
        get_scheme(name)
    if predictors is not None:
        if (predictors.num_layers, predictors.num_kv_heads, predictors.head_dim) != \
                (lm.geometry.num_layers, lm.geometry.num_kv_heads, lm.geometry.head_dim) or any(lm.geometry.layer_windows):
            raise KvcompileError(f"predictors are for {predictors.model} ({predictors.num_layers} layers x "
                                 f"{predictors.num_kv_heads} kv heads x {predictors.head_dim}); expected predictors "
                                 f"fitted on {lm.name}, a model without sliding-window layers")
        unfit = [n for n in schemes if get_scheme(n).token_group != 1 or stores_pre_rope(get_scheme(n))]
        if unfit and asked:
            raise KvcompileError(f"schemes {', '.join(unfit)} group positions or store keys before RoPE; "
                                 "cross-layer prediction needs per-token schemes stored after RoPE")
        schemes = [n for n in schemes if n not in unfit]
    # Defaults adapt to short windows; options the user asked for must fit (checked below).
    sink_options = sorted(set(sink_options if sink_options is not None else [n for n in DEFAULT_SINKS if n < window]))
    window_options = sorted(set(window_options if window_options is not None else [w for w in DEFAULT_WINDOWS if w < window]))
    if window_options[0] != 0:
        window_options = [0, *window_options]  # buckets must cover distance 0
    if max(window_options) >= window or max(sink_options) >= window:
        raise KvcompileError(f"sink and window options must be shorter than the calibration window of {window} tokens")
    geom = lm.geometry
    model = lm.model
    ids_all = token_windows(lm.tokenizer, load_text(text), window, windows)
    shape = (geom.num_layers, geom.num_kv_heads, 2, len(schemes), len(window_options), len(sink_options))
    cost = torch.zeros(shape, dtype=torch.float64)
    curvature = torch.zeros(geom.num_layers, geom.num_kv_heads, 2, len(window_options), dtype=torch.float64)
    diameter = torch.zeros(geom.num_layers, geom.num_kv_heads, 2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    needs_backward = estimator in ("fisher", "hybrid")
    passes = len(ids_all) * (samples if needs_backward else 1)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    bar = tqdm(total=passes, desc=f"calibrate ({estimator})", unit="pass", disable=not progress, leave=False)
    state = _Pass(estimator, window_options, predictors=predictors)
    if any(stores_pre_rope(get_scheme(s)) for s in schemes):
        from kvcompile.models.rope import layer_ropes

        state.ropes = layer_ropes(model, window)
    if predictors is not None:
        from kvcompile.models.rope import layer_ropes

        state.predictor_rope = layer_ropes(model, window)[0]
    try:
        with attention_state(model, state, IMPLEMENTATION, "calibration"):
            for ids in ids_all:
                for _ in range(samples if needs_backward else 1):
                    state.layers = {}
                    with torch.enable_grad() if needs_backward else torch.no_grad():
                        embeds = model.get_input_embeddings()(ids[None]).detach()
                        if needs_backward:
                            embeds.requires_grad_(True)  # so layer 0's K/V copies are part of the graph
                        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, :-1]
                        if needs_backward:
                            targets = torch.multinomial(F.softmax(logits.detach().float(), -1), 1, generator=generator)[:, 0]
                            F.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum().backward()
                    _accumulate(state, cost, curvature, diameter, schemes, sink_options, estimator)
                    bar.update()
    finally:
        for p, r in zip(model.parameters(), requires_grad):
            p.requires_grad_(r)
        bar.close()
    positions = passes * (window - 1)
    elements = passes * window * geom.head_dim
    cost, curvature, diameter = cost / positions, curvature / elements, diameter / passes
    correction = torch.ones(len(schemes), dtype=torch.float64)
    predicted = torch.zeros(len(schemes), dtype=torch.float64)
    measured = torch.zeros(len(schemes), dtype=torch.float64)
    if correction_windows and needs_backward and 0 in sink_options:
        from kvcompile.kv.precision_map import PrecisionMap
        from kvcompile.measure.quality import mean_kl

        n0 = sink_options.index(0)
        for i, name in enumerate(tqdm(schemes, desc="correction", disable=not progress, leave=False)):
            predicted[i] = cost[:, :, :, i, 0, n0].sum()
            if name == "fp16" or predicted[i] <= 0:
                continue
            scheme = get_scheme(name)  # values: a pre-RoPE key format's base (values have no RoPE)
            pmap = PrecisionMap.uniform(geom.num_layers, geom.num_kv_heads, geom.head_dim, key=name,
                                        value=scheme.base.name if stores_pre_rope(scheme) else name)
            if predictors is not None:
                from dataclasses import replace

                from kvcompile.kv.predict import register

                pmap = replace(pmap, predictors={"path": "", "sha256": register(predictors)})
            measured[i] = mean_kl(model, ids_all[:correction_windows, :CORRECTION_TOKENS], pmap)
            correction[i] = measured[i] / predicted[i]
    return Calibration(
        model=lm.name, geometry=geom, text=text, windows=len(ids_all), window=window, estimator=estimator,
        cost_unit="nats of KL per position" if needs_backward else "attention-output squared error per position",
        schemes=schemes, sink_options=sink_options, window_options=window_options,
        cost=cost, curvature=curvature, diameter=diameter, correction=correction,
        seconds=time.perf_counter() - start,
        extra={"samples": samples, "seed": seed, "correction_windows": correction_windows,
               "uniform_predicted": predicted.tolist(), "uniform_measured": measured.tolist()},
        predictors=predictors,
    )


def _accumulate(state: _Pass, cost, curvature, diameter, schemes, sink_options, estimator) -> None:
    for layer, rec in state.layers.items():
        rope = state.ropes[layer] if state.ropes else None
        preds = state.predictions(layer)
        if estimator == "hybrid":
            _hybrid_costs(rec, layer, cost, schemes, sink_options, state.window_options, rope, preds)
        for stream, s_idx in STREAM_INDEX.items():
            x, pred = rec[stream].float(), preds[s_idx]
            if estimator in ("fisher", "hybrid"):
                grads = torch.stack([c.grad.float() for c in rec[f"{stream}_copies"]])  # [buckets, B, H, T, D]
                # gradient through queries at distance >= w_b: suffix sums over buckets, then squared
                sens = grads.flip(0).cumsum(0).flip(0).pow(2)
            else:
                sens = rec[f"{stream}_sens"].float().flip(0).cumsum(0).flip(0)
            curvature[layer, :, s_idx] += sens.sum(dim=(1, 3, 4)).T.double()
            diameter[layer, :, s_idx] += _group_range(x if pred is None else x - pred[None]).double()
            if estimator == "hybrid":
                continue  # costs come from _hybrid_costs
            # 1/2 sum F e^2 with e = x - (bulk form); zero where a position is not stored in the bulk
            forms_all = _stored_bulk_forms(x[0], schemes, sink_options, rope if stream == "key" else None, pred)
            for n_idx, forms in enumerate(forms_all):  # [S, H, T, D]
                err = (x[0] - forms).pow(2)
                cost[layer, :, s_idx, :, :, n_idx] += 0.5 * torch.einsum("bhtd,shtd->hsb", sens[:, 0], err).double()


def _stored_bulk_forms(x: torch.Tensor, schemes: list[str], sink_options: list[int], rope=None,
                       pred: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per sink count n: [S, H, T, D], each scheme's bulk form of ``x`` [H, T, D] (positions 0 .. T-1) at
    the positions it can hold (from n on, in whole blocks), the exact values elsewhere (read as fp16
    sinks / window).  ``rope``: the layer's RoPE tables for keys; a pre-RoPE scheme quantizes the
    un-rotated keys.  Values pass None and a pre-RoPE scheme is costed as its base there (the
    planner never gives it values).  ``pred`` [H, T, D]: a cross-layer prediction; the schemes (per-token)
    then store the residual ``x - pred`` and the form is ``pred + Q(x - pred)``."""
    t = x.shape[-2]
    window_form = (x if pred is None else x - pred).half().float()
    forms = [x.expand(len(schemes), *x.shape).clone() for _ in sink_options]
    for i, name in enumerate(schemes):
        scheme = get_scheme(name)
        if stores_pre_rope(scheme) and rope is None:
            scheme = scheme.base
        g = scheme.token_group
        per_token = scheme.roundtrip(window_form) if g == 1 else None  # independent of n
        if pred is not None:
            per_token = per_token + pred
        for n_idx, n in enumerate(sink_options):
            full = SegmentRule(n, 0, g).bulk_length(t)  # positions that reach the bulk once the window has passed
            if not full:
                continue
            part = per_token[:, n : n + full] if g == 1 else roundtrip_at(scheme, window_form[:, n : n + full], rope, n)
            forms[n_idx][i, :, n : n + full] = part
    return forms


@torch.no_grad()
def _hybrid_costs(rec: dict, layer: int, cost, schemes, sink_options, window_options, rope=None,
                  preds: tuple = (None, None)) -> None:
    """Exact attention-output change per (kv head, K|V, scheme, window, sinks), Fisher-weighted;
    ``rope``: the layer's RoPE tables (keys stored before RoPE); ``preds``: cross-layer predictions of K, V."""
    q_all, k_all, v_all = rec["query"][0].float(), rec["key"][0].float(), rec["value"][0].float()
    fisher_o = rec["out"].grad[0].float().pow(2)  # [Hq, T, D]
    groups, scaling = rec["groups"], rec["scaling"]
    t = k_all.shape[-2]
    queries = torch.linspace(0, t - 1, min(HYBRID_QUERIES, t)).round().long().unique()
    scale = (t - 1) / len(queries)  # the sampled queries stand for all scored positions
    j = torch.arange(t)
    dist = queries[:, None] - j[None, :]  # [Qs, T]
    causal = dist >= 0
    k_forms = _stored_bulk_forms(k_all, schemes, sink_options, rope, preds[0])  # per n: [S, H, T, D]
    v_forms = _stored_bulk_forms(v_all, schemes, sink_options, None, preds[1])
    # Query chunks, each over the keys up to its last query (later keys are causally masked for all
    # of its queries): the same sums with about 5/8 of the work of one chunk over all T keys.
    chunks = [c for c in torch.tensor_split(torch.arange(len(queries)), HYBRID_CHUNKS) if len(c)]
    for h in range(k_all.shape[0]):
        heads = slice(h * groups, (h + 1) * groups)
        for rows in chunks:
            keys = int(queries[rows[-1]]) + 1
            q, k, v = q_all[heads][:, queries[rows]], k_all[h, :keys], v_all[h, :keys]  # [G, Qc, D], [Tc, D]
            f = fisher_o[heads][:, queries[rows]]  # [G, Qc, D]
            d, c, jc = dist[rows, :keys], causal[rows, :keys], j[:keys]
            s_ref = (q @ k.T) * scaling
            a_ref = torch.softmax(s_ref.masked_fill(~c, float("-inf")), -1)  # [G, Qc, Tc]
            o_ref = a_ref @ v
            for n_idx, n in enumerate(sink_options):
                s_hat = (q[None] @ k_forms[n_idx][:, h, :keys].transpose(-1, -2)[:, None]) * scaling  # [S, G, Qc, Tc]
                dv = v_forms[n_idx][:, h, :keys] - v  # [S, Tc, D]
                for w_idx, w in enumerate(window_options):
                    read = (d >= w) & (jc[None, :] >= n)  # queries read the bulk form of these positions
                    s = torch.where(read, s_hat, s_ref).masked_fill(~c, float("-inf"))
                    d_o = torch.softmax(s, -1) @ v - o_ref  # [S, G, Qc, D]
                    cost[layer, h, 0, :, w_idx, n_idx] += 0.5 * scale * (f * d_o.pow(2)).sum(dim=(1, 2, 3)).double()
                    d_o = (a_ref * read)[None] @ dv[:, None]  # values: exactly linear in v
                    cost[layer, h, 1, :, w_idx, n_idx] += 0.5 * scale * (f * d_o.pow(2)).sum(dim=(1, 2, 3)).double()
