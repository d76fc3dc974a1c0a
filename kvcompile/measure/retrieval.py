"""A retrieval probe over long contexts: can the model still copy a fact from far back through the cache?

Each case is a *needle* sentence, ``The pass key of <name> is <5 digits>.``, inserted at a depth
``d`` (a fraction of the context) into held-out filler text of ``context`` tokens, followed by the
question ``What is the pass key of <name>? The pass key of <name> is`` and the answer
`` <5 digits>.``  A case counts as retrieved when every answer token is the model's top-1 prediction
given the context and the answer so far, which is what greedy decoding would generate (teacher
forcing stops mattering once a token is wrong, and such a case already failed).  Since a handful
of pass/fail cases moves in steps, each result also carries the answer's log-probability (the sum
over its tokens of ``log p(token | context, answer so far)``, averaged over cases): how far a map is
from answering, where accuracy says only whether it does.

Through a mixed-precision cache the case is scored by the exact simulation
(:mod:`kvcompile.measure.simulate`) with the context and question as the prefill and the answer
decoded token by token: the prompt positions are read in the form the cache stores them after
the prefill, as in deployment.  The full-precision reference is a plain forward pass.

Names and numbers come from a seeded generator and the filler from the shipped evaluation text,
so the cases are the same for every map and every run.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch

from kvcompile.data import DEFAULT_EVAL_TEXT, load_text
from kvcompile.errors import KvcompileError
from kvcompile.kv.precision_map import PrecisionMap

DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
_NAMES = ("Alvaro", "Brigitte", "Chidi", "Dagny", "Emeka", "Farida", "Gunnar", "Hana", "Ignacio", "Jovana",
          "Kenji", "Leilani", "Mateus", "Nkechi", "Oskar", "Priya", "Quentin", "Rosalind", "Soren", "Tamsin")


@dataclass
class NeedleCase:
    ids: torch.Tensor  # [T] int64: filler with the needle, the question, the answer
    answer_start: int  # index of the answer's first token in ids
    depth: float
    name: str
    key: str
    needle: tuple[int, int] = (0, 0)  # [start, end) of the needle sentence in ids


@dataclass
class RetrievalResult:
    name: str
    description: str
    bits_per_element: float
    kv_bytes: int
    context: int
    cases: int
    accuracy: float
    accuracy_reference: float
    agreement: float  # fraction of cases where the map and the reference are both right or both wrong
    answer_logprob: float = 0.0  # mean over cases of the answer's summed token log-probability (nats)
    answer_logprob_reference: float = 0.0
    by_depth: dict = field(default_factory=dict)  # depth -> accuracy
    by_depth_reference: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def needle_cases(tokenizer, context: int, depths=DEFAULT_DEPTHS, trials: int = 2, text: str = DEFAULT_EVAL_TEXT,
                 seed: int = 0) -> list[NeedleCase]:
    """``len(depths) * trials`` cases of about ``context`` tokens in all (filler, needle, question, answer)."""
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise KvcompileError(f"retrieval depths must be fractions of the context in [0, 1], got {list(depths)}")
    rng = random.Random(seed)
    filler = tokenizer(load_text(text), return_tensors="pt").input_ids[0]
    cases = []
    for trial in range(trials):
        for depth in depths:
            name, key = rng.choice(_NAMES), f"{rng.randrange(10000, 100000)}"
            needle = _ids(tokenizer, f"\nThe pass key of {name} is {key}. Remember it.\n")
            question = _ids(tokenizer, f"\nWhat is the pass key of {name}? The pass key of {name} is")
            answer = _ids(tokenizer, f" {key}.")
            n_filler = context - len(needle) - len(question) - len(answer)
            if n_filler < 1:
                raise KvcompileError(f"retrieval context of {context} tokens is too short for a needle and a question")
            if n_filler > len(filler):
                raise KvcompileError(f"text {text!r} has {len(filler)} tokens; the retrieval context needs {n_filler}")
            start = rng.randrange(0, len(filler) - n_filler + 1)
            stretch = filler[start:start + n_filler]
            at = int(round(depth * n_filler))
            ids = torch.cat([stretch[:at], needle, stretch[at:], question, answer])
            cases.append(NeedleCase(ids, len(ids) - len(answer), depth, name, key, (at, at + len(needle))))
    return cases


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0].long()


def _retrieved(logits: torch.Tensor, case: NeedleCase) -> bool:
    """Whether every answer token is the top-1 prediction of the position before it."""
    a = case.answer_start
    return bool((logits[a - 1:-1].argmax(-1) == case.ids[a:]).all())


def _answer_logprob(logits: torch.Tensor, case: NeedleCase) -> float:
    """Summed log-probability of the answer tokens, each given the context and the answer before it."""
    a = case.answer_start
    logp = torch.log_softmax(logits[a - 1:-1].double(), -1)
    return float(logp[torch.arange(len(case.ids) - a), case.ids[a:]].sum())


@torch.no_grad()
def retrieval(lm, maps: dict[str, PrecisionMap], context: int = 4096, depths=DEFAULT_DEPTHS, trials: int = 2,
              text: str = DEFAULT_EVAL_TEXT, seed: int = 0, progress: bool = True) -> list[RetrievalResult]:
    """Retrieval accuracy of each map and of the full-precision cache on the same needle cases."""
    from tqdm.auto import tqdm

    from kvcompile.measure.simulate import simulate_cache

    if context > lm.geometry.max_positions:
        raise KvcompileError(f"retrieval context {context} exceeds the model's context of "
                             f"{lm.geometry.max_positions} positions")
    for pmap in maps.values():
        pmap.check_model(lm.geometry.num_layers, lm.geometry.num_kv_heads, lm.geometry.head_dim,
                         lm.geometry.layer_windows)
    cases = needle_cases(lm.tokenizer, context, depths, trials, text, seed)
    model = lm.model
    ref_ok, ref_logp = [], []
    ok = {name: [] for name in maps}
    logp = {name: [] for name in maps}
    seconds = {name: 0.0 for name in maps}
    bar = tqdm(total=len(cases) * (len(maps) + 1), desc="retrieval", unit="pass", disable=not progress, leave=False)
    for case in cases:
        logits = model(case.ids[None], use_cache=False).logits[0]
        ref_ok.append(_retrieved(logits, case))
        ref_logp.append(_answer_logprob(logits, case))
        bar.update()
        for name, pmap in maps.items():
            t0 = time.perf_counter()
            with simulate_cache(model, pmap, prefill_length=case.answer_start):
                logits = model(case.ids[None], use_cache=False).logits[0]
            seconds[name] += time.perf_counter() - t0
            ok[name].append(_retrieved(logits, case))
            logp[name].append(_answer_logprob(logits, case))
            bar.update()
    bar.close()

    def by_depth(flags):
        return {str(d): sum(f for f, c in zip(flags, cases) if c.depth == d) / sum(c.depth == d for c in cases)
                for d in dict.fromkeys(c.depth for c in cases)}

    results = []
    for name, pmap in maps.items():
        flags = ok[name]
        length = len(cases[0].ids)
        results.append(RetrievalResult(
            name=name, description=pmap.description or pmap.summary(),
            bits_per_element=pmap.bits_per_element(length), kv_bytes=pmap.kv_bytes(length), context=length,
            cases=len(cases), accuracy=sum(flags) / len(cases), accuracy_reference=sum(ref_ok) / len(cases),
            agreement=sum(a == b for a, b in zip(flags, ref_ok)) / len(cases),
            answer_logprob=sum(logp[name]) / len(cases), answer_logprob_reference=sum(ref_logp) / len(cases),
            by_depth=by_depth(flags), by_depth_reference=by_depth(ref_ok), seconds=seconds[name]))
    return results


def format_retrieval_table(results: list[RetrievalResult]) -> str:
    depths = list(results[0].by_depth) if results else []
    head = f"{'scheme':<22} {'bits/elt':>8} {'acc':>6} {'ref acc':>7} {'agree':>6} {'ans logp':>8}  " + " ".join(
        f"{'d=' + d:>6}" for d in depths)
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name[:22]:<22} {r.bits_per_element:>8.3f} {r.accuracy:>6.2f} {r.accuracy_reference:>7.2f} "
                     f"{r.agreement:>6.2f} {r.answer_logprob:>8.2f}  " + " ".join(f"{r.by_depth[d]:>6.2f}" for d in depths))
    if results:
        r = results[0]
        lines.append(f"({r.cases} needle cases of {r.context} tokens; accuracy = every answer token top-1; "
                     f"ans logp = the answer's log-probability, full precision {r.answer_logprob_reference:.2f}; "
                     f"reference = full-precision cache)")
    return "\n".join(lines)
