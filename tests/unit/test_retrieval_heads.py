"""The retrieval-head probe and the planner's protected heads."""

from __future__ import annotations

import json

import pytest
import torch

from kvcompile.calibrate.retrieval_heads import RetrievalHeads, probe_retrieval_heads
from kvcompile.errors import ArtifactError, KvcompileError
from kvcompile.measure.retrieval import needle_cases
from kvcompile.plan.optimize import plan
from tests.unit.test_plan import SCHEMES, brute_force, synthetic, synthetic_tiers


def eager_scores(lm, cases) -> torch.Tensor:
    """The module docstring's score from transformers' own eager attention weights: the oracle."""
    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        hits, events = torch.zeros(lm.geometry.num_layers, lm.geometry.num_q_heads), 0
        for case in cases:
            a = case.answer_start
            with torch.no_grad():
                attentions = model(case.ids[None], output_attentions=True, use_cache=False).attentions
            lo, hi = case.needle
            for i, token in enumerate(case.ids[a:].tolist()):
                needle = {j for j in range(lo, hi) if case.ids[j] == token}
                if not needle:
                    continue
                events += 1
                for layer, weights in enumerate(attentions):
                    top = weights[0, :, a - 1 + i].argmax(-1)
                    hits[layer] += torch.tensor([int(j) in needle for j in top.tolist()], dtype=torch.float)
        return hits / events
    finally:
        model.set_attn_implementation(previous)


def test_probe_scores_equal_the_score_from_eager_attention_weights(tiny_lm):
    heads = probe_retrieval_heads(tiny_lm, text="wikipedia-calibration", context=120, depths=(0.2, 0.8), trials=2,
                                  progress=False)
    cases = needle_cases(tiny_lm.tokenizer, 120, (0.2, 0.8), 2, "wikipedia-calibration", 1)
    expected = eager_scores(tiny_lm, cases)
    g = tiny_lm.geometry
    assert heads.cases == 4 and heads.context == 120 and heads.model == "tiny-llama"
    torch.testing.assert_close(torch.tensor(heads.query_scores), expected.float(), atol=1e-6, rtol=0)
    assert expected.max() > 0  # some head's strongest key is a needle token: the comparison is not all zeros
    kv = torch.tensor(heads.scores)
    assert kv.shape == (g.num_layers, g.num_kv_heads)
    torch.testing.assert_close(kv, expected.view(g.num_layers, g.num_kv_heads, -1).amax(-1).float(), atol=1e-6, rtol=0)


def test_the_probe_leaves_the_model_output_unchanged(tiny_lm):
    from kvcompile.calibrate import retrieval_heads as rh
    from kvcompile.models.attention_state import attention_state

    rh._register()
    ids = torch.arange(1, 60)[None] % 97
    with torch.no_grad():
        plain = tiny_lm.model(ids, use_cache=False).logits
        state = rh._Probe([10, 58])
        with attention_state(tiny_lm.model, state, rh.IMPLEMENTATION, "test"):
            probed = tiny_lm.model(ids, use_cache=False).logits
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-5)
    assert set(state.top) == {0, 1} and state.top[0].shape == (tiny_lm.geometry.num_q_heads, 2)
    assert (state.top[0][:, 0] <= 10).all()  # causal: row 10 reads no later key


def heads_of(scores, model="synthetic") -> RetrievalHeads:
    query = tuple(tuple(s for s in row for _ in range(2)) for row in scores)
    return RetrievalHeads(model=model, text="t", context=64, cases=2, retrieved=1, events=10,
                          query_scores=query, scores=tuple(tuple(r) for r in scores))


def test_artifact_round_trip_threshold_and_malformed_files(tmp_path):
    heads = heads_of([[0.2, 0.9], [0.6, 0.0]])
    assert heads.protected(0.5) == [(0, 1), (1, 0)]  # highest first
    assert heads.protected(0.1) == [(0, 1), (1, 0), (0, 0)]
    with pytest.raises(KvcompileError, match="threshold"):
        heads.protected(0.0)
    heads.save(tmp_path / "h.json")
    assert RetrievalHeads.load(tmp_path / "h.json") == heads
    doc = json.loads((tmp_path / "h.json").read_text())
    for change, match in (({"scores": [[0.2, 1.5], [0.6, 0.0]]}, "fractions"),
                          ({"scores": [[0.2], [0.6, 0.0]]}, "grid"),
                          ({"query_scores": [[0.1, 0.2, 0.3]] * 2}, "multiple"),
                          ({"events": -1}, "events"),
                          ({"surprise": 1}, "not a retrieval-heads artifact")):
        (tmp_path / "bad.json").write_text(json.dumps({**doc, **change}))
        with pytest.raises(ArtifactError, match=match):
            RetrievalHeads.load(tmp_path / "bad.json")


def protected_schemes(pmap, heads):
    return {pmap.schemes[st][c][l][h] for st in ("key", "value") for c in pmap.classes if c != "recent"
            for l, h in heads}


@pytest.mark.parametrize("budget", [6.0, 6.5, 7.5])
def test_protected_heads_store_only_the_protect_scheme_or_fp16_and_the_rest_is_optimal(budget):
    calib = synthetic(1)
    free = plan(calib, budget_bits=budget, context=512, corrected=False)
    assert protected_schemes(free.pmap, [(0, 0)]) - {"fp16", "int8"}  # unprotected, layer 0 takes a cheaper format
    kept = plan(calib, budget_bits=budget, context=512, corrected=False, protect=[(0, 0)])
    assert protected_schemes(kept.pmap, [(0, 0)]) <= {"fp16", "int8"}
    assert kept.pmap.bits_per_element(512) <= budget + 1e-12
    assert kept.pmap.provenance["protected_heads"] == [[0, 0]] and kept.pmap.provenance["protect_scheme"] == "int8"
    # optimal among the maps that respect the protection: brute force over the allowed choices
    precise = [SCHEMES.index("fp16"), SCHEMES.index("int8")]
    best = brute_force(calib, 512, budget=budget, allowed=lambda combo: combo[0] in precise and combo[1] in precise)
    assert kept.predicted_cost == pytest.approx(best[1], rel=1e-12, abs=1e-15)
    assert kept.predicted_cost > free.predicted_cost


def two_layer_tiers():
    """synthetic_tiers of two seeds as the two layers of one model."""
    from dataclasses import replace

    from kvcompile.models.adapters import KVGeometry

    a, b = synthetic_tiers(2), synthetic_tiers(3)
    return replace(a, geometry=KVGeometry(num_layers=2, num_kv_heads=1, num_q_heads=2, head_dim=64, max_positions=1024),
                   cost=torch.cat([a.cost, b.cost]), curvature=torch.cat([a.curvature, b.curvature]),
                   diameter=torch.cat([a.diameter, b.diameter]))


def test_protected_heads_with_age_tiers_keep_every_class_precise():
    calib = two_layer_tiers()
    free = plan(calib, budget_bits=4.0, context=512, age_tiers=1, corrected=False)
    kept = plan(calib, budget_bits=4.0, context=512, age_tiers=1, corrected=False, protect=[(0, 0)],
                protect_scheme="int4")
    assert protected_schemes(free.pmap, [(0, 0)]) - {"fp16", "int4"}
    assert protected_schemes(kept.pmap, [(0, 0)]) <= {"fp16", "int4"}
    assert kept.pmap.bits_per_element(512) <= 4.0 + 1e-12


def test_bad_protection_requests_are_one_line_errors():
    calib = synthetic(0)
    for protect, scheme, match in (([(2, 0)], "int8", "not a \\(layer, kv head\\)"), ([(0, 1)], "int8", "not a"),
                                   ([(0, 0)], "nf4", "not in the planner's menu")):
        with pytest.raises(KvcompileError, match=match):
            plan(calib, budget_bits=9.0, context=512, protect=protect, protect_scheme=scheme)
    with pytest.raises(KvcompileError, match="below the smallest map"):  # the protection does not fit the budget
        plan(calib, budget_bits=2.5, context=512, protect=[(0, 0), (1, 0)])


def test_cli_probes_heads_and_plans_with_them(tmp_path, tiny_lm, monkeypatch, capsys):
    import kvcompile.models
    from kvcompile.cli import main
    from kvcompile.kv.precision_map import PrecisionMap

    monkeypatch.setattr(kvcompile.models, "load_model", lambda *a, **k: tiny_lm)
    assert main(["retrieval-heads", "--context", "120", "--depths", "0.5", "--trials", "1", "--threshold", "0.01",
                 "--quiet", "-o", str(tmp_path / "heads.json")]) == 0
    assert "needle cases of 120 tokens" in capsys.readouterr().out
    assert RetrievalHeads.load(tmp_path / "heads.json").cases == 1

    synthetic(1).save(tmp_path / "calib")
    heads_of([[0.9], [0.1]]).save(tmp_path / "h.json")
    assert main(["plan", str(tmp_path / "calib"), "--budget-bits", "6.5", "--context", "512", "--raw",
                 "--protect-heads", str(tmp_path / "h.json"), "-o", str(tmp_path / "m.json")]) == 0
    assert "protected in int8 or fp16 (retrieval score >= 0.5): layer 0 head 0" in capsys.readouterr().out
    pmap = PrecisionMap.load(tmp_path / "m.json")
    assert protected_schemes(pmap, [(0, 0)]) <= {"fp16", "int8"} and pmap.provenance["protected_heads"] == [[0, 0]]
    heads_of([[0.9], [0.1]], model="another").save(tmp_path / "other.json")
    assert main(["plan", str(tmp_path / "calib"), "--budget-bits", "6.5", "--protect-heads", str(tmp_path / "other.json"),
                 "-o", str(tmp_path / "m2.json")]) != 0
    assert "scores the heads of another" in capsys.readouterr().err and not (tmp_path / "m2.json").exists()


def test_copy_events_read_the_needle_sentence_only():
    from kvcompile.calibrate.retrieval_heads import copy_events
    from kvcompile.measure.retrieval import NeedleCase

    # filler 5 7 5 | needle 9 5 7 8 | question 4 | answer 5 7 3: the answer's 5 and 7 are in the filler too
    ids = torch.tensor([5, 7, 5, 9, 5, 7, 8, 4, 5, 7, 3])
    case = NeedleCase(ids, answer_start=8, depth=0.5, name="n", key="57", needle=(3, 7))
    events = copy_events(case)
    assert [row for row, _ in events] == [7, 8]  # the rows predicting 5 and 7; 3 is not in the needle
    assert [w.tolist() for _, w in events] == [[4], [5]]
