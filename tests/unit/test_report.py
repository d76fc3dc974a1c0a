"""`kvcompile report` renders its Markdown, HTML and PNGs, atomically."""

from __future__ import annotations

import json

import pytest

from kvcompile.calibrate import calibrate
from kvcompile.cli import main
from kvcompile.plan.optimize import plan


@pytest.fixture(scope="module")
def artifacts(tiny_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    calib = calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=64, schemes=["fp16", "int8", "int4", "int2"],
                      sink_options=[0], window_options=[0, 16], progress=False)
    calib.save(d / "calib")
    plan(calib, budget_bits=5.0, context=64).pmap.save(d / "map.json")
    rows = [{"name": n, "bits_per_element": b, "delta_ppl_pct": p, "kl": 0.01, "top1_agreement": 0.9}
            for n, b, p in (("plan 4b", 4.0, 2.0), ("int4", 5.0, 3.0), ("kivi-2 w32", 3.8, 14.0))]
    (d / "cmp.json").write_text(json.dumps({"results": rows}))
    sites = [{"measured_kl": m, "predicted": p, "predicted_corrected": p * 1.2, "predicted_hnf": p * 3}
             for m, p in ((0.01, 0.012), (0.2, 0.1), (0.003, 0.002))]
    summary = {k: {"spearman": 1.0, "holds_c1": 0.5, "c_for_90pct": 2.0, "median_ratio": 1.1}
               for k in ("predicted", "predicted_corrected", "predicted_hnf")}
    (d / "val.json").write_text(json.dumps({"sites": sites, "summary": summary}))
    return d


def test_report_with_every_section(artifacts):
    out = artifacts / "report"
    assert main(["report", str(artifacts / "calib"), "--map", str(artifacts / "map.json"), "--validation",
                 str(artifacts / "val.json"), "--comparison", str(artifacts / "cmp.json"), "-o", str(out)]) == 0
    md = (out / "report.md").read_text()
    for section in ("Precision map", "Predicted vs measured", "Quality vs memory", "Per-layer breakdown"):
        assert section in md
    for png in ("precision_heatmap.png", "predicted_vs_measured.png", "quality_vs_memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "<img src='precision_heatmap.png'" in (out / "report.html").read_text()
    assert md.count("\n| ") >= 2 + 2  # the per-layer table has a row per layer
    from kvcompile.artifacts import default_mode

    assert out.stat().st_mode & 0o777 == default_mode(directory=True)


def test_failed_report_leaves_nothing_behind(artifacts, tmp_path):
    out = tmp_path / "r"
    rc = main(["report", str(artifacts / "calib"), "--map", str(tmp_path / "missing.json"), "-o", str(out)])
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content,message", [
    ("{nope", "expected the JSON written by bench/plan_vs_uniform.py or bench/quality.py"),
    ('{"rows": []}', "with results"),
])
def test_a_malformed_comparison_is_one_line(artifacts, tmp_path, capsys, content, message):
    (tmp_path / "cmp.json").write_text(content)
    rc = main(["report", str(artifacts / "calib"), "--comparison", str(tmp_path / "cmp.json"), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_heatmap_has_a_row_per_tier(artifacts, tmp_path):
    """A map with recency tiers gets a heatmap panel row per shown tier and its windows in the text."""
    from kvcompile.kv.precision_map import PrecisionMap
    from kvcompile.report.plots import heatmap_tiers

    three = PrecisionMap.load(artifacts / "map.json")
    tiered = PrecisionMap.uniform(three.num_layers, three.num_kv_heads, three.head_dim, "int2", sink_tokens=0,
                                  recent_window=16, ages=((16, "int8"), (16, "int4")))
    assert heatmap_tiers(three) == ["bulk"]
    assert heatmap_tiers(tiered) == ["age1", "age2", "bulk"]
    tiered.save(tmp_path / "t.json")
    assert main(["report", str(artifacts / "calib"), "--map", str(tmp_path / "t.json"), "-o", str(tmp_path / "r")]) == 0
    assert "age tiers age1 16, age2 16" in (tmp_path / "r" / "report.md").read_text()
    tall = (tmp_path / "r" / "precision_heatmap.png").read_bytes()
    main(["report", str(artifacts / "calib"), "--map", str(artifacts / "map.json"), "-o", str(tmp_path / "r3")])
    import struct

    height = lambda png: struct.unpack(">I", png[20:24])[0]  # noqa: E731  (PNG IHDR height)
    assert height(tall) > 2 * height((tmp_path / "r3" / "precision_heatmap.png").read_bytes())
