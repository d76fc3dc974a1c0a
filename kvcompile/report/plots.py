"""Plots for reports: precision heatmaps, predicted-vs-measured scatter, quality-vs-memory curves.

matplotlib is imported lazily with the non-interactive Agg backend; every function writes a PNG
atomically and returns its path.
"""

from __future__ import annotations

import io
from pathlib import Path

from kvcompile.artifacts import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def heatmap_tiers(pmap) -> list[str]:
    """Tiers the heatmap shows: every age tier and the bulk, and the recent tier unless it is all fp16."""
    recent_fp16 = all(n == "fp16" for st in ("key", "value") for row in pmap.schemes[st]["recent"] for n in row)
    return [c for c in pmap.classes[1:] if c != "recent" or not recent_fp16]


def precision_heatmap(pmap, path, context: int) -> Path:
    """Bits/element per (layer, kv head), one row of panels per tier (K and V side by side),
    annotated with scheme names."""
    import numpy as np

    plt = _pyplot()
    L, H = pmap.num_layers, pmap.num_kv_heads
    tiers = heatmap_tiers(pmap)
    windows = {"recent": pmap.recent_window, **{f"age{i}": w for i, w in enumerate(pmap.age_windows, 1)}}
    fig, axes = plt.subplots(len(tiers), 2, figsize=(2.2 + 1.3 * H * 2, (0.28 * L + 1.2) * len(tiers) + 0.4),
                             sharey=True, squeeze=False)
    for row, tier in zip(axes, tiers):
        for ax, stream in zip(row, ("key", "value")):
            bits = np.array([[pmap.scheme(l, h, stream, tier).bits_per_element(pmap.head_dim) for h in range(H)]
                             for l in range(L)])
            im = ax.imshow(bits, aspect="auto", cmap="viridis_r", vmin=2, vmax=9)  # fp16 (16) saturates
            for l in range(L):
                for h in range(H):
                    ax.text(h, l, pmap.schemes[stream][tier][l][h], ha="center", va="center", fontsize=6,
                            color="black" if bits[l, h] < 4 else "white")
            span = f" ({windows[tier]} positions)" if tier in windows else ""
            ax.set_title(f"{'K' if stream == 'key' else 'V'} {tier} scheme{span}", fontsize=8)
            ax.set_xticks(range(H), [f"head {h}" for h in range(H)])
        row[0].set_ylabel("layer")
    for ax in axes[-1]:
        ax.set_xlabel("kv head")
    fig.colorbar(im, ax=axes, label="bits / element")
    fig.suptitle(f"{pmap.summary()} — {pmap.bits_per_element(context):.3f} bits/element at context {context}", fontsize=9)
    return _save(fig, path)


def scatter_predicted_measured(rows: list[dict], path) -> Path:
    """Log-log scatter of predicted vs measured single-site KL (from bench/bound_validation.py rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for key, marker, label in (("predicted", "o", "calibration, raw"), ("predicted_corrected", "x", "calibration × c"),
                               ("predicted_hnf", "^", "HNF closed form")):
        ax.scatter([r[key] for r in rows], [r["measured_kl"] for r in rows], marker=marker, label=label, alpha=0.75, s=22)
    values = [r[k] for r in rows for k in ("measured_kl", "predicted", "predicted_hnf") if r[k] > 0]
    lo, hi = min(values) / 2, max(values) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlim(lo, hi), ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted KL per position (nats)")
    ax.set_ylabel("measured KL per position (nats)")
    ax.set_title("one site quantized at a time")
    ax.legend(fontsize=7)
    return _save(fig, path)


def quality_vs_memory(results: list[dict], path, planned_prefix: str = "plan") -> Path:
    """dPPL % (log) against bits/element: maps planned for a budget as a line (one point per distinct
    map), refined ones (``plan --refine``) as rings, maps planned for a KL target as labelled stars,
    baselines as labelled points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mine = [r for r in results if r["name"].startswith(planned_prefix)]
    others = [r for r in results if not r["name"].startswith(planned_prefix)]
    def y(r):
        return max(r["delta_ppl_pct"], 0.01)
    def distinct(rows):  # the same map planned twice (e.g. "plan 4b" and "plan @4.00b") is one point
        out, seen = [], set()
        for r in sorted(rows, key=lambda r: r["bits_per_element"]):
            key = (round(r["bits_per_element"], 3), round(r["delta_ppl_pct"], 4))
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out
    budget = distinct(r for r in mine if "kl" not in r["name"] and not r["name"].endswith("refined"))
    refined = distinct(r for r in mine if "kl" not in r["name"] and r["name"].endswith("refined"))
    if budget:
        ax.plot([r["bits_per_element"] for r in budget], [y(r) for r in budget], "o-", color="C3", ms=4,
                label="planned for a budget")
    if refined:
        ax.scatter([r["bits_per_element"] for r in refined], [y(r) for r in refined], marker="o", s=40,
                   facecolors="none", edgecolors="C1", label="planned for a budget, --refine")
    for i, r in enumerate(r for r in mine if "kl" in r["name"]):
        ax.scatter(r["bits_per_element"], y(r), marker="*", color="C3", s=60)
        ax.annotate(r["name"], (r["bits_per_element"], y(r)), fontsize=6, color="C3", xytext=(-20, 6 + 9 * i),
                    textcoords="offset points")  # stacked: target-KL maps tend to sit close together
    for r in others:
        kivi = "kivi" in r["name"]
        ax.scatter(r["bits_per_element"], y(r), marker="s" if kivi else "^", color="C0" if kivi else "C2", s=20)
        ax.annotate(r["name"], (r["bits_per_element"], y(r)), fontsize=6, xytext=(3, -8), textcoords="offset points")
    if any("kl" in r["name"] for r in mine):
        ax.scatter([], [], marker="*", color="C3", s=60, label="planned for a KL target")
    ax.scatter([], [], marker="s", color="C0", label="KIVI-style"), ax.scatter([], [], marker="^", color="C2", label="uniform")
    ax.set_yscale("log")
    ax.set_xlabel("bits / element (all stored bits, at the evaluation context)")
    ax.set_ylabel("ΔPPL % vs full-precision cache (floor 0.01)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
