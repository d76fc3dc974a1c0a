"""The figures README.md and docs/ quote are the ones in the committed JSON of the bench that made them.

Each claim names a document, a pattern whose groups capture figures as printed, and the same figures
formatted from ``bench/results/*.json``; tables are compared row by row.  A bench re-run that changes
a result, or an edit that changes a figure, fails here until the other side follows.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=None)
def result(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def text(doc: str) -> str:
    return (ROOT / doc).read_text()


def bench_module(name: str):
    """``bench/<name>.py`` as a module (its table-line functions)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(x: float, digits: int = 2) -> str:
    """A ΔPPL as the docs print it: signed, and a true minus sign where the docs use one."""
    return f"{x:+.{digits}f}"


def same_number(printed: str, expected: str) -> bool:
    return printed.replace("−", "-") == expected.replace("−", "-")


def table_rows(doc: str, header_start: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``header_start``."""
    lines = text(doc).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    assert rows, f"{doc}: table {header_start!r} is empty"
    return rows


# ------------------------------------------------------------------ single figures in prose

def _calibration_seconds() -> str:
    return f"{result('plan_vs_uniform')['calibration_seconds']:.0f}"


def _comparison(name: str) -> dict:
    return next(c for c in result("plan_vs_uniform")["comparisons"] if c["map"] == name)


def _bound(kind: str) -> dict:
    return result("bound_validation")["summary"][kind]


def _peer_rows(name: str) -> dict[str, dict]:
    """bench/peers.py rows by name, with ΔPPL %."""
    return {r["name"]: {**r, "delta_ppl_pct": 100 * (r["ppl"] / r["ppl_reference"] - 1)} for r in result(name)["results"]}


def _peers_at_3_32_bits(rows: dict[str, dict]) -> tuple[str, ...]:
    """The planned 3.32-bit map's ΔPPL and KL, quanto int4 r128's ΔPPL and memory ratio, the best 2-bit r32 peer's ΔPPL."""
    ours, quanto = rows["planned @ 3.32 bits"], rows["quanto int4 axis 0 r128"]
    two_bit = min(r["delta_ppl_pct"] for name, r in rows.items() if "int2" in name and name.endswith("r32"))
    return (f"{ours['delta_ppl_pct']:.2f}", f"{ours['kl']:.4f}", f"{quanto['delta_ppl_pct']:.2f}",
            f"{quanto['bits_per_element'] / ours['bits_per_element']:.1f}", f"{two_bit:.2f}")


def _validate_cases(kind: str) -> list[dict]:
    return [r for r in result("validate_faults")["results"] if r["kind"] == kind]


def _prefix(key: str) -> float:
    return result("prefix_cache")[key]


CLAIMS = [
    ("README.md", r"hybrid\nestimator in (\d+) s", _calibration_seconds),
    ("docs/calibration-results.md", r"\| hybrid \(default\) \| 4 × 512 \| (\d+) s \|", _calibration_seconds),
    ("docs/calibration-results.md", r"In 3 rounds and (\d+) s",
     lambda: f"{_comparison('plan kl<=0.02 refined')['refinement_seconds']:.0f}"),
    ("docs/calibration-results.md", r"\+2\.47 → \+1\.69 %\), in (\d+) s",
     lambda: f"{_comparison('plan 4b refined')['refinement_seconds']:.0f}"),
    ("docs/calibration-results.md", r"holds on (\d+)% of sites at c = 1, and c ≈ ([\d.]+) makes it hold on (\d+) % \((\d+) of the (\d+)",
     lambda: (f"{100 * _bound('predicted_corrected')['holds_c1']:.0f}", f"{_bound('predicted_corrected')['c_for_90pct']:.1f}",
              f"{100 * _bound('predicted_corrected')['holds_c90']:.0f}",
              f"{round(_bound('predicted_corrected')['holds_c90'] * len(result('bound_validation')['sites']))}",
              f"{len(result('bound_validation')['sites'])}")),
    ("README.md", r"time to first token of requests 2–8 is\n([\d.]+)x the cold time", lambda: f"{_prefix('ttft_ratio_median'):.2f}"),
    ("README.md", r"total prefill ([\d.]+)x", lambda: f"{_prefix('prefill_ratio_total'):.2f}"),
    ("README.md", r"takes ([\d.]+) MB, ([\d.]+)x an fp16 cache",
     lambda: (f"{_prefix('entry_bytes') / 1e6:.2f}", f"{_prefix('entry_bytes') / _prefix('fp16_bytes'):.3f}")),
    ("README.md", r"the planned map is at\n\+([\d.]+) % \(KL ([\d.]+)\) against \+([\d.]+) % for quanto int4 with ([\d.]+)x "
                  r"the memory, and \+([\d.]+) % or more",
     lambda: _peers_at_3_32_bits(_peer_rows("peers_default_menu"))),
    ("README.md", r"HQQ's rows\nmoved between the two machines \(int4 r32 \+([\d.]+) % here, \+([\d.]+) % before\)",
     lambda: tuple(f"{_peer_rows(doc)['hqq int4 axis 0 r32']['delta_ppl_pct']:.2f}" for doc in ("peers_default_menu", "peers"))),
    ("README.md", r"default menu pass with at most ([\d.]+) % of stored elements differing",
     lambda: f"{100 * max(r['worst']['cache_differing'] for r in _validate_cases('faithful')):.3f}"),
    ("README.md", r"validate on that alone \(cosine ([\d.]+) over all steps\)",
     lambda: f"{next(r for r in _validate_cases('faithful') if r['case'].startswith('3-bit plan'))['worst']['min_cosine_all']:.5f}"),
]


@pytest.mark.parametrize("doc,pattern,expected", CLAIMS, ids=[f"{d}:{p[:40]}" for d, p, _ in CLAIMS])
def test_quoted_figure_equals_its_json(doc, pattern, expected):
    matches = re.findall(pattern, text(doc))
    assert matches, f"{doc}: no text matches {pattern!r}"
    want = expected()
    want = want if isinstance(want, tuple) else (want,)
    for m in matches:
        got = m if isinstance(m, tuple) else (m,)
        assert all(same_number(g, w) for g, w in zip(got, want)), f"{doc}: {got} quoted, JSON says {want}"


# ------------------------------------------------------------------ tables

def test_readme_baseline_table_is_the_bench_output():
    from kvcompile.measure.quality import QualityResult, format_table

    results = [QualityResult.from_json(r) for r in result("quality")["results"]]
    for line in format_table(results).splitlines():
        assert line in text("README.md").splitlines(), f"README.md lacks the bench line {line!r}"


def _readme_label(label: str) -> str:
    return label.lower().replace(" (uniform)", "").replace(" + 4 sinks", " s4")


def test_readme_equal_memory_table_matches_the_json():
    rows = {e["baseline"]: e for e in result("plan_vs_uniform")["equal_memory"] if not e["refined"]}
    for label, bits, base, planned in table_rows("README.md", "| baseline | bits/elt | baseline ΔPPL %"):
        e = rows[_readme_label(label)]
        digits = 0 if abs(e["baseline_delta_ppl_pct"]) >= 1000 else 1 if abs(e["baseline_delta_ppl_pct"]) >= 10 else 2
        assert same_number(bits, f"{e['baseline_bits']:.2f}"), label
        assert same_number(base, pct(e["baseline_delta_ppl_pct"], digits)), label
        digits = 1 if abs(e["plan_delta_ppl_pct"]) >= 10 else 2
        assert same_number(planned, pct(e["plan_delta_ppl_pct"], digits)), label


def test_calibration_results_tables_match_the_json():
    by_name = {r["name"]: r for r in result("plan_vs_uniform")["results"]}
    for label, bits, dppl, kl, top1 in table_rows("docs/calibration-results.md", "| map | bits/elt | ΔPPL % | KL | top-1 |"):
        name = max((n for n in by_name if label == n or label.startswith(n + " ")), key=len)
        r = by_name[name]
        assert (bits, kl, top1) == (f"{r['bits_per_element']:.3f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}"), label
        assert same_number(dppl, pct(r["delta_ppl_pct"])), label
    equal = {e["baseline"]: e for e in result("plan_vs_uniform")["equal_memory"] if not e["refined"]}
    rows = table_rows("docs/calibration-results.md", "| baseline | bits/elt | baseline ΔPPL % | planned ΔPPL %")
    assert len(rows) == len(equal)
    for label, bits, base, planned, interval, lower in rows:
        e = equal[label]
        low, high = e["difference_ci_pct"]
        assert bits == f"{e['baseline_bits']:.2f}" and interval == f"[{low:+.2f}, {high:+.2f}]", label
        assert same_number(base, pct(e["baseline_delta_ppl_pct"])) and same_number(planned, pct(e["plan_delta_ppl_pct"]))
        winner = "plan" if e["plan_wins"] else "baseline"
        assert lower == (winner if e["significant"] else f"{winner} (not significant)"), label


def test_bound_validation_table_matches_the_json():
    kinds = ["predicted", "predicted_corrected", "predicted_hnf"]
    rows = table_rows("docs/calibration-results.md", "| prediction | Spearman |")
    assert len(rows) == len(kinds)
    for (label, spearman, holds, c90, ratio), kind in zip(rows, kinds):
        s = _bound(kind)
        assert (spearman, holds, c90, ratio) == (f"{s['spearman']:.3f}", f"{100 * s['holds_c1']:.0f}%",
                                                 f"{s['c_for_90pct']:.2f}", f"{s['median_ratio']:.2f}"), label


def test_onnx_runtime_tables_match_the_json():
    doc = result("onnx_runtime")
    rows = table_rows("docs/export.md", "| variant | context | batch | decode tokens/s |")
    assert len(rows) == len(doc["results"]) == 18
    for cells, r in zip(rows, doc["results"]):
        assert cells == [r["variant"], str(r["context"]), str(r["batch"]), f"{r['tokens_per_s']:.1f}",
                         f"{r['speed_vs_fp16']:.2f}", f"{r['kv_bytes'] / 2**20:.1f}", f"{r['kv_bytes_vs_fp16']:.3f}",
                         f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['peak_rss_vs_fp16']:.2f}"], cells
    peers = table_rows("docs/export.md", "| context | batch | KVAttention, native (ms) |")
    assert len(peers) == len(doc["attention_peers"]) == 6
    for cells, p in zip(peers, doc["attention_peers"]):
        assert cells == [str(p["context"]), str(p["batch"]), f"{p['native_ms']:.3f}", f"{p['gqa_int8_ms']:.3f}",
                         f"{p['native_speedup_vs_gqa_int8']:.2f}"], cells


def _ort(variant: str, key: str, pick=None):
    rows = [r for r in result("onnx_runtime")["results"] if r["variant"] == variant]
    values = [r[key] for r in rows] if pick is None else [r[key] for r in rows if pick(r)]
    return values


def _ort_range(variant: str, key: str) -> str:
    values = _ort(variant, key)
    return f"{min(values):.2f}–{max(values):.2f}"


def test_onnx_runtime_prose_matches_the_json():
    export_md, readme = text("docs/export.md"), text("README.md")
    assert f"de-quantizes the whole cache ({_ort_range('packed, function bodies', 'speed_vs_fp16')}x the fp16" in export_md
    assert f"reads {_ort_range('packed, native', 'kv_bytes_vs_fp16')}x the bytes" in export_md
    native = [r for r in result("onnx_runtime")["results"] if r["variant"] == "packed, native"]
    native_speed = [r["speed_vs_fp16"] for r in native]
    low, high = min(native, key=lambda r: r["speed_vs_fp16"]), max(native, key=lambda r: r["speed_vs_fp16"])
    rest = min(r["speed_vs_fp16"] for r in native if r is not low)
    assert (f"runs at {low['speed_vs_fp16']:.2f}x at {low['context']} x {low['batch']} (positions x batch) and from "
            f"{rest:.2f}x elsewhere, up to {high['speed_vs_fp16']:.2f}x at {high['context']} x {high['batch']}") in \
        export_md.replace("\n", " ")
    largest = _ort("packed, native", "peak_rss_vs_fp16", lambda r: (r["context"], r["batch"]) == (8192, 8))[0]
    assert f"peak memory falls to {largest:.2f}x at 8192\npositions × 8 sequences" in export_md
    peers = result("onnx_runtime")["attention_peers"]
    behind = [p["native_speedup_vs_gqa_int8"] for p in peers if p["native_speedup_vs_gqa_int8"] < 1]
    ahead = ", ".join(f"{c} x {b}" for b, c in sorted((p["batch"], p["context"]) for p in peers
                                                       if p["native_speedup_vs_gqa_int8"] >= 1))
    assert f"at {ahead} (positions x batch) and behind elsewhere ({min(behind):.2f}–{max(behind):.2f}x)" in \
        export_md.replace("\n", " ")
    assert f"int8 cache: ahead at {ahead} (positions x batch), behind at the other points" in readme.replace("\n", " ")
    top = _ort("packed, native", "speed_vs_fp16", lambda r: (r["context"], r["batch"]) == (8192, 8))[0]
    assert f"{top:.2f}x the fp16-KV export's decode speed at 8192 positions × 8 sequences" in readme.replace("\n", " ")
    assert f"at least {min(native_speed):.2f}x" in readme.replace("\n", " ")
    assert f"holding {_ort_range('packed, native', 'kv_bytes_vs_fp16')}x the cache bytes" in readme.replace("\n", " ")
    assert f"(function bodies) runs at {_ort_range('packed, function bodies', 'speed_vs_fp16')}x" in \
        readme.replace("\n", " ")


def test_simulate_vs_decode_table_matches_the_json():
    rows = table_rows("docs/evaluation.md", "| map | ΔPPL % simulate |")
    results = result("simulate_vs_decode")["results"]
    assert len(rows) == len(results) and result("simulate_vs_decode")["tokens_scored"] >= 8000
    for (label, sim, dec, gap, interval, kl_sim, kl_dec), r in zip(rows, results):
        ci = r["delta_ppl_gap_interval"]
        assert (label, sim, dec, gap, interval, kl_sim, kl_dec) == (
            r["map"], pct(r["simulate"]["delta_ppl_pct"], 3), pct(r["decode"]["delta_ppl_pct"], 3),
            pct(r["delta_ppl_gap_pct"], 3), f"[{ci['ci_low_pct']:+.3f}, {ci['ci_high_pct']:+.3f}]",
            f"{r['simulate']['kl']:.5f}", f"{r['decode']['kl']:.5f}")


def test_fuzz_table_matches_the_json():
    rows = table_rows("README.md", "| loader | cases | one-line error |")
    results = result("fuzz")["results"]
    assert [r[0] for r in rows] == list(results)
    for label, cases, *counts in rows:
        r = results[label]
        assert int(cases) == r["cases"] >= 1000
        assert [int(c) for c in counts] == [r["outcomes"][o] for o in ("one-line error", "accepted valid",
                                                                        "invalid accepted", "valid refused",
                                                                        "other exception")]


def test_validate_faults_table_matches_the_json_and_the_thresholds_separate_it():
    from kvcompile.validate.compare import STRICT

    rows = table_rows("docs/export.md", "| case | kind | steps within polygraphy tol. |")
    results = result("validate_faults")["results"]
    assert len(rows) == len(results)
    for (case, kind, steps, kl, top1, cos, shape, differing, cos_all, same), r in zip(rows, results):
        w = r["worst"]
        assert (case, kind, steps, kl, top1, cos) == (r["case"], r["kind"], f"{100 * w['pass_rate']:.1f} %",
                                                      f"{w['kl']:.1e}", f"{w['top1']:.3f}", f"{w['min_cosine']:.5f}")
        if w["cache_checked"]:
            assert (shape, differing, cos_all, same) == (str(w["cache_mismatched"]), f"{100 * w['cache_differing']:.3f} %",
                                                         f"{w['min_cosine_all']:.5f}", f"{100 * w['same_cache']:.1f} %")
            passes = (w["pass_rate"] >= STRICT["min_pass_rate"] and w["min_cosine"] >= STRICT["min_cosine"]
                      and w["top1"] >= STRICT["min_top1"] and w["kl"] <= STRICT["max_kl"]
                      and w["cache_mismatched"] == 0 and w["cache_differing"] <= STRICT["max_cache_differing"])
            assert passes == (kind == "faithful"), case  # the thresholds pass every faithful export, fail every fault
    faithful = {r["case"]: r["worst"] for r in results if r["kind"] == "faithful"}
    worst = max(faithful.values(), key=lambda w: w["kl"])
    assert worst is faithful["3-bit plan: ONNX Runtime export"]
    doc = " ".join(text("docs/export.md").split())

    def short(x):  # 1.2e-04 as the prose writes it, 1.2e-4
        return f"{x:.1e}".replace("e-0", "e-")

    assert (f"the worst, the 3-bit plan: KL {short(worst['kl'])}, {100 * worst['cache_differing']:.3f} % of stored elements "
            f"differing; int8: KL {short(faithful['int8: ONNX Runtime export']['kl'])}") in doc
    # the reason for judging the cosine by steps: over all steps the 3-bit plan misses the bound
    assert worst["min_cosine_all"] < STRICT["min_cosine"] <= worst["min_cosine"]
    assert (f"3-bit plan below has cosine {worst['min_cosine_all']:.5f} over all steps, and {worst['min_cosine']:.5f} over "
            f"the {100 * worst['same_cache']:.1f} % of steps") in doc


def test_memory_accounting_tables_and_prose_match_the_json():
    doc = result("memory_accounting")
    rows = {r["map"]: r for r in doc["results"]}
    table = table_rows("docs/calibration-results.md", "| map | bits, final | bits, allocated | ΔPPL % | KL |")
    for label, final, allocated, dppl, kl in table:
        r = rows[label]
        assert (final, allocated, kl) == (f"{r['bits_final']:.3f}", f"{r['bits_allocated']:.3f}", f"{r['result']['kl']:.4f}")
        assert same_number(dppl, pct(r["result"]["delta_ppl_pct"]))
    comparisons = {(c["a"], c["b"]): c for c in doc["comparisons"]}
    for label, final, sinks, window, dppl, kl, diff in table_rows("docs/calibration-results.md",
                                                                  "| map | bits, final | sinks | window |"):
        r, c = rows[label], comparisons[(label, "kivi-4 w32 s4")]
        assert (int(sinks), int(window), kl) == (r["sinks"], r["window"], f"{r['result']['kl']:.4f}")
        assert diff.startswith(f"{c['difference_pct']:+.2f} [{c['ci_low_pct']:+.2f}, {c['ci_high_pct']:+.2f}]")
        assert diff.endswith("(not significant)") != c["significant"]
    cal = doc["calibration"]
    assert f"calibrates once ({cal['seconds']:.0f} s, peak resident memory\n{cal['peak_rss_gib_after']:.1f} GiB" in \
        text("docs/calibration-results.md")
    g = comparisons[("plan 2.5b, menu + g128", "plan 2.5b")]
    assert (f"interval\nof the difference {g['ci_low_pct']:.1f} to {g['ci_high_pct']:.1f} points), but it costs "
            f"{rows['plan 2.5b, menu + g128']['bits_allocated']:.2f} allocated bits") in text("docs/calibration-results.md")


def test_tiers_table_matches_the_json():
    rows = table_rows("README.md", "| context | budget | 3-class bits |")
    results = result("tiers")["results"]
    assert len(rows) == len(results)
    for row, r in zip(rows, results):
        t, c, b = r["tiers"], r["three_class"], r["tiers_minus_three_class"]
        want = [str(r["context"]), str(r["budget_bits"]), f"{c['bits_per_element']:.3f}", f"{pct(c['delta_ppl_pct'])} %",
                f"{c['kl']:.4f}", f"{t['bits_per_element']:.3f}",
                f"{t['recent_window']} + {t['age_windows']}", f"{pct(t['delta_ppl_pct'])} %", f"{t['kl']:.4f}",
                f"{pct(b['difference_pct'])} [{pct(b['ci_low_pct'])}, {pct(b['ci_high_pct'])}]"]
        assert all(same_number(g, w) for g, w in zip(row, want)) and len(row) == len(want), (row, want)


def _tier_row(context: int, budget: float) -> dict:
    return next(r for r in result("tiers")["results"] if r["context"] == context and r["budget_bits"] == budget)


def test_tiers_prose_quotes_the_json():
    r = _tier_row(2048, 3.5)
    quoted = re.search(r"by ([\d.]+) points of ΔPPL \(([+\d.]+) % against ([+\d.]+) %\)", text("README.md"))
    assert quoted and quoted.groups() == (f"{-r['tiers_minus_three_class']['difference_pct']:.2f}",
                                          pct(r["tiers"]["delta_ppl_pct"]), pct(r["three_class"]["delta_ppl_pct"]))
    assert r["tiers_minus_three_class"]["significant"]
    r = _tier_row(2048, 3.0)
    assert f"gain at 2,048 tokens ({-r['tiers_minus_three_class']['difference_pct']:.2f} points)" in text("README.md")
    r = _tier_row(4096, 3.0)
    assert f"(KL {r['tiers']['kl']:.3f} with tiers against {r['three_class']['kl']:.3f} without)" in text("README.md")


@pytest.mark.parametrize("name", ["peers", "peers_default_menu"])
def test_readme_peers_table_and_goals_are_the_bench_output(name):
    from kvcompile.measure.quality import QualityResult, format_table

    doc = result(name)
    lines = text("README.md").splitlines()
    for line in format_table([QualityResult.from_json(r) for r in doc["results"]]).splitlines():
        assert line in lines, f"README.md lacks the bench/peers.py line {line!r}"
    for g in doc["goals"]:
        line = (f"- {g['map']}: ΔPPL {g['delta_ppl_pct']:+.2f} % against {g['best_peer']} at "
                f"{g['best_peer_delta_ppl_pct']:+.2f} % (the best peer with at least as many bits): goal "
                f"{'met' if g['met'] else 'missed'}")
        assert line in lines, f"README.md lacks the goal line {line!r}"


def test_readme_retrieval_heads_paragraph_quotes_the_json():
    sec = result("quality_per_bit")["retrieval_heads"]
    probe, rows = sec["probe"], {r["name"]: r for r in sec["results"]}
    readme = " ".join(text("README.md").split())
    heads = result("smollm2-retrieval-heads")  # the CLI's artifact: the bench's probe, timed alone
    assert {k: v for k, v in heads.items() if k in probe and k != "seconds"} == {k: v for k, v in probe.items()
                                                                                 if k != "seconds"}
    assert (f"on {probe['cases']} needle cases of {probe['context']:,} tokens of calibration text ({heads['seconds']:.1f} s "
            f"on 2 cores: `kvcompile retrieval-heads -o bench/results/smollm2-retrieval-heads.json`; the full-precision "
            f"model answers {probe['retrieved']})") in readme
    top = sorted(((s, l, h) for l, row in enumerate(probe["scores"]) for h, s in enumerate(row)), reverse=True)[:4]
    assert ", ".join(f"layer {l} head {h}: {s:.2f}" for s, l, h in top) in readme
    strong = sum(s >= 0.5 for row in probe["scores"] for s in row)
    weak = sum(0.1 <= s < 0.5 for row in probe["scores"] for s in row)
    assert (strong, weak) == (4, 5) and "Four of SmolLM2's 90 kv heads score at least 0.5" in readme
    logp = [rows[n]["answer_logprob"] for n in ("plan 3b tiers", "plan 3b tiers, heads >= 0.5 in int8",
                                                 "plan 3b tiers, heads >= 0.1 in int8")]
    assert "(log-probability {} without protection, {} with 4 heads, {} with 9)".format(
        *(f"{x:.2f}".replace("-", "−") for x in logp)) in readme
    assert logp[0] > logp[1] > logp[2]  # the claim: protection within the budget makes the answer less likely
    assert f"answers none here ({rows['int4']['answer_logprob']:.2f})".replace("-", "−") in readme


def test_readme_quality_per_bit_section_is_the_bench_output():
    """bench/quality_per_bit.py's tables and goal lines (issue 16) appear in README.md as the JSON gives them."""
    bench = bench_module("quality_per_bit")
    doc = result("quality_per_bit")
    assert set(bench.STAGES) <= set(doc) and not any("error" in doc[s] for s in bench.STAGES)
    lines = text("README.md").splitlines()
    wanted = bench.readme_lines(doc)
    assert len(wanted) > 30
    for line in wanted:
        assert line in lines, f"README.md lacks the bench/quality_per_bit.py line {line!r}"
    seconds = f"calibration with the default menu of {len(doc['calibrate']['schemes'])} formats took " \
              f"{doc['calibrate']['seconds']:.0f} s"
    assert seconds in text("README.md")
    assert f"takes {doc['outliers']['calibration_seconds']:.0f} s, over the 2-minute target" in text("README.md")
    assert f"({doc['prerope_lloyd']['calibration_seconds']:.1f} s) and plans plain maps" in text("README.md")
    assert f"calibrates the menu with both ({doc['lloyd_channel']['calibration_seconds']:.1f} s for " \
           f"{len(doc['lloyd_channel']['schemes'])} formats" in text("README.md")
    timing = result("calibration_time")
    assert (f"now measures {timing['calibration_seconds']:.1f} s for the default calibration (today's menu) in a fresh process,\n"
            f"{timing['ratio_to_target']:.2f}x the target ({timing['repeat_seconds']:.1f} s repeated") in text("README.md")


def test_lloyd_channel_speed_figures_are_the_bench_output():
    """The decode speeds README.md quotes for the 3-bit maps with per-channel Lloyd-Max and uniform codes."""
    readme = text("README.md").replace("\n", " ")

    def ratios(name):
        native = sorted((r for r in result(name)["results"] if r["variant"] == "packed, native"), key=lambda r: r["context"])
        return [f"{r['speed_vs_fp16']:.2f}x" for r in native], [f"{r['kv_bytes_vs_fp16']:.2f}x" for r in native]

    (s512, s2048), (b512, b2048) = ratios("onnx_runtime_lloyd_channel")
    assert f"at {s512} (512 positions) and {s2048} (2,048) the fp16-KV export's speed with {b512} and {b2048} its cache bytes" in readme
    (u512, u2048), _ = ratios("onnx_runtime_uniform_channel")
    assert f"same command) runs at {u512} and {u2048}:" in readme


def test_codebook_table_and_figures_are_the_bench_output():
    """bench/codebooks.py's table (calibrated codebooks against the Gaussian one) in docs/formats.md,
    and the ranges README.md quotes from it."""
    bench = bench_module("codebooks")
    doc = result("codebooks")
    lines = text("docs/formats.md").splitlines()
    for line in bench.table_lines(doc):
        assert line in lines, f"docs/formats.md lacks the bench/codebooks.py line {line!r}"
    site = [r["site_mse_ratio"] for r in doc["results"]]
    uniform = [r["uniform_mse_ratio"] for r in doc["results"] if "uniform" in r]
    assert (f"their mean held-out squared error is {min(site):.3f}–{max(site):.3f}x the Gaussian codebook's"
            in text("README.md").replace("\n", " "))
    assert f"equal bits have {min(uniform):.2f}–{max(uniform):.2f}x it" in text("README.md").replace("\n", " ")
    formats = text("docs/formats.md").replace("\n", " ")
    best = min(doc["results"], key=lambda r: r["site_mse_ratio"])
    assert f"at most {100 * (1 - best['site_mse_ratio']):.1f} % of squared error on average" in formats
    assert f"at most {100 * (1 - min(r['site_best_mse_ratio'] for r in doc['results'])):.0f} % at the best single site" in formats
    assert f"worth {min(uniform):.1f}–{max(uniform):.1f}x against uniform codes" in formats


def test_readme_gemma_baseline_table_is_the_bench_output():
    from kvcompile.measure.quality import QualityResult, format_table

    results = [QualityResult.from_json(r) for r in result("quality_gemma3")["results"]]
    assert result("quality_gemma3")["model"] == "gemma3-270m"
    for line in format_table(results).splitlines():
        assert line in text("README.md").splitlines(), f"README.md lacks the bench line {line!r}"


def test_readme_gemma_planner_table_matches_the_json():
    comparisons = {c["map"]: c for c in result("plan_vs_uniform_gemma3")["comparisons"]}
    rows = table_rows("README.md", "| map | bits/elt | ΔPPL % | KL | predicted KL | beats |")
    assert len(rows) == 5
    for name, bits, delta, kl, predicted, beats in rows:
        c = comparisons[name.replace("&lt;", "<")]
        assert (bits, delta, kl, predicted) == (f"{c['bits_per_element']:.2f}", pct(c["delta_ppl_pct"]),
                                                f"{c['kl']:.4f}", f"{c['predicted_kl']:.4f}"), name
        assert beats == f"{len(c['beats'])} of {len(c['beats']) + len(c['does_not_beat'])}", name


def test_readme_gemma_export_paths_table_matches_the_json():
    rows = {r[0]: r for r in table_rows("README.md", "| path | export s | nodes |")}
    for name, r in result("export_paths")["results"].items():
        assert rows[name][1:6] == [f"{r['export_s']:.1f}", str(r["graph_nodes"]), f"{r['bytes'] / 1e6:.0f}",
                                   f"{r['session_s']:.2f}", f"{r['prefill_s']:.2f}"], name


def _ort_gemma(variant: str, context: int) -> dict:
    return next(r for r in result("onnx_runtime_gemma3")["results"] if (r["variant"], r["context"]) == (variant, context))


def _v_ppl(label: str) -> str:
    return pct(result("v_lowrank_gemma3")["v_roundtrip_ppl"][label]["delta_ppl_pct"])


def _ort_lloyd(variant: str, context: int) -> str:
    row = next(r for r in result("onnx_runtime_lloyd")["results"] if (r["variant"], r["context"]) == (variant, context))
    return f"{row['speed_vs_fp16']:.2f}"


def _ort_lloyd_bytes(context: int) -> str:
    row = next(r for r in result("onnx_runtime_lloyd")["results"] if (r["variant"], r["context"]) == ("packed, native",
                                                                                                      context))
    return f"{row['kv_bytes_vs_fp16']:.2f}"


GEMMA_CLAIMS = [
    (r"at ([\d.]+)x \(512 positions\) and ([\d.]+)x \(2,048\) the fp16-KV export's speed with ([\d.]+)x and "
     r"([\d.]+)x its cache\nbytes; with its Lloyd-Max head groups left to the function body, as before the library "
     r"read them, it\nruns at ([\d.]+)x and ([\d.]+)x",
     lambda: (_ort_lloyd("packed, native", 512), _ort_lloyd("packed, native", 2048), _ort_lloyd_bytes(512),
              _ort_lloyd_bytes(2048), _ort_lloyd("packed, native, Lloyd-Max in bodies", 512),
              _ort_lloyd("packed, native, Lloyd-Max in bodies", 2048))),
    (r"3-bit coefficients has [\d.]+x the\nreconstruction error of per-channel int2 and ΔPPL ([+\d.-]+) % against ([+\d.-]+) %",
     lambda: (_v_ppl("pca r192 int3-ch (3.00 b)"), _v_ppl("int2-ch (3.00 b)"))),
    (r"coefficients costs ([+\d.-]+) % against ([+\d.-]+) % for per-channel int3",
     lambda: (_v_ppl("pca r256 int3-ch (4.00 b)"), _v_ppl("int3-ch (4.00 b)"))),
    (r"the packed export decodes at ([\d.]+)x \(512 positions\) and ([\d.]+)x \(2,048\)",
     lambda: (f"{_ort_gemma('packed, native', 512)['speed_vs_fp16']:.2f}",
              f"{_ort_gemma('packed, native', 2048)['speed_vs_fp16']:.2f}")),
    (r"Through the function bodies \(stock ONNX Runtime\) the same export runs at\n  ([\d.]+)x and ([\d.]+)x",
     lambda: (f"{_ort_gemma('packed, function bodies', 512)['speed_vs_fp16']:.2f}",
              f"{_ort_gemma('packed, function bodies', 2048)['speed_vs_fp16']:.2f}")),
    (r"builds the engine on the CPU in (\d+) s", lambda: f"{result('engine_build_gemma3')['build_seconds']:.0f}"),
    (r"with (\d+) plugin layers from the compiled library: (\d+) `KVAttention` \(the full-attention layers\)\n  and "
     r"(\d+) `KVWindowAttention`",
     lambda: tuple(str(n) for n in (result("engine_build_gemma3")["plugin_layers"],
                                    *result("engine_build_gemma3")["plugin_layers_by_op"].values()))),
    (r"the fp16 export passes\n  the strict tolerances \(KL to the torch reference ([\d.e-]+),",
     lambda: f"{result('validate_gemma3_fp16')['kl_vs_reference']:.1e}"),
    (r"agreement ([\d.]+), KL to the reference ([\d.e-]+) \(limit 2e-4\), ([\d.]+) % of stored",
     lambda: (f"{result('validate_gemma3')['top1_vs_reference']:.3f}", f"{result('validate_gemma3')['kl_vs_reference']:.1e}",
              f"{100 * result('validate_gemma3')['cache_differing_fraction']:.3f}")),
    (r"the planned export fails the KL limit \(([\d.e-]+);", lambda: f"{result('validate_gemma3_160')['kl_vs_reference']:.1e}"),
    (r"holds ([\d.]+)x the KV bytes of keeping them at 4,096 positions\n  and ([\d.]+)x at 32,768",
     lambda: tuple(f"{r['ratio']:.3f}" for r in result("window_memory_gemma3")["results"]
                   if r["map"] == "fp16" and r["context"] in (4096, 32768))),
]


@pytest.mark.parametrize("pattern,expected", GEMMA_CLAIMS, ids=[p[:40] for p, _ in GEMMA_CLAIMS])
def test_readme_gemma_figures_equal_their_json(pattern, expected):
    matches = re.findall(pattern, text("README.md"))
    assert matches, f"README.md: no text matches {pattern!r}"
    want = expected()
    want = want if isinstance(want, tuple) else (want,)
    for m in matches:
        got = m if isinstance(m, tuple) else (m,)
        assert got == want, f"README.md: {got} quoted, JSON says {want}"


def test_cross_layer_prediction_prose_is_the_bench_output():
    """README's cross-layer prediction paragraph (issue 16): every figure from the predictors and
    predicted stages of bench/quality_per_bit.py."""
    doc = result("quality_per_bit")
    prs, pred, long = doc["predictors"], doc["predicted"], doc["predicted_long"]
    readme = " ".join(text("README.md").split())
    kr, vr, sav, bp = prs["range"]["key"], prs["range"]["value"], prs["mean_high_rate_saving_bits"], prs["by_position"]
    spans = list(bp)
    c = pred["calibration"]
    r = {x["name"]: x for x in pred["results"]}
    rl = {x["name"]: x for x in long["results"]}
    claims = [
        f"{kr[0] * 100:.1f}–{kr[1] * 100:.1f} % of a key's variance and {vr[0] * 100:.1f}–{vr[1] * 100:.1f} % of a value's",
        f"{sav['key']:.2f} and {sav['value']:.2f} bits per element saved on average",
        f"keys keep {bp[spans[0]]['key'] * 100:.1f} % at positions {spans[0].replace('-', '–')} (the positions fitted) "
        f"and {bp[spans[2]]['key'] * 100:.1f} % at {spans[2].replace('-', '–')}",
        f"{len(c['schemes'])} per-token formats on their residuals ({c['seconds']:.1f} s on 2 cores in the bench's "
        f"process: {c['fit_seconds']:.1f} s fit, {c['calibration_seconds']:.1f} s calibration",
        f"holds {prs['parameters'] * 4 / 2**20:.1f} MiB of float32 weights",
        f"{prs['parameters'] / 1e6:.2f} M parameters, {prs['bytes_fp16'] / 2**20:.1f} MiB in fp16",
        f"cuts KL {r['plan 3b tiers']['kl'] / r['plan 3b tiers predicted']['kl']:.0f}x at 3 bits "
        f"({r['plan 3b tiers']['kl']:.4f} to {r['plan 3b tiers predicted']['kl']:.4f})",
        f"{r['plan 2.5b tiers']['kl'] / r['plan 2.5b tiers predicted']['kl']:.0f}x at 2.5 bits "
        f"({r['plan 2.5b tiers']['kl']:.4f} to {r['plan 2.5b tiers predicted']['kl']:.4f})",
        f"at 4,096 tokens {rl['plan 3b tiers']['kl'] / rl['plan 3b tiers predicted']['kl']:.0f}x and "
        f"{rl['plan 2.5b tiers']['kl'] / rl['plan 2.5b tiers predicted']['kl']:.0f}x",
    ]
    for claim in claims:
        assert claim in readme, claim
    assert c["seconds"] < 120 and all(g["met"] for g in (*pred["goals"], *long["goals"]))


def test_cross_layer_prediction_retrieval_prose_is_the_bench_output():
    pr = result("quality_per_bit")["predicted_retrieval"]
    r4 = {r["name"]: r for r in pr["4096"]["results"]}
    r8 = {r["name"]: r for r in pr["8192"]["results"]}
    p, pp = "plan 3b tiers predicted", "plan 3b tiers predicted, heads >= 0.5 in int8"
    readme = " ".join(text("README.md").split())
    claims = [
        f"at 4,096 tokens from {r4['plan 3b tiers']['answer_logprob']:.2f} to {r4[p]['answer_logprob']:.2f} "
        f"(full precision {r4[p]['answer_logprob_reference']:.2f};",
        f"answers {round(r4[p]['accuracy'] * 5)} of the {round(r4[p]['accuracy_reference'] * 5)} cases",
        f"it answers {round(r4[pp]['accuracy'] * 5)} of {round(r4[pp]['accuracy_reference'] * 5)} "
        f"({r4[pp]['answer_logprob']:.2f})",
        f"the predicted map answers {round(r8[p]['accuracy'] * 3)} of 3, as the full-precision cache does",
        f"log-probability {r8[p]['answer_logprob']:.2f} against {r8[p]['answer_logprob_reference']:.2f}), while the "
        f"protected map misses it ({r8[pp]['answer_logprob']:.2f})",
    ]
    for claim in claims:
        assert claim in readme, claim
    assert r8[p]["accuracy"] == r8[p]["accuracy_reference"] and r8[pp]["accuracy"] < r8[pp]["accuracy_reference"]


def test_exported_cross_layer_prediction_prose_is_the_bench_output():
    """README's exported cross-layer prediction paragraph: the step-time ratio and both goals, from the
    predicted_export stage of bench/quality_per_bit.py."""
    sec = result("quality_per_bit")["predicted_export"]
    r = {x["name"]: x for x in sec["results"]}
    p, base = r["plan 3b tiers predicted"], r["plan 3b tiers"]
    readme = " ".join(text("README.md").split())
    ratio = p["decode_step_median_s"] / base["decode_step_median_s"]
    claim = (f"the predicted map's steps take {ratio:.1f}x as long ({1e3 * p['decode_step_median_s']:.1f} against "
             f"{1e3 * base['decode_step_median_s']:.1f} ms)")
    assert claim in readme, claim
    assert f"decodes the first {sec['windows']} held-out windows token by token" in readme
    assert all(g["met"] for g in sec["goals"]) and "So the deployed graphs meet both 512-token goals" in readme


def test_predicted_export_speed_figures_are_the_bench_output():
    """The decode speeds README.md quotes for the exported 3-bit predicted map (bench/onnx_runtime.py)."""
    readme = " ".join(text("README.md").split())
    rows = result("onnx_runtime_predicted")["results"]

    def by(variant, key):
        return [f"{r[key]:.2f}x" for r in sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["context"])]

    (p512, p4k), (n512, n4k) = by("cross-layer predicted, native", "speed_vs_fp16"), by("packed, native", "speed_vs_fp16")
    (pb512, pb4k), (nb512, nb4k) = (by("cross-layer predicted, native", "kv_bytes_vs_fp16"),
                                    by("packed, native", "kv_bytes_vs_fp16"))
    claim = (f"decodes at {p512} the fp16-KV export's speed at 512 positions and {p4k} at 4,096, where the default "
             f"menu's 3-bit map runs at {n512} and {n4k}; it holds {pb512} and {pb4k} the fp16 cache's bytes "
             f"(the default menu's: {nb512} and {nb4k})")
    assert claim in readme, claim
    assert {r["map"] for r in rows if r["variant"] == "cross-layer predicted, native"} == {
        "smollm2-plan-3b-tiers-predicted.json"}


def test_validate_predicted_table_matches_the_json_and_the_thresholds_separate_it():
    """docs/export.md's table of bench/validate_faults.py --predicted, and compare.PREDICTED between the
    faithful predicted export and the wrong-predictors fault."""
    from kvcompile.validate.compare import PREDICTED, STRICT

    bench = bench_module("validate_faults")
    doc = result("validate_predicted")
    lines = text("docs/export.md").splitlines()
    for line in bench.predicted_table_lines(doc):
        assert line in lines, line
    rows = {r["kind"]: r["worst"] for r in doc["results"]}
    good, bad = rows["faithful"], rows["fault"]

    def passes(w):
        return (w["pass_rate"] >= PREDICTED["min_pass_rate"] and w["min_cosine"] >= PREDICTED["min_cosine"]
                and w["top1_same_cache"] >= PREDICTED["min_top1"] and w["kl_same_cache"] <= PREDICTED["max_kl"]
                and w["cache_mismatched"] == 0 and w["cache_differing"] <= PREDICTED["max_cache_differing"])

    assert passes(good) and not passes(bad)
    assert bad["pass_rate"] < PREDICTED["min_pass_rate"] and bad["cache_differing"] > PREDICTED["max_cache_differing"]
    assert good["kl"] > STRICT["max_kl"]  # why the KL bound holds the steps that stored the reference's codes
    limit = PREDICTED["max_cache_differing"]
    prose = " ".join(text("docs/export.md").split())
    assert (f"up to {100 * limit:.1f} % of stored elements may differ ({limit / STRICT['max_cache_differing']:.0f}x "
            f"STRICT's {100 * STRICT['max_cache_differing']:.1f} %, {limit / good['cache_differing']:.0f}x the faithful "
            f"export's share and half the fault's)") in prose
    assert 0.4 < limit / bad["cache_differing"] < 0.6


def test_exported_long_context_prose_is_the_bench_output():
    sec = result("quality_per_bit")["predicted_export_long"]
    r = {x["name"]: x for x in sec["results"]}
    p, base = r["plan 2.5b tiers predicted"], r["plan 2.5b tiers"]
    readme = " ".join(text("README.md").split())
    assert (f"as a prefill of all but the last {sec['decode_steps']} positions, then {sec['decode_steps']} decode "
            "steps") in readme
    assert (f"the predicted map degrades far less ({p['exported_delta_ppl_pct']:+.2f} % against "
            f"{base['exported_delta_ppl_pct']:+.2f} % without prediction)") in readme
    for x in (p, base):  # "the export reproduces the simulation"
        assert abs(x["exported_kl"] - x["simulated_kl"]) < 0.05 * x["simulated_kl"]
    assert sec["prefill"] + sec["decode_steps"] == sec["window"] == 4096
