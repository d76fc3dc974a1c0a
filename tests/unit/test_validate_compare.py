"""`validate`'s step-by-step comparison without a model: which steps its cosine bound judges.

A step of the export that stores a code differently from the reference (float rounding across a
code boundary) reads that code at once; at 2-3 bits that moves the step's logits more than the
cosine bound allows computations to, while the cache check already counts the flip.  So the bound
judges the steps whose stored cache equals the reference's, and reports the least cosine over all.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcompile.validate import compare

VOCAB = 16


class Decoder:
    """A decoder whose cache is one uint8 code per position (``past["codes"]`` ``[1, 1, T, 1]``) and
    whose logits at a position are a fixed vector moved by that position's code.  ``flip_at``: the
    positions it stores one code higher than the reference does."""

    def __init__(self, flip_at=(), reference=False):
        self.flip_at, self.reference = set(flip_at), reference
        self.base = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32)

    def start(self, batch):
        empty = np.zeros((1, 1, 0, 1), np.uint8)
        return {"cache": empty} if self.reference else {"past": {"codes": empty}}

    def step(self, ids, state):
        past = state["cache"] if self.reference else state["past"]["codes"]
        t0, n = past.shape[2], ids.shape[1]
        codes = np.array([[[[3 + (t in self.flip_at)] for t in range(t0, t0 + n)]]], np.uint8)
        logits = np.stack([self.base + 5.0 * np.eye(VOCAB, dtype=np.float32)[int(c[0])] for c in codes[0, 0]])[None]
        stored = np.concatenate([past, codes], 2)
        return logits, ({"cache": stored} if self.reference else {"past": {"codes": stored}})


@pytest.fixture
def ports(monkeypatch):
    monkeypatch.setattr(compare, "cache_ports", lambda cache, pmap: {"codes": cache})


def test_lockstep_marks_the_rows_of_steps_that_stored_a_code_differently(ports):
    ids = np.arange(12)
    ours, refs, state = compare.lockstep(Decoder(flip_at={2, 7}), Decoder(reference=True), ids, 4, pmap=object())
    assert ours.shape == refs.shape == (12, VOCAB)
    # the prefill (positions 0-3) stored position 2 differently, decode step 7 its own position
    expected = np.ones(12, bool)
    expected[[0, 1, 2, 3, 7]] = False
    np.testing.assert_array_equal(state["same_cache"], expected)
    assert state["differing"] == 2 and state["resynced"] == 9  # the export got the reference's codes back each step


def test_the_cosine_bound_judges_only_steps_that_stored_what_the_reference_stored(ports):
    ids = np.arange(12)
    ours, refs, state = compare.lockstep(Decoder(flip_at={7}), Decoder(reference=True), ids, 4, pmap=object())
    judged = compare.agreement([ours], [refs], 4, same_cache=[state["same_cache"]])
    everything = compare.agreement([ours], [refs], 4)
    assert judged["min_cosine"] == pytest.approx(1.0)  # the 11 steps that stored the same codes agree exactly
    assert judged["min_cosine_all"] == everything["min_cosine"] < 0.9  # the flipped step's own row does not
    assert (judged["rows_same_cache"], judged["rows"]) == (11, 12)
    assert judged["kl"] == everything["kl"] > 0  # the mean KL still sees every row


def test_a_decoder_that_never_matches_has_no_row_judged_and_the_cosine_bound_is_vacuous(ports):
    ids = np.arange(6)
    ours, refs, state = compare.lockstep(Decoder(flip_at=range(6)), Decoder(reference=True), ids, 2, pmap=object())
    judged = compare.agreement([ours], [refs], 2, same_cache=[state["same_cache"]])
    assert judged["rows_same_cache"] == 0 and judged["min_cosine"] == 1.0
    # what judges such an export instead: the cache check, which counts each step's new codes
    assert state["differing"] == 6


def test_only_integer_codes_count_as_stored_differently():
    codes = np.array([[[[3], [4]]]], np.uint8)
    values = np.array([[[[1.0], [2.0]]]], np.float16)
    off = values.copy()
    off[0, 0, 1, 0] = np.float16(2.0) + np.float16(2.0**-6)  # 4 float16 ulps of 2.0: differs, but it is rounding
    flipped = codes.copy()
    flipped[0, 0, 0, 0] = 2
    assert compare.compare_cache_state({"c": codes, "v": off}, {"c": codes, "v": values}) == (0, 1, 0, 4)
    assert compare.compare_cache_state({"c": flipped, "v": values}, {"c": codes, "v": values}) == (0, 1, 1, 4)
    assert compare.compare_cache_state({"c": codes}, {"c": codes, "v": values})[0] == 1  # a tensor missing
