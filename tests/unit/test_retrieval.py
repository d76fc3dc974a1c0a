"""The retrieval probe's cases and scoring (tiny model; the real model's run is in tests/integration)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompile.errors import KvcompileError
from kvcompile.measure.retrieval import _answer_logprob, _retrieved, needle_cases, retrieval
from kvcompile.plan.presets import resolve_map
from tests.conftest import CharTokenizer


def test_cases_have_the_context_length_the_needle_at_its_depth_and_the_answer_last():
    tok = CharTokenizer()
    cases = needle_cases(tok, 200, depths=(0.0, 0.5, 1.0), trials=2)
    assert len(cases) == 6 and [c.depth for c in cases[:3]] == [0.0, 0.5, 1.0]
    for c in cases:
        assert len(c.ids) == 200
        answer = tok(f" {c.key}.", return_tensors="pt").input_ids[0]
        assert torch.equal(c.ids[c.answer_start:], answer)
        needle = tok(f"\nThe pass key of {c.name} is {c.key}. Remember it.\n", return_tensors="pt").input_ids[0]
        starts = [i for i in range(len(c.ids) - len(needle)) if torch.equal(c.ids[i:i + len(needle)], needle)]
        question = tok(f"\nWhat is the pass key of {c.name}? The pass key of {c.name} is", return_tensors="pt").input_ids[0]
        filler = 200 - len(needle) - len(question) - len(answer)
        assert starts == [round(c.depth * filler)]
        assert c.needle == (starts[0], starts[0] + len(needle))  # the span the retrieval-head probe reads
    again = needle_cases(tok, 200, depths=(0.0, 0.5, 1.0), trials=2)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(cases, again))  # seeded: the same cases every run
    assert not torch.equal(cases[0].ids, needle_cases(tok, 200, depths=(0.0,), trials=1, seed=1)[0].ids)


@pytest.mark.parametrize("depths,context,match", [((1.5,), 200, "depths"), ((), 200, "depths"),
                                                   ((0.5,), 30, "too short")])
def test_bad_requests_are_one_line_errors(depths, context, match):
    with pytest.raises(KvcompileError, match=match):
        needle_cases(CharTokenizer(), context, depths=depths)


def test_a_case_counts_only_if_every_answer_token_is_top1():
    c = needle_cases(CharTokenizer(), 120, depths=(0.5,), trials=1)[0]
    logits = torch.zeros(len(c.ids), 97)
    logits[torch.arange(len(c.ids) - 1), c.ids[1:]] = 1.0  # every next token predicted
    assert _retrieved(logits, c)
    logits[len(c.ids) - 2, :] = 0.0
    logits[len(c.ids) - 2, (c.ids[-1] + 1) % 97] = 1.0  # the last answer token wrong
    assert not _retrieved(logits, c)
    logits = torch.zeros(len(c.ids), 97)
    logits[torch.arange(c.answer_start - 1), c.ids[1:c.answer_start]] = 1.0  # the prompt right, the answer not
    assert not _retrieved(logits, c)


def test_the_answer_log_probability_sums_the_answer_tokens_only():
    c = needle_cases(CharTokenizer(), 120, depths=(0.5,), trials=1)[0]
    logits = torch.zeros(len(c.ids), 97)
    n = len(c.ids) - c.answer_start
    assert _answer_logprob(logits, c) == pytest.approx(-n * math.log(97))  # uniform: log(1/97) per answer token
    logits[c.answer_start - 1, c.ids[c.answer_start]] = 1e4  # the first answer token certain
    logits[: c.answer_start - 1] = torch.randn(c.answer_start - 1, 97)  # the prompt does not count
    assert _answer_logprob(logits, c) == pytest.approx(-(n - 1) * math.log(97))


def test_retrieval_scores_maps_and_reference_on_the_same_cases(tiny_lm):
    maps = {n: resolve_map(n, tiny_lm.geometry) for n in ("fp16", "int2")}
    results = retrieval(tiny_lm, maps, context=160, depths=(0.25, 0.75), trials=2, progress=False)
    assert [r.name for r in results] == ["fp16", "int2"]
    for r in results:
        assert r.cases == 4 and r.context == 160
        assert r.accuracy_reference == results[0].accuracy_reference
        assert set(r.by_depth) == {"0.25", "0.75"}
        assert r.bits_per_element == maps[r.name].bits_per_element(160)
        assert r.answer_logprob < 0 and r.answer_logprob_reference == results[0].answer_logprob_reference
    assert results[0].answer_logprob == pytest.approx(results[0].answer_logprob_reference, abs=1e-4)  # fp16 ~ exact
    with pytest.raises(KvcompileError, match="exceeds the model's context"):
        retrieval(tiny_lm, maps, context=100000, progress=False)
