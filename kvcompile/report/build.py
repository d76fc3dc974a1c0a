"""``kvcompile report``: Markdown + HTML with a per-layer table and plots.

Inputs: a Calibration (required), optionally a PrecisionMap, the JSON of
``bench/bound_validation.py`` (scatter) and of ``bench/plan_vs_uniform.py`` or ``bench/quality.py``
(quality-vs-memory curve).  The report directory is built in a temporary sibling and renamed into
place, so a failure leaves no half-written report.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from kvcompile.artifacts import staged_directory
from kvcompile.errors import ArtifactError
from kvcompile.calibrate import Calibration
from kvcompile.kv.precision_map import STREAMS, PrecisionMap
from kvcompile.report import plots


def _layer_table(calib: Calibration, pmap: PrecisionMap | None) -> list[list[str]]:
    """One row per layer: curvature and range of K and V, and (with a map) chosen schemes and predicted cost."""
    g = calib.geometry
    w_idx = calib.window_options.index(pmap.recent_window) if pmap and pmap.recent_window in calib.window_options else 0
    n_idx = calib.sink_options.index(pmap.sink_tokens) if pmap and pmap.sink_tokens in calib.sink_options else 0
    cost = calib.corrected_cost()
    header = ["layer", "κ K", "κ V", "D K", "D V"]
    if pmap:
        header += ["K schemes (per head)", "V schemes (per head)", "predicted KL"]
    rows = [header]
    for layer in range(g.num_layers):
        row = [str(layer)]
        row += [f"{calib.curvature[layer, :, s, 0].mean().item():.3g}" for s in range(2)]
        row += [f"{calib.diameter[layer, :, s].mean().item():.3g}" for s in range(2)]
        if pmap:
            row += [" ".join(pmap.schemes[st]["bulk"][layer]) for st in STREAMS]
            total = 0.0
            for h in range(g.num_kv_heads):
                for s, st in enumerate(STREAMS):
                    name = pmap.schemes[st]["bulk"][layer][h]
                    if name in calib.schemes:
                        total += cost[layer, h, s, calib.schemes.index(name), w_idx, n_idx].item()
            row.append(f"{total:.4g}")
        rows.append(row)
    return rows


def _markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _bench_result(path, made_by: str, keys: tuple[str, ...]) -> dict:
    """A bench's JSON result, or one ArtifactError line naming what was expected."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: expected the JSON written by {made_by} ({type(e).__name__})") from None
    if not isinstance(doc, dict) or any(k not in doc for k in keys):
        raise ArtifactError(f"{path}: expected the JSON written by {made_by}, with {', '.join(keys)}")
    return doc


def build_report(calibration, output, pmap_path=None, validation=None, comparison=None, context: int | None = None) -> Path:
    calib = Calibration.load(calibration)
    pmap = PrecisionMap.load(pmap_path) if pmap_path else None
    context = context or calib.window
    output = Path(output)
    with staged_directory(output, what="report") as tmp:
        md = [f"# kvcompile report: {calib.model}", "",
              f"Calibration: {calib.windows} × {calib.window} tokens of `{calib.text}`, estimator `{calib.estimator}` "
              f"({calib.cost_unit}), {calib.seconds:.0f} s. Candidate schemes: {', '.join(calib.schemes)}.", ""]
        images = []
        if pmap:
            plots.precision_heatmap(pmap, tmp / "precision_heatmap.png", context)
            images.append(("Precision map", "precision_heatmap.png"))
            md += [f"## Precision map", "", f"{pmap.description or pmap.summary()}", "",
                   f"{pmap.bits_per_element(context):.3f} bits/element at context {context}; sinks {pmap.sink_tokens}, "
                   f"recent window {pmap.recent_window}"
                   + (f", age tiers {', '.join(f'age{i} {w}' for i, w in enumerate(pmap.age_windows, 1))}"
                      if pmap.age_windows else "") + ".", "", "![precision heatmap](precision_heatmap.png)", ""]
        if validation:
            doc = _bench_result(validation, "bench/bound_validation.py", ("summary", "sites"))
            plots.scatter_predicted_measured(doc["sites"], tmp / "predicted_vs_measured.png")
            images.append(("Predicted vs measured", "predicted_vs_measured.png"))
            md += ["## Predicted vs measured error (one site at a time)", "",
                   "| prediction | Spearman | holds at c = 1 | c for 90 % | median measured/predicted |", "|---|---|---|---|---|"]
            for key, s in doc["summary"].items():
                md.append(f"| {key} | {s['spearman']:.3f} | {s['holds_c1']:.0%} | {s['c_for_90pct']:.2f} | {s['median_ratio']:.2f} |")
            md += ["", "![predicted vs measured](predicted_vs_measured.png)", ""]
        if comparison:
            doc = _bench_result(comparison, "bench/plan_vs_uniform.py or bench/quality.py", ("results",))
            plots.quality_vs_memory(doc["results"], tmp / "quality_vs_memory.png")
            images.append(("Quality vs memory", "quality_vs_memory.png"))
            md += ["## Quality vs memory", "", "| map | bits/elt | ΔPPL % | KL | top-1 |", "|---|---|---|---|---|"]
            for r in sorted(doc["results"], key=lambda r: r["bits_per_element"]):
                md.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} |")
            md += ["", "![quality vs memory](quality_vs_memory.png)", ""]
        rows = _layer_table(calib, pmap)
        md += ["## Per-layer breakdown", "", "κ: mean curvature per stored element (queries at any distance); "
               "D: mean range of a 32-channel group.", "", _markdown_table(rows), ""]
        (tmp / "report.md").write_text("\n".join(md))
        body = "".join(f"<h2>{html.escape(t)}</h2><img src='{f}' style='max-width:100%'>" for t, f in images)
        table = "<table border=1 cellspacing=0 cellpadding=3>" + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in r) + "</tr>"
            for i, r in enumerate(rows)) + "</table>"
        (tmp / "report.html").write_text(f"<!doctype html><meta charset=utf-8><title>kvcompile report</title>"
                                          f"<h1>kvcompile report: {html.escape(calib.model)}</h1>{body}"
                                          f"<h2>Per-layer breakdown</h2>{table}")
    return output
