"""Quality of a mixed-precision KV cache against the full-precision cache, on the same text windows.

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens.  In each
window every position ``i < window - 1`` predicts token ``i + 1``; we report

* ``ppl``, ``ppl_reference``: ``exp(mean NLL)`` with the quantized cache and with the model's own
  full-precision cache (a plain forward pass, which is what a full-precision cache computes);
* ``kl``: mean over positions of ``KL(p_reference || p_quantized)`` of next-token distributions (nats);
* ``top1_agreement``: fraction of positions where both predict the same top-1 token;
* ``bits_per_element``, ``kv_bytes``: the map's exact storage for one sequence of ``window`` positions;
* ``window_nll``, ``window_nll_reference``: summed NLL of each window, so that two maps scored on the
  same windows can be compared with a paired bootstrap (:func:`paired_bootstrap`).

How the quantized cache is exercised (``mode``):

* ``simulate`` (default): the exact parallel simulation (:mod:`kvcompile.measure.simulate`) in
  which query i reads every key/value at the precision it has in the cache after i + 1 positions
  (token-by-token decoding, ``prefill_length = 1``) or after ``prefill_length`` positions for the
  prompt part.  One forward pass per window.
* ``decode``: real token-by-token decoding through :class:`MixedPrecisionCache` (prefill
  ``prefill_length`` positions, then one token per step).  Slower; equal to ``simulate`` up to float
  rounding of the matrix products (``tests/integration/test_simulation.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from kvcompile.data import DEFAULT_EVAL_TEXT, load_text
from kvcompile.errors import KvcompileError
from kvcompile.kv.precision_map import PrecisionMap

MODES = ("simulate", "decode")


@dataclass
class QualityResult:
    name: str
    description: str
    ppl: float
    ppl_reference: float
    kl: float
    top1_agreement: float
    bits_per_element: float
    kv_bytes: float
    tokens_scored: int
    windows: int
    window: int
    mode: str
    seconds: float
    window_nll: list[float] = field(default_factory=list)
    window_nll_reference: list[float] = field(default_factory=list)

    @property
    def delta_ppl_pct(self) -> float:
        return 100 * (self.ppl / self.ppl_reference - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "delta_ppl_pct": self.delta_ppl_pct}

    @classmethod
    def from_json(cls, doc: dict) -> "QualityResult":
        """Inverse of :meth:`to_json` (derived keys such as ``delta_ppl_pct`` are recomputed)."""
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


def token_windows(tokenizer, text: str, window: int, max_windows: int | None) -> torch.Tensor:
    """``[K, window]`` token ids: consecutive non-overlapping windows from the start of ``text``."""
    if window < 2:
        raise KvcompileError(f"--window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise KvcompileError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return ids[: count * window].reshape(count, window)


class _Scores:
    """Running sums of NLL, KL and top-1 agreement over scored positions."""

    def __init__(self) -> None:
        self.nll = self.nll_ref = self.kl = 0.0
        self.agree = 0
        self.count = 0
        self.window_nll: list[float] = []  # one entry per add() call (one window)
        self.window_nll_ref: list[float] = []

    def add(self, logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> None:
        logp = F.log_softmax(logits.float(), -1)
        logp_ref = F.log_softmax(ref_logits.float(), -1)
        self.window_nll.append(-logp.gather(-1, targets[:, None]).sum().item())
        self.window_nll_ref.append(-logp_ref.gather(-1, targets[:, None]).sum().item())
        self.nll += self.window_nll[-1]
        self.nll_ref += self.window_nll_ref[-1]
        self.kl += (logp_ref.exp() * (logp_ref - logp)).sum().item()
        self.agree += (logp.argmax(-1) == logp_ref.argmax(-1)).sum().item()
        self.count += targets.numel()


@torch.no_grad()
def _quantized_logits(model, ids: torch.Tensor, pmap: PrecisionMap, mode: str, prefill_length: int) -> torch.Tensor:
    if mode == "simulate":
        from kvcompile.measure.simulate import simulate_cache

        with simulate_cache(model, pmap, prefill_length):
            return model(ids[None], use_cache=False).logits[0]
    from kvcompile.cache import MixedPrecisionCache, model_ropes

    cache = MixedPrecisionCache(pmap, max_context=len(ids), rope=model_ropes(model, pmap, len(ids)))
    p = max(1, prefill_length)
    outs = [model(ids[None, :p], cache=cache).logits[0]]
    outs += [model(ids[None, i : i + 1], cache=cache).logits[0] for i in range(p, len(ids))]
    return torch.cat(outs, 0)


@torch.no_grad()
def reference_log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Full-precision log-probabilities ``[T-1, vocab]`` of each of ``windows`` [K, T] (positions that predict a token)."""
    return [F.log_softmax(model(ids[None], use_cache=False).logits[0, :-1].float(), -1) for ids in windows]


@torch.no_grad()
def mean_kl(model, windows: torch.Tensor, pmap: PrecisionMap, prefill_length: int = 1,
            reference: list[torch.Tensor] | None = None) -> float:
    """Mean KL(reference || quantized cache) per scored position over ``windows`` [K, T] (simulate mode).

    ``reference``: :func:`reference_log_probs` of the same windows, when measuring many maps.
    """
    reference = reference if reference is not None else reference_log_probs(model, windows)
    total, count = 0.0, 0
    for ids, ref in zip(windows, reference):
        q = F.log_softmax(_quantized_logits(model, ids, pmap, "simulate", prefill_length)[:-1].float(), -1)
        total += (ref.exp() * (ref - q)).sum().item()
        count += ref.shape[0]
    return total / count


@torch.no_grad()
def evaluate(lm, maps: dict[str, PrecisionMap], text: str = DEFAULT_EVAL_TEXT, window: int = 512,
             max_windows: int | None = 8, mode: str = "simulate", prefill_length: int = 1,
             progress: bool = True) -> list[QualityResult]:
    """Score each map against the full-precision cache on the same windows (see module docstring).

    ``lm``: a :class:`kvcompile.models.LoadedModel`; ``text``: a shipped text name or a file path.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise KvcompileError(f"unknown evaluation mode {mode!r}; expected one of {', '.join(MODES)}")
    if window > lm.geometry.max_positions:
        raise KvcompileError(f"--window {window} exceeds the model's context of {lm.geometry.max_positions} positions")
    for pmap in maps.values():
        pmap.check_model(lm.geometry.num_layers, lm.geometry.num_kv_heads, lm.geometry.head_dim,
                         lm.geometry.layer_windows)
    windows = token_windows(lm.tokenizer, load_text(text), window, max_windows)
    scores = {name: _Scores() for name in maps}
    seconds = {name: 0.0 for name in maps}
    model = lm.model
    bar = tqdm(total=len(windows) * (len(maps) + 1), desc="eval", unit="pass", disable=not progress, leave=False)
    for ids in windows:
        ref = model(ids[None], use_cache=False).logits[0]
        bar.update()
        for name, pmap in maps.items():
            t0 = time.perf_counter()
            logits = _quantized_logits(model, ids, pmap, mode, prefill_length)
            seconds[name] += time.perf_counter() - t0
            scores[name].add(logits[:-1], ref[:-1], ids[1:])
            bar.update()
    bar.close()
    results = []
    for name, pmap in maps.items():
        s = scores[name]
        results.append(QualityResult(
            name=name, description=pmap.description or pmap.summary(),
            ppl=math.exp(s.nll / s.count), ppl_reference=math.exp(s.nll_ref / s.count),
            kl=s.kl / s.count, top1_agreement=s.agree / s.count,
            bits_per_element=pmap.bits_per_element(window), kv_bytes=pmap.kv_bytes(window),
            tokens_scored=s.count, windows=len(windows), window=window, mode=mode, seconds=seconds[name],
            window_nll=s.window_nll, window_nll_reference=s.window_nll_ref,
        ))
    return results


def paired_bootstrap(a: QualityResult, b: QualityResult, resamples: int = 10000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Confidence interval of ``dPPL%(a) - dPPL%(b)`` for two maps scored on the same windows.

    Windows are the resampling unit (tokens within a window are correlated): each of ``resamples``
    draws takes K of the K windows with replacement, the same draw for both maps and the reference
    (a paired bootstrap), and recomputes ``dPPL% = 100 (exp((NLL - NLL_ref) / n) - 1)`` over the
    drawn windows for each map; ``n`` is the drawn token count.  The interval is the percentile
    interval at ``level``.  ``significant`` is true when it excludes 0, i.e. on these windows the
    sign of the difference is not an accident of which text was drawn.
    """
    import numpy as np

    if not a.window_nll or len(a.window_nll) != len(b.window_nll) or a.window_nll_reference != b.window_nll_reference:
        raise KvcompileError(f"paired bootstrap needs {a.name!r} and {b.name!r} scored on the same windows "
                             "(equal per-window reference NLL); evaluate them in one call")
    k = len(a.window_nll)
    per_window = a.tokens_scored / k  # every window scores window - 1 positions
    nll_a, nll_b, nll_ref = (np.asarray(x) for x in (a.window_nll, b.window_nll, a.window_nll_reference))
    draws = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    n = per_window * k
    ref = nll_ref[draws].sum(1)
    diff = 100 * (np.exp((nll_a[draws].sum(1) - ref) / n) - np.exp((nll_b[draws].sum(1) - ref) / n))
    low, high = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return {"difference_pct": a.delta_ppl_pct - b.delta_ppl_pct, "ci_low_pct": float(low), "ci_high_pct": float(high),
            "level": level, "resamples": resamples, "windows": k, "significant": bool(low > 0 or high < 0)}


def format_table(results: list[QualityResult]) -> str:
    """Fixed-width table, one row per map."""
    header = f"{'scheme':<22} {'bits/elt':>8} {'KV bytes':>10} {'PPL':>8} {'ref PPL':>8} {'dPPL %':>8} {'KL':>8} {'top-1':>7}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.name:<22} {r.bits_per_element:>8.3f} {r.kv_bytes:>10.0f} {r.ppl:>8.3f} {r.ppl_reference:>8.3f} "
                    f"{r.delta_ppl_pct:>+8.2f} {r.kl:>8.4f} {r.top1_agreement:>7.3f}")
    if results:
        r = results[0]
        rows.append(f"({r.tokens_scored} tokens scored in {r.windows} windows of {r.window}; mode {r.mode}; "
                    "bits and bytes for one sequence of one window)")
    return "\n".join(rows)


def kl_meter(lm, text: str, window: int, windows: int) -> Callable[[PrecisionMap], float]:
    """``measure(pmap)``: mean KL(full precision || ``pmap``) per position over ``windows`` windows of
    ``window`` tokens of ``text`` (exact simulation of decoding; reference logits computed once).
    This is what ``plan --refine`` measures maps with."""
    ids = token_windows(lm.tokenizer, load_text(text), window, windows)
    reference = reference_log_probs(lm.model, ids)

    def measure(pmap: PrecisionMap) -> float:
        return mean_kl(lm.model, ids, pmap, reference=reference)

    return measure
