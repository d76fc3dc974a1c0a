"""Retrieval heads: the kv heads through which the model copies a fact from far back.

Wu et al. (arXiv 2404.15574, "Retrieval Head Mechanistically Explains Long-Context Factuality")
find that a few per cent of attention heads do the copying in needle-in-a-haystack retrieval, and
that breaking them breaks retrieval while perplexity barely moves.  That is what the planner's
objective (mean KL on running text) cannot see: on SmolLM2-135M every map of about 3 bits loses
the pass keys the full-precision cache finds (README, "quality per bit").

The probe runs needle cases (:func:`kvcompile.measure.retrieval.needle_cases`) built from
*calibration* text through the full-precision model.  For each answer token that also occurs in
the needle, and each query head h, it asks whether h's strongest attention, at the position that
predicts the token, is on a needle position holding that token (a copy event).  The retrieval
score of query head h is the fraction of such tokens for which it is::

    score[l, h] = #{answer tokens y : argmax_j a^(l,h)_{q(y), j} in needle positions of y} / #{answer tokens y}

and a kv head's score is the largest of its query heads' (a kv head is stored once for all of
them).  The planner keeps the K and V of heads above a threshold in a precise format
(``kvcompile plan --protect-heads``).

Saved as a versioned JSON artifact (``retrieval_heads``): scores per query head and per kv head,
the cases and how many of them the full-precision model answered.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from kvcompile.artifacts import load_json_artifact, save_json_artifact
from kvcompile.errors import ArtifactError, KvcompileError

ARTIFACT = "retrieval_heads"
FORMAT_VERSION = 1
IMPLEMENTATION = "kvcompile_probe"
DEFAULT_CONTEXT = 2048
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RetrievalHeads:
    """Retrieval scores of one model (see the module docstring).

    ``query_scores``: ``[layers][query heads]``; ``scores``: ``[layers][kv heads]``, the max over each
    kv head's query heads; ``events``: answer tokens scored; ``retrieved``: cases the
    full-precision model answered, of ``cases``."""

    model: str
    text: str
    context: int
    cases: int
    retrieved: int
    events: int
    query_scores: tuple[tuple[float, ...], ...]
    scores: tuple[tuple[float, ...], ...]
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for name, grid in (("query_scores", self.query_scores), ("scores", self.scores)):
            rows = [len(r) if isinstance(r, (list, tuple)) else -1 for r in grid] if isinstance(grid, (list, tuple)) else [-1]
            if not rows or min(rows) < 1 or len(set(rows)) != 1:
                raise ArtifactError(f"retrieval heads: {name} must be a non-empty [layers][heads] grid of numbers")
            if any(not isinstance(x, (int, float)) or isinstance(x, bool) or not 0.0 <= x <= 1.0 for r in grid for x in r):
                raise ArtifactError(f"retrieval heads: {name} must hold fractions in [0, 1]")
        layers, kv, q = len(self.scores), len(self.scores[0]), len(self.query_scores[0])
        if len(self.query_scores) != layers or q % kv:
            raise ArtifactError(f"retrieval heads: query_scores is {len(self.query_scores)}x{q}, expected {layers} layers "
                                f"of a multiple of {kv} heads")
        for name in ("context", "cases", "retrieved", "events"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ArtifactError(f"retrieval heads: {name} must be a non-negative integer, got {str(value)[:40]!r}")

    def protected(self, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int]]:
        """``(layer, kv head)`` pairs scoring at least ``threshold``, highest first."""
        if not 0.0 < threshold <= 1.0:
            raise KvcompileError(f"retrieval-head threshold must be in (0, 1], got {threshold}")
        heads = [(s, l, h) for l, row in enumerate(self.scores) for h, s in enumerate(row) if s >= threshold]
        return [(l, h) for _, l, h in sorted(heads, key=lambda x: (-x[0], x[1], x[2]))]

    def save(self, path) -> None:
        save_json_artifact(path, ARTIFACT, FORMAT_VERSION, asdict(self))

    @classmethod
    def load(cls, path) -> "RetrievalHeads":
        doc = load_json_artifact(path, ARTIFACT, FORMAT_VERSION)
        body = {k: v for k, v in doc.items() if k not in ("artifact", "format_version", "kvcompile_version")}
        try:
            return cls(**{**body, "query_scores": _tuples(body.get("query_scores")), "scores": _tuples(body.get("scores"))})
        except TypeError as e:
            raise ArtifactError(f"{path}: not a retrieval-heads artifact ({str(e)[:120]})") from None


def _tuples(grid):
    return tuple(tuple(r) if isinstance(r, list) else r for r in grid) if isinstance(grid, list) else grid


class _Probe:
    """State of one probe pass: the query rows to read and, per layer, their top-1 key position
    per query head ``[heads, rows]``."""

    def __init__(self, rows):
        self.rows = rows
        self.top = {}


def _probe_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as sdpa computes it, and the strongest key of each query head at the probe's rows.

    ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]``; ``attention_mask`` additive
    ``[1, 1, T, T]`` (causal, sliding windows included)."""
    import torch
    import torch.nn.functional as F

    from kvcompile.models.attention_state import state_of

    state = state_of(module, "kvcompile_probe (retrieval-head probe)")
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
    rows = state.rows
    scores = (query[:, :, rows] @ k.transpose(-1, -2)) * scaling  # [1, Hq, rows, T]
    if mask is not None:
        scores = scores + mask[:, :, rows]
    state.top[module.layer_idx] = scores[0].argmax(-1)  # [Hq, rows]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _probe_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def copy_events(case) -> list[tuple[int, "torch.Tensor"]]:
    """``(query row, needle positions)`` per answer token that occurs in the needle sentence: the row
    that predicts the token and the positions of the needle (only) that hold it."""
    import torch

    lo, hi = case.needle
    events = []
    for i, token in enumerate(case.ids[case.answer_start:].tolist()):
        where = lo + torch.nonzero(case.ids[lo:hi] == token).flatten()
        if len(where):
            events.append((case.answer_start - 1 + i, where))
    return events


def probe_retrieval_heads(lm, text: str | None = None, context: int = DEFAULT_CONTEXT, depths=None,
                          trials: int = 2, seed: int = 1, progress: bool = True) -> RetrievalHeads:
    """Retrieval scores of ``lm``'s heads from ``len(depths) * trials`` needle cases of ``context``
    tokens of ``text`` (default: the calibration text, so the evaluation's cases stay unseen); ``depths``
    default: the retrieval probe's (:data:`kvcompile.measure.retrieval.DEFAULT_DEPTHS`)."""
    import torch
    from tqdm.auto import tqdm

    from kvcompile.data import DEFAULT_CALIBRATION_TEXT
    from kvcompile.measure.retrieval import DEFAULT_DEPTHS, needle_cases
    from kvcompile.models.attention_state import attention_state

    text = text or DEFAULT_CALIBRATION_TEXT
    depths = DEFAULT_DEPTHS if depths is None else depths
    g = lm.geometry
    if context > g.max_positions:
        raise KvcompileError(f"probe context {context} exceeds the model's context of {g.max_positions} positions")
    _register()
    t0 = time.perf_counter()
    cases = needle_cases(lm.tokenizer, context, depths, trials, text, seed)
    hits = torch.zeros(g.num_layers, g.num_q_heads)
    events = retrieved = 0
    for case in tqdm(cases, desc="retrieval heads", unit="case", disable=not progress, leave=False):
        a = case.answer_start
        targets = copy_events(case)
        state = _Probe([row for row, _ in targets])
        with torch.no_grad(), attention_state(lm.model, state, IMPLEMENTATION, "the retrieval-head probe"):
            logits = lm.model(case.ids[None], use_cache=False).logits[0]
        retrieved += bool((logits[a - 1:-1].argmax(-1) == case.ids[a:]).all())
        for r, (_, where) in enumerate(targets):
            for layer, top in state.top.items():
                hits[layer] += torch.isin(top[:, r], where).float()
        events += len(targets)
    query = hits / max(events, 1)
    kv = query.view(g.num_layers, g.num_kv_heads, g.num_q_heads // g.num_kv_heads).amax(-1)
    return RetrievalHeads(model=lm.name, text=text, context=context, cases=len(cases), retrieved=retrieved,
                          events=events, query_scores=tuple(tuple(round(float(x), 6) for x in row) for row in query),
                          scores=tuple(tuple(round(float(x), 6) for x in row) for row in kv),
                          seconds=time.perf_counter() - t0)
