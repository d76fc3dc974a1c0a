"""Paired bootstrap of dPPL differences (kvcompile.measure.quality.paired_bootstrap), on synthetic scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcompile.errors import KvcompileError
from kvcompile.measure.quality import QualityResult, paired_bootstrap

TOKENS = 100  # scored positions per window


def result(name: str, nll: list[float], ref: list[float]) -> QualityResult:
    count = TOKENS * len(nll)
    return QualityResult(name=name, description="", ppl=math.exp(sum(nll) / count), ppl_reference=math.exp(sum(ref) / count),
                         kl=0.0, top1_agreement=1.0, bits_per_element=4.0, kv_bytes=0.0, tokens_scored=count,
                         windows=len(nll), window=TOKENS + 1, mode="simulate", seconds=0.0,
                         window_nll=list(nll), window_nll_reference=list(ref))


def test_a_constant_per_window_gap_is_significant_with_a_point_interval():
    ref = list(np.random.default_rng(1).uniform(200, 400, 12))
    a = result("a", [r + 0.02 * TOKENS for r in ref], ref)  # +0.02 nats on every token
    b = result("b", [r + 0.01 * TOKENS for r in ref], ref)
    s = paired_bootstrap(a, b, resamples=2000)
    expected = 100 * (math.exp(0.02) - math.exp(0.01))
    assert s["difference_pct"] == pytest.approx(expected)
    assert s["ci_low_pct"] == pytest.approx(expected) and s["ci_high_pct"] == pytest.approx(expected)
    assert s["significant"] and s["windows"] == 12
    # saved results (JSON) give the same interval
    again = paired_bootstrap(QualityResult.from_json(a.to_json()), QualityResult.from_json(b.to_json()), resamples=2000)
    assert again == s


def test_a_gap_smaller_than_the_window_to_window_noise_is_not_significant():
    rng = np.random.default_rng(2)
    ref = list(rng.uniform(200, 400, 16))
    noise = rng.normal(0, 0.05 * TOKENS, (2, 16))  # per-window noise far larger than the 0.001-nat mean gap
    a = result("a", [r + 0.001 * TOKENS + e for r, e in zip(ref, noise[0])], ref)
    b = result("b", [r + e for r, e in zip(ref, noise[1])], ref)
    s = paired_bootstrap(a, b)
    assert s["ci_low_pct"] < 0 < s["ci_high_pct"] and not s["significant"]
    # the interval is symmetric in the two maps
    t = paired_bootstrap(b, a)
    assert t["ci_low_pct"] == pytest.approx(-s["ci_high_pct"]) and t["ci_high_pct"] == pytest.approx(-s["ci_low_pct"])


def test_maps_scored_on_different_windows_are_refused():
    a = result("a", [300.0, 310.0], [290.0, 300.0])
    b = result("b", [300.0, 310.0], [291.0, 300.0])
    with pytest.raises(KvcompileError, match="same windows"):
        paired_bootstrap(a, b)
