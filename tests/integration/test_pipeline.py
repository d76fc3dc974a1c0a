"""calibrate -> plan -> eval on the real default model through the CLI (small sizes)."""

from __future__ import annotations

import json

import pytest

from kvcompile.cli import main
from kvcompile.kv.precision_map import PrecisionMap

pytestmark = pytest.mark.model


def test_calibrate_plan_eval(tmp_path, smollm):
    calib = tmp_path / "calib"
    assert main(["calibrate", "--windows", "1", "--window", "128", "--schemes", "fp16,int8,int4,int4-ch,int2,int2-ch",
                 "--window-options", "0,16", "--sink-options", "0,2", "-o", str(calib), "--quiet"]) == 0
    meta = json.loads((calib / "calibration.json").read_text())
    assert meta["artifact"] == "calibration" and meta["format_version"] == 1
    for mode in (["--budget-bits", "4.5"], ["--target-kl", "0.05"]):
        out = tmp_path / f"map{mode[0]}.json"
        assert main(["plan", str(calib), *mode, "--context", "128", "-o", str(out)]) == 0
        pmap = PrecisionMap.load(out)
        if mode[0] == "--budget-bits":
            assert pmap.bits_per_element(128) <= 4.5
    # --memory allocated: the budget also pays for per-channel blocks still filling at any length <= 128
    out = tmp_path / "map-allocated.json"
    assert main(["plan", str(calib), "--budget-bits", "4.5", "--context", "128", "--memory", "allocated", "-o", str(out)]) == 0
    pmap = PrecisionMap.load(out)
    assert pmap.provenance["memory"] == "allocated" and pmap.bits_per_element(128, memory="allocated") <= 4.5
    # --refine: KL measured on the calibration text in the loop; the map records each round
    refined = tmp_path / "map-refined.json"
    assert main(["plan", str(calib), "--target-kl", "0.05", "--context", "128", "--refine", "--refine-windows", "1",
                 "--rounds", "3", "-o", str(refined)]) == 0
    rounds = PrecisionMap.load(refined).provenance["refinement"]["rounds"]
    assert 1 <= len(rounds) <= 3 and all(r["measured_kl"] > 0 for r in rounds)
    refined = tmp_path / "map-refined-budget.json"
    assert main(["plan", str(calib), "--budget-bits", "6", "--context", "128", "--refine", "--refine-windows", "1",
                 "-o", str(refined)]) == 0
    pmap = PrecisionMap.load(refined)
    rounds = pmap.provenance["refinement"]["rounds"]
    assert len(rounds) == 4 and pmap.bits_per_element(128) <= 6  # one measured map per (sinks, window) option
    best = min(rounds, key=lambda r: r["measured_kl"])
    assert (pmap.sink_tokens, pmap.recent_window) == (best["sink_tokens"], best["recent_window"])
    res = tmp_path / "eval.json"
    assert main(["eval", "--map", str(tmp_path / "map--budget-bits.json"), "--window", "128", "--max-windows", "1",
                 "--json", str(res), "--quiet"]) == 0
    doc = json.loads(res.read_text())
    assert doc["bits_per_element"] <= 4.5 and doc["kl"] < 0.5
