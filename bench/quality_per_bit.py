"""Quality per bit with the full format menu: issue 16's goals at 512 and 4,096 tokens, retrieval, target KL.

    python bench/quality_per_bit.py                        # every stage: hours on 2 cores
    python bench/quality_per_bit.py --stages retrieval     # one stage; the JSON keeps the others

Stages (each writes its section of ``--out`` as soon as it ends, so a late failure loses nothing):

* ``calibrate``: the default calibration (``kvcompile calibrate``: default menu, 4 x 512 tokens,
  hybrid estimator), timed, saved to ``--calibration`` (skipped when that directory exists).
* ``short``: 512-token windows.  At 3.0 and 2.5 bits/element: the plan restricted to the menu
  before the Lloyd-Max formats (``previous menu``), the plan with the default menu (three classes:
  fp16 sinks and window, bulk) and with one age tier and quantized sinks (``--age-tiers 1``: the
  window, the tier and the sinks in 8/4-bit formats where it pays); KIVI-2 as a reference; the plain
  and refined (``plan --refine``) maps for a KL target of 0.02.  All scored on the same 16 held-out
  windows; the goals ≤ 1 % ΔPPL at ≤ 3.0 bits and ≤ 3 % at ≤ 2.5 bits are checked.
* ``long``: the same at 4,096 tokens (bits counted at 4,096; 2 held-out windows); goal ≤ 1 % at ≤ 2.5 bits.
* ``outliers``: whether dense-and-sparse formats earn a place in the default menu: one calibration
  with the default menu plus ``OUTLIER_SCHEMES`` (timed), maps planned at 3.0 and 2.5 bits (one age
  tier) with and without them, scored on the same 16 windows of 512.
* ``prerope``: whether keys stored before RoPE (``-pr``) earn a place in the default menu: one
  calibration with the default menu plus ``PRE_ROPE_SCHEMES`` (timed, saved to
  ``--prerope-calibration``), maps planned at 3.0 and 2.5 bits (one age tier) with and without
  them, each also with its tier structure chosen by measured KL (``plan --refine --age-tiers 1``,
  2 calibration windows), scored on the same 16 windows of 512.
* ``prerope_long``: from the same calibration, plain maps at 3.0 and 2.5 bits (one age tier) with
  and without the pre-RoPE formats, planned and scored at 4,096 tokens (2 held-out windows).
* ``lloyd_channel``: whether per-channel Lloyd-Max codes (``lm<b>-ch[-g<G>]``) should replace the
  uniform per-channel codes of equal bits (``int<b>-ch[-g64]``) in the default menu: one calibration
  with both (timed, saved to ``--lloyd-channel-calibration``); maps at 3.0 and 2.5 bits (one age
  tier) planned from the menu with the uniform codes (the default before), with both, and with the
  Lloyd-Max codes in their place (the default now), the last also refined; 16 windows of 512.
* ``lloyd_channel_long``: from the same calibration, the plain maps of the menus before and now at
  4,096 tokens (2 held-out windows).
* ``lloyd_channel_retrieval``: the ``retrieval`` stage's cases at 4,096 tokens for the 3-bit maps
  (one age tier) of both menus.
* ``prerope_lloyd``: keys before RoPE on the default menu's per-channel Lloyd-Max codes
  (``PRE_ROPE_LLOYD_SCHEMES``): one calibration with the default menu plus them (timed, saved to
  ``--prerope-lloyd-calibration``); plain maps at 3.0 and 2.5 bits (one age tier) with and without
  them, at 512 tokens (16 windows) and 4,096 tokens (2 windows).
* ``sketch``: whether TurboQuant's 1-bit residual sketch (``<base>-qjl``) pays for its bits: keys
  alone in ``SKETCH_KEYS`` (values fp16, no sinks or window), scored on the same 16 windows of 512.
* ``retrieval_split``: where retrieval is lost: at 4,096 tokens, the 3-bit map with one age tier
  (default menu), the same map with fp16 values (its keys alone) and with fp16 keys (its values
  alone), and the 3-bit map planned with pre-RoPE keys in the menu; the ``retrieval`` stage's cases.
* ``retrieval_heads``: does keeping the retrieval heads precise bring retrieval back?  The probe
  (``kvcompile retrieval-heads``: needle cases of 2,048 tokens of calibration text) scores each kv
  head; the 3-bit map (one age tier, default menu, from the ``lloyd_channel`` calibration) is planned
  at 4,096 tokens without protection and with the heads scoring at least 0.5 and 0.1 kept in int8
  or fp16 (``plan --protect-heads``), beside uniform int4; the ``retrieval`` stage's cases, with the
  answer's log-probability.
* ``predictors``: the cross-layer predictors fitted on calibration text (timed) and how much of each
  layer's K and V they leave on 4 held-out windows of 512 (residual / total variance).
* ``predicted``: cross-layer prediction (:mod:`kvcompile.kv.predict`, ``kvcompile calibrate --predict``):
  predictors fitted and the default menu's per-token formats calibrated on their residuals (timed,
  saved to ``--predicted-calibration``, not committed); maps at 3.0 and 2.5 bits (one age tier)
  planned from it, also refined, beside the default menu's maps of the ``lloyd_channel``
  calibration; 16 windows of 512.
* ``predicted_long``: the same plain maps planned and scored at 4,096 tokens (2 windows).
* ``predicted_retrieval``: the 3-bit maps of both at each ``--retrieval-contexts`` (the ``retrieval``
  stage's cases), and the predicted one planned with the retrieval heads scoring at least 0.5
  (``--retrieval-heads``, from ``kvcompile retrieval-heads``) in int8; contexts measured by an
  earlier run stay.  The committed 8,192-token rows:
  ``--stages predicted_retrieval --retrieval-contexts 8192 --depths 0.1,0.5,0.9``.
* ``predicted_export``: the ``predicted`` stage's plain 512-token maps (3.0 and 2.5 bits) and the
  default menu's 3-bit map exported (``kvcompile export``) and decoded token by token by ONNX Runtime
  with the native library on the first ``--export-windows`` (4) held-out windows, beside their
  simulation on the same windows; export, session and per-step seconds.
* ``predicted_export_long``: the ``predicted_long`` stage's 2.5-bit maps (predicted and not) exported
  and run by ONNX Runtime on the 2 held-out windows of 4,096: a prefill of all but the last
  ``--export-decode-steps`` (32) positions, then one decode step each, beside the simulation of the
  same protocol; prefill and per-step seconds.
* ``retrieval``: ``kvcompile eval --task retrieval`` at 4,096 and 8,192 tokens (5 depths), KIVI-2
  and the maps planned at that context; goal: accuracy equal to the full-precision cache at ≤ 3 bits.
  Contexts measured by an earlier run stay in the JSON; the committed 8,192-token row was measured
  with ``--stages retrieval --retrieval-contexts 8192 --depths 0.1,0.5,0.9 --retrieval-maps "plan 3b tiers"``
  (each simulated pass at 8,192 tokens takes minutes on 2 cores: ``seconds`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

STAGES = ("calibrate", "short", "long", "retrieval", "outliers", "prerope", "prerope_long", "sketch", "retrieval_split",
          "lloyd_channel", "lloyd_channel_long", "lloyd_channel_retrieval", "prerope_lloyd", "retrieval_heads",
          "predictors", "predicted", "predicted_long", "predicted_retrieval", "predicted_export",
          "predicted_export_long")
RETRIEVAL_THRESHOLDS = (0.5, 0.1)
SKETCH_KEYS = ["lm2-rot", "lm2-rot-qjl", "lm3-rot", "lm3-rot-qjl", "lm4-rot"]
OUTLIER_SCHEMES = ["int2-ch-o1", "int2-ch-g64-o1", "int3-ch-g64-o1", "lm2-o1", "lm2-g64-o1"]
PRE_ROPE_SCHEMES = ["int2-ch-pr", "int2-ch-g64-pr", "int3-ch-pr", "int3-ch-g64-pr"]
PRE_ROPE_LLOYD_SCHEMES = ["lm2-ch-pr", "lm2-ch-g64-pr", "lm3-ch-pr", "lm3-ch-g64-pr"]
#: per-channel Lloyd-Max codes, each the same bits as the uniform per-channel format it may replace
LLOYD_CHANNEL_SCHEMES = {"int2-ch": "lm2-ch", "int2-ch-g64": "lm2-ch-g64", "int3-ch": "lm3-ch", "int3-ch-g64": "lm3-ch-g64"}
BUDGETS = (3.0, 2.5)
TARGET_KL = 0.02
GOALS = {"short": [(3.0, 1.0), (2.5, 3.0)], "long": [(2.5, 1.0)]}  # (bits at most, ΔPPL % at most)


def previous_menu(schemes: list[str]) -> list[str]:
    """The menu before the Lloyd-Max formats: per-channel ones back to the uniform codes of equal bits."""
    uniform = {v: k for k, v in LLOYD_CHANNEL_SCHEMES.items()}
    return [uniform.get(s, s) for s in schemes if s in uniform or not s.startswith("lm")]


def planned_maps(calib, context: int, with_previous: bool) -> dict:
    from kvcompile.plan.optimize import plan

    maps = {}
    for b in BUDGETS:
        if with_previous:
            maps[f"plan {b:g}b previous menu"] = plan(calib, budget_bits=b, context=context,
                                                      schemes=previous_menu(calib.schemes)).pmap
        maps[f"plan {b:g}b"] = plan(calib, budget_bits=b, context=context).pmap
        maps[f"plan {b:g}b tiers"] = plan(calib, budget_bits=b, context=context, age_tiers=1).pmap
    return maps


def goals(results: list[dict], stage: str) -> list[dict]:
    out = []
    for bits, dppl in GOALS[stage]:
        fits = [r for r in results if r["bits_per_element"] <= bits + 1e-9 and r["name"].startswith("plan")]
        best = min(fits, key=lambda r: r["delta_ppl_pct"])
        met = best["delta_ppl_pct"] <= dppl
        out.append({"bits_at_most": bits, "delta_ppl_pct_at_most": dppl, "best_map": best["name"],
                    "bits_per_element": best["bits_per_element"], "delta_ppl_pct": best["delta_ppl_pct"], "met": met,
                    "miss_factor": None if met else best["delta_ppl_pct"] / dppl})
    return out


def quality_stage(lm, calib, args, stage: str) -> dict:
    from kvcompile.measure.quality import evaluate, format_table, kl_meter
    from kvcompile.plan.presets import resolve_map
    from kvcompile.plan.refine import refine_to_target

    window, windows = (512, args.short_windows) if stage == "short" else (args.long_context, args.long_windows)
    maps = {"kivi-2": resolve_map("kivi-2", lm.geometry), **planned_maps(calib, window, stage == "short")}
    extra = {}
    if stage == "short":
        from kvcompile.plan.optimize import plan

        maps[f"plan kl<={TARGET_KL}"] = plan(calib, target_kl=TARGET_KL, context=window).pmap
        t0 = time.perf_counter()
        refined = refine_to_target(calib, TARGET_KL, kl_meter(lm, calib.text, window, 2), context=window)
        extra["refinement_seconds"] = time.perf_counter() - t0
        maps[f"plan kl<={TARGET_KL} refined"] = refined.result.pmap
    results = evaluate(lm, maps, text=args.text, window=window, max_windows=windows, progress=False)
    print(f"\n{stage}: {window}-token windows")
    print(format_table(results))
    rows = [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement, "ppl": r.ppl, "ppl_reference": r.ppl_reference,
             "map": maps[r.name].summary(), "sink_tokens": maps[r.name].sink_tokens,
             "recent_window": maps[r.name].recent_window, "age_windows": list(maps[r.name].age_windows),
             "sink_schemes": sorted({s for st in ("key", "value") for row in maps[r.name].schemes[st]["sink"] for s in row}),
             "lloyd_max_sites": sum(s.startswith("lm") for st in ("key", "value") for c in maps[r.name].schemes[st].values()
                                    for row in c for s in row),
             "seconds": r.seconds} for r in results]
    doc = {"window": window, "windows": len(results[0].window_nll), "tokens_scored": results[0].tokens_scored,
           "results": rows, "goals": goals(rows, stage), **extra}
    if stage == "short":
        by = {r["name"]: r for r in rows}
        doc["target_kl"] = [{"map": n, "target": TARGET_KL, "held_out_kl": by[n]["kl"],
                             "ratio": by[n]["kl"] / TARGET_KL} for n in (f"plan kl<={TARGET_KL}", f"plan kl<={TARGET_KL} refined")]
    for g in doc["goals"]:
        print(f"goal <= {g['bits_at_most']} bits at dPPL <= {g['delta_ppl_pct_at_most']} %: best {g['best_map']} "
              f"{g['bits_per_element']:.3f} bits {g['delta_ppl_pct']:+.2f} % -> "
              + ("met" if g["met"] else f"missed by {g['miss_factor']:.1f}x"))
    for t in doc.get("target_kl", []):
        print(f"target KL {t['target']}: {t['map']} measures {t['held_out_kl']:.4f} on held-out text ({t['ratio']:.2f}x)")
    return doc


def outliers_stage(lm, args) -> dict:
    from kvcompile.calibrate import DEFAULT_SCHEMES, calibrate
    from kvcompile.measure.quality import evaluate, format_table
    from kvcompile.plan.optimize import plan

    t0 = time.perf_counter()
    calib = calibrate(lm, schemes=[*DEFAULT_SCHEMES, *OUTLIER_SCHEMES])
    seconds = time.perf_counter() - t0
    maps = {}
    for b in BUDGETS:
        maps[f"plan {b:g}b tiers"] = plan(calib, budget_bits=b, context=512, age_tiers=1,
                                          schemes=list(DEFAULT_SCHEMES)).pmap
        maps[f"plan {b:g}b tiers + outliers"] = plan(calib, budget_bits=b, context=512, age_tiers=1).pmap
    results = evaluate(lm, maps, text=args.text, window=512, max_windows=args.short_windows, progress=False)
    print("\noutlier formats in the menu (512-token windows)")
    print(format_table(results))
    rows = [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "outlier_sites": sum("-o" in s for st in ("key", "value") for c in maps[r.name].schemes[st].values()
                                  for row in c for s in row)} for r in results]
    return {"calibration_seconds": seconds, "schemes": calib.schemes, "results": rows}


def refined_tiers(calib, budget_bits: float, measure, schemes) -> tuple:
    """``(map, record)``: ``plan --refine --age-tiers 1`` at 512 tokens (the tier structure chosen by KL
    measured with ``measure``), and its seconds and refinement rounds."""
    from kvcompile.plan.refine import refine_budget

    t0 = time.perf_counter()
    refined = refine_budget(calib, budget_bits, measure, context=512, age_tiers=1, schemes=schemes)
    return refined.result.pmap, {"seconds": time.perf_counter() - t0, "rounds": refined.rounds}


def stage_calibration(lm, args, section: str, directory: str, extra: list[str]):
    """``(calibration, seconds, menu)`` of a stage that adds ``extra`` formats to the default menu:
    loaded from ``directory`` when it exists (its seconds from the JSON's ``section``), else made and
    saved; ``menu`` is the calibration's formats without ``extra`` (the default menu it was made
    with, so a committed calibration stays usable after the default menu changes)."""
    from kvcompile.calibrate import DEFAULT_SCHEMES, Calibration, calibrate

    if Path(directory).exists():
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        calib, seconds = Calibration.load(directory), previous.get(section, {}).get("calibration_seconds")
    else:
        t0 = time.perf_counter()
        calib = calibrate(lm, schemes=[*DEFAULT_SCHEMES, *extra])
        seconds = time.perf_counter() - t0
        calib.save(directory)
    return calib, seconds, [x for x in calib.schemes if x not in extra]


def prerope_stage(lm, args) -> dict:
    from kvcompile.measure.quality import evaluate, format_table, kl_meter
    from kvcompile.plan.optimize import plan

    calib, seconds, menu = stage_calibration(lm, args, "prerope", args.prerope_calibration, PRE_ROPE_SCHEMES)
    measure = kl_meter(lm, calib.text, 512, 2)
    maps, refinement = {}, {}
    for b in BUDGETS:
        for label, schemes in (("", menu), (" + pre-RoPE", None)):
            name = f"plan {b:g}b tiers{label}"
            maps[name] = plan(calib, budget_bits=b, context=512, age_tiers=1, schemes=schemes).pmap
            maps[f"{name} refined"], refinement[f"{name} refined"] = refined_tiers(calib, b, measure, schemes)
    results = evaluate(lm, maps, text=args.text, window=512, max_windows=args.short_windows, progress=False)
    print("\nkeys stored before RoPE in the menu (512-token windows)")
    print(format_table(results))
    rows = [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement, "sink_tokens": maps[r.name].sink_tokens,
             "recent_window": maps[r.name].recent_window, "age_windows": list(maps[r.name].age_windows),
             "pre_rope_sites": sum(s.endswith("-pr") for c in maps[r.name].schemes["key"].values()
                                   for row in c for s in row)} for r in results]
    return {"calibration_seconds": seconds, "schemes": calib.schemes, "results": rows, "refinement": refinement,
            "goals": goals(rows, "short")}


def lloyd_channel_retrieval_stage(lm, args) -> dict:
    from kvcompile.measure.retrieval import format_retrieval_table, retrieval
    from kvcompile.plan.optimize import plan

    calib, _ = lloyd_channel_calibration(lm, args)
    context, menus = 4096, lloyd_channel_menus()
    maps = {f"plan 3b tiers{label}": plan(calib, budget_bits=3.0, context=context, age_tiers=1, schemes=menus[label]).pmap
            for label in ("", " lm-ch for int-ch")}
    results = retrieval(lm, maps, context=context, depths=args.depths, trials=args.trials, text=args.text,
                        progress=False)
    print(f"\nretrieval at {context} tokens, per-channel codes")
    print(format_retrieval_table(results))
    return {"context": context, "depths": args.depths, "trials": args.trials, "results": [r.to_json() for r in results]}


def retrieval_heads_stage(lm, args) -> dict:
    from dataclasses import asdict

    from kvcompile.calibrate.retrieval_heads import probe_retrieval_heads
    from kvcompile.measure.retrieval import format_retrieval_table, retrieval
    from kvcompile.plan.optimize import plan
    from kvcompile.plan.presets import resolve_map

    heads = probe_retrieval_heads(lm, progress=False)
    print(f"retrieval-head probe: {heads.seconds:.1f} s, {heads.retrieved} of {heads.cases} cases answered; "
          f"kv heads >= {RETRIEVAL_THRESHOLDS[-1]}: {heads.protected(RETRIEVAL_THRESHOLDS[-1])}")
    calib, _ = lloyd_channel_calibration(lm, args)
    context, menu = 4096, lloyd_channel_menus()[" lm-ch for int-ch"]
    protected = {"plan 3b tiers": []} | {f"plan 3b tiers, heads >= {t:g} in int8": heads.protected(t)
                                         for t in RETRIEVAL_THRESHOLDS}
    maps = {name: plan(calib, budget_bits=3.0, context=context, age_tiers=1, schemes=menu, protect=p).pmap
            for name, p in protected.items()}
    maps["int4"] = resolve_map("int4", lm.geometry)
    results = retrieval(lm, maps, context=context, depths=args.depths, trials=args.trials, text=args.text,
                        progress=False)
    print(f"\nretrieval at {context} tokens, retrieval heads protected")
    print(format_retrieval_table(results))
    return {"context": context, "depths": args.depths, "trials": args.trials, "probe": asdict(heads),
            "results": [{**r.to_json(), "protected_heads": [list(h) for h in protected.get(r.name, [])]}
                        for r in results]}


def prerope_comparison(lm, args, calib, menu: list[str], context: int, windows: int, title: str) -> list[dict]:
    """Plain maps at 3.0 and 2.5 bits (one age tier) from ``menu`` and from the whole calibration (the
    pre-RoPE formats added), scored on ``windows`` held-out windows of ``context``: the JSON rows."""
    from kvcompile.measure.quality import evaluate, format_table
    from kvcompile.plan.optimize import plan

    maps = {}
    for b in BUDGETS:
        maps[f"plan {b:g}b tiers"] = plan(calib, budget_bits=b, context=context, age_tiers=1, schemes=menu).pmap
        maps[f"plan {b:g}b tiers + pre-RoPE"] = plan(calib, budget_bits=b, context=context, age_tiers=1).pmap
    results = evaluate(lm, maps, text=args.text, window=context, max_windows=windows, progress=False)
    print(f"\n{title}")
    print(format_table(results))
    return [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement, "sink_tokens": maps[r.name].sink_tokens,
             "recent_window": maps[r.name].recent_window, "age_windows": list(maps[r.name].age_windows),
             "pre_rope_sites": sum(s.endswith("-pr") for c in maps[r.name].schemes["key"].values()
                                   for row in c for s in row), "seconds": r.seconds} for r in results]


def prerope_long_stage(lm, args) -> dict:
    if not Path(args.prerope_calibration).exists():
        raise SystemExit(f"{args.prerope_calibration} is missing; run --stages prerope first")
    calib, _, menu = stage_calibration(lm, args, "prerope", args.prerope_calibration, PRE_ROPE_SCHEMES)
    context = args.long_context
    rows = prerope_comparison(lm, args, calib, menu, context, args.long_windows,
                              f"keys stored before RoPE in the menu ({context}-token windows)")
    return {"window": context, "windows": args.long_windows, "results": rows}


def lloyd_channel_calibration(lm, args):
    """The default menu plus the uniform per-channel formats it replaced: (calibration, seconds)."""
    from kvcompile.calibrate import Calibration, calibrate

    if Path(args.lloyd_channel_calibration).exists():
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        return Calibration.load(args.lloyd_channel_calibration), previous.get("lloyd_channel", {}).get("calibration_seconds")
    t0 = time.perf_counter()
    calib = calibrate(lm, schemes=lloyd_channel_menus()[" + lm-ch"])
    seconds = time.perf_counter() - t0
    calib.save(args.lloyd_channel_calibration)
    return calib, seconds


def lloyd_channel_menus() -> dict[str, list[str]]:
    """Row label suffix -> menu: ``""`` the menu with uniform per-channel codes (the default before
    this measurement), ``" + lm-ch"`` that plus the Lloyd-Max ones, ``" lm-ch for int-ch"`` the
    Lloyd-Max ones in their place (the default menu now)."""
    from kvcompile.calibrate import DEFAULT_SCHEMES

    uniform = {v: k for k, v in LLOYD_CHANNEL_SCHEMES.items()}
    before = [uniform.get(s, s) for s in DEFAULT_SCHEMES]
    return {"": before, " + lm-ch": [*before, *LLOYD_CHANNEL_SCHEMES.values()],
            " lm-ch for int-ch": [LLOYD_CHANNEL_SCHEMES.get(s, s) for s in before]}


def lloyd_channel_rows(maps: dict, results) -> list[dict]:
    return [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement, "sink_tokens": maps[r.name].sink_tokens,
             "recent_window": maps[r.name].recent_window, "age_windows": list(maps[r.name].age_windows),
             "lloyd_channel_sites": {stream: sum("-ch" in s and s.startswith("lm") for c in maps[r.name].schemes[stream].values()
                                                 for row in c for s in row) for stream in ("key", "value")},
             "uniform_channel_sites": {stream: sum("-ch" in s and s.startswith("int") for c in maps[r.name].schemes[stream].values()
                                                   for row in c for s in row) for stream in ("key", "value")},
             "seconds": r.seconds} for r in results]


def lloyd_channel_stage(lm, args) -> dict:
    from kvcompile.measure.quality import evaluate, format_table, kl_meter
    from kvcompile.plan.optimize import plan

    calib, seconds = lloyd_channel_calibration(lm, args)
    measure = kl_meter(lm, calib.text, 512, 2)
    maps, refinement = {}, {}
    for b in BUDGETS:
        for label, schemes in lloyd_channel_menus().items():
            maps[f"plan {b:g}b tiers{label}"] = plan(calib, budget_bits=b, context=512, age_tiers=1, schemes=schemes).pmap
        name = f"plan {b:g}b tiers lm-ch for int-ch refined"
        maps[name], refinement[name] = refined_tiers(calib, b, measure, lloyd_channel_menus()[" lm-ch for int-ch"])
    results = evaluate(lm, maps, text=args.text, window=512, max_windows=args.short_windows, progress=False)
    print("\nper-channel Lloyd-Max codes in the menu (512-token windows)")
    print(format_table(results))
    rows = lloyd_channel_rows(maps, results)
    return {"calibration_seconds": seconds, "schemes": calib.schemes, "results": rows, "refinement": refinement,
            "goals": goals(rows, "short")}


def lloyd_channel_long_stage(lm, args) -> dict:
    from kvcompile.measure.quality import evaluate, format_table
    from kvcompile.plan.optimize import plan

    calib, _ = lloyd_channel_calibration(lm, args)
    context, menus = args.long_context, lloyd_channel_menus()
    maps = {f"plan {b:g}b tiers{label}": plan(calib, budget_bits=b, context=context, age_tiers=1, schemes=menus[label]).pmap
            for b in BUDGETS for label in ("", " lm-ch for int-ch")}
    results = evaluate(lm, maps, text=args.text, window=context, max_windows=args.long_windows, progress=False)
    print(f"\nper-channel Lloyd-Max codes in the menu ({context}-token windows)")
    print(format_table(results))
    rows = lloyd_channel_rows(maps, results)
    return {"window": context, "windows": args.long_windows, "results": rows, "goals": goals(rows, "long")}

def predicted_calibration(lm, args):
    """``(calibration, record)``: the default menu calibrated with cross-layer predictors
    (``kvcompile calibrate --predict``), loaded from ``--predicted-calibration`` when it exists (its
    seconds from the JSON), else fitted, calibrated and saved (the directory is not committed: its
    predictors file is 17 MB; a run rebuilds it in about 2 minutes)."""
    from kvcompile.calibrate import Calibration, calibrate
    from kvcompile.calibrate.predictors import fit_predictors

    if Path(args.predicted_calibration).exists():
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        return Calibration.load(args.predicted_calibration), previous.get("predicted", {}).get("calibration", {})
    t0 = time.perf_counter()
    predictors = fit_predictors(lm, progress=False)
    fitted = time.perf_counter() - t0
    calib = calibrate(lm, predictors=predictors, progress=False)
    record = {"fit_seconds": fitted, "calibration_seconds": time.perf_counter() - t0 - fitted,
              "seconds": time.perf_counter() - t0, "predictor_parameters": predictors.parameters,
              "predictor_bytes_fp16": 2 * predictors.parameters, "schemes": calib.schemes}
    calib.save(args.predicted_calibration)
    return Calibration.load(args.predicted_calibration), record


def predictors_stage(lm, args) -> dict:
    """How much of each layer's K and V the fitted predictors explain on held-out text: per layer l >= 1
    and stream, ``sum (x - P)^2 / sum (x - mean x)^2`` over 4 windows of 512 (the exact layer before as
    input), and the high-rate saving ``1/2 log2`` of its inverse; and over all layers by position on one
    window of ``--long-context`` tokens (the predictors were fitted on positions 0-511)."""
    import math

    import torch
    from transformers import DynamicCache

    from kvcompile.calibrate.predictors import fit_predictors
    from kvcompile.data import load_text
    from kvcompile.measure.quality import token_windows
    from kvcompile.models.rope import layer_ropes

    t0 = time.perf_counter()
    predictors = fit_predictors(lm, progress=False)
    seconds = time.perf_counter() - t0
    g = lm.geometry
    rope = layer_ropes(lm.model, args.long_context)[0]

    def states_of(window: int, count: int) -> list:
        out = []
        with torch.no_grad():
            for ids in token_windows(lm.tokenizer, load_text(args.text), window, count):
                cache = lm.model(ids[None], use_cache=True, past_key_values=DynamicCache()).past_key_values
                out.append([(layer.keys.float(), layer.values.float()) for layer in cache.layers])
        return out

    def sums(states, l: int, s_idx: int, rows: slice):
        """(residual, total) squared sums of layer l's stream over ``rows`` of every window."""
        stream = ("key", "value")[s_idx]
        x = torch.cat([w[l][s_idx][:, :, rows] for w in states], 2)
        p = torch.cat([predictors.predict(stream, l, w[l - 1][0] if stream == "key" else w[l][0], w[l - 1][1],
                                          rope)[:, :, rows] for w in states], 2)  # each window from position 0
        return (x - p).double().pow(2).sum(), (x - x.mean(2, keepdim=True)).double().pow(2).sum()

    short = states_of(512, 4)
    fraction = [[float(a / b) for a, b in (sums(short, l, s, slice(None)) for s in (0, 1))]
                for l in range(1, g.num_layers)]
    long = states_of(args.long_context, 1)
    n = args.long_context
    by_position = {}
    for a, b in ((0, 512), (512, n // 2), (n // 2, n)):
        parts = [sums(long, l, s, slice(a, b)) for l in range(1, g.num_layers) for s in (0, 1)]
        by_position[f"{a}-{b}"] = {stream: float(sum(p[0] for p in parts[i::2]) / sum(p[1] for p in parts[i::2]))
                                   for i, stream in enumerate(("key", "value"))}
    rows = [{"layer": l, "key": f[0], "value": f[1]} for l, f in enumerate(fraction, 1)]
    print("\nresidual variance fraction of the cross-layer predictors (held-out text)")
    for r in rows:
        print(f"layer {r['layer']:2d}: K {r['key']:.3f}  V {r['value']:.3f}")
    saving = {s: 0.5 * sum(math.log2(1 / r[s]) for r in rows) / len(rows) for s in ("key", "value")}
    for span, f in by_position.items():
        print(f"positions {span} of a {n}-token window, all layers: K {f['key']:.3f}  V {f['value']:.3f}")
    return {"fit_seconds": seconds, "fit": predictors.fit, "parameters": predictors.parameters,
            "bytes_fp16": 2 * predictors.parameters, "text": args.text, "windows": 4, "window": 512,
            "per_layer": rows, "mean_high_rate_saving_bits": saving, "by_position": by_position,
            "range": {s: [min(r[s] for r in rows), max(r[s] for r in rows)] for s in ("key", "value")}}


def predicted_rows(maps: dict, results) -> list[dict]:
    return [{"name": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement, "sink_tokens": maps[r.name].sink_tokens,
             "recent_window": maps[r.name].recent_window, "age_windows": list(maps[r.name].age_windows),
             "predicted": maps[r.name].predictors is not None, "map": maps[r.name].summary(),
             "seconds": r.seconds} for r in results]


def predicted_maps(lm, args, context: int, refine: bool) -> tuple[dict, dict, dict]:
    """``(maps, refinement, calibration record)``: plans of the default menu (the lloyd-channel
    calibration) and of the predicted calibration at each budget, one age tier."""
    from kvcompile.measure.quality import kl_meter
    from kvcompile.plan.optimize import plan

    default, _ = lloyd_channel_calibration(lm, args)
    menu = lloyd_channel_menus()[" lm-ch for int-ch"]
    predicted, record = predicted_calibration(lm, args)
    maps, refinement = {}, {}
    for b in BUDGETS:
        maps[f"plan {b:g}b tiers"] = plan(default, budget_bits=b, context=context, age_tiers=1, schemes=menu).pmap
        maps[f"plan {b:g}b tiers predicted"] = plan(predicted, budget_bits=b, context=context, age_tiers=1).pmap
        if refine:
            name = f"plan {b:g}b tiers predicted refined"
            maps[name], refinement[name] = refined_tiers(predicted, b, kl_meter(lm, predicted.text, 512, 2),
                                                         predicted.schemes)
    return maps, refinement, record


def predicted_stage(lm, args) -> dict:
    from kvcompile.measure.quality import evaluate, format_table

    maps, refinement, record = predicted_maps(lm, args, 512, refine=True)
    results = evaluate(lm, maps, text=args.text, window=512, max_windows=args.short_windows, progress=False)
    print("\ncross-layer prediction (512-token windows)")
    print(format_table(results))
    rows = predicted_rows(maps, results)
    return {"calibration": record, "window": 512, "windows": args.short_windows, "results": rows,
            "refinement": refinement, "goals": goals(rows, "short")}


def predicted_long_stage(lm, args) -> dict:
    from kvcompile.measure.quality import evaluate, format_table

    context = args.long_context
    maps, _, _ = predicted_maps(lm, args, context, refine=False)
    results = evaluate(lm, maps, text=args.text, window=context, max_windows=args.long_windows, progress=False)
    print(f"\ncross-layer prediction ({context}-token windows)")
    print(format_table(results))
    rows = predicted_rows(maps, results)
    return {"window": context, "windows": args.long_windows, "results": rows, "goals": goals(rows, "long")}


def predicted_retrieval_stage(lm, args) -> dict:
    from kvcompile.calibrate.retrieval_heads import RetrievalHeads
    from kvcompile.measure.retrieval import format_retrieval_table, retrieval
    from kvcompile.plan.optimize import plan

    default, _ = lloyd_channel_calibration(lm, args)
    menu = lloyd_channel_menus()[" lm-ch for int-ch"]
    predicted, _ = predicted_calibration(lm, args)
    previous = json.loads(Path(args.out).read_text()).get("predicted_retrieval", {}) if Path(args.out).exists() else {}
    out = {k: v for k, v in previous.items() if "results" in v}  # contexts measured by an earlier run stay
    for context in args.retrieval_contexts:
        maps = {"plan 3b tiers": plan(default, budget_bits=3.0, context=context, age_tiers=1, schemes=menu).pmap,
                "plan 3b tiers predicted": plan(predicted, budget_bits=3.0, context=context, age_tiers=1).pmap,
                f"plan 3b tiers predicted, heads >= {RETRIEVAL_THRESHOLDS[0]:g} in int8": plan(
                    predicted, budget_bits=3.0, context=context, age_tiers=1,
                    protect=RetrievalHeads.load(args.retrieval_heads).protected(RETRIEVAL_THRESHOLDS[0])).pmap}
        results = retrieval(lm, maps, context=context, depths=args.depths, trials=args.trials, text=args.text,
                            progress=False)
        print(f"\nretrieval at {context} tokens, cross-layer prediction")
        print(format_retrieval_table(results))
        rows = [r.to_json() for r in results]
        best = max(rows, key=lambda r: r["accuracy"])
        out[str(context)] = {"depths": args.depths, "trials": args.trials, "results": rows, "goal": {
            "bits_at_most": 3.0, "best_map": best["name"], "accuracy": best["accuracy"],
            "accuracy_reference": best["accuracy_reference"], "met": best["accuracy"] >= best["accuracy_reference"]}}
        write_partial(args, "predicted_retrieval", out)
    return out


def predicted_export_stage(lm, args) -> dict:
    """The 512-token maps of the ``predicted`` stage (plain, not refined) and the default menu's 3-bit
    map exported (``kvcompile export``, ONNX) and decoded token by token by ONNX Runtime with the
    native library on the first ``--export-windows`` held-out windows of 512, beside the simulation of
    the same maps on the same windows (prefill 1, as every goal is measured)."""
    import tempfile

    import numpy as np
    import torch

    from kvcompile.data import load_text
    from kvcompile.export import export_onnx
    from kvcompile.measure.quality import evaluate, token_windows
    from kvcompile.runtime import open_decoder

    maps, _, _ = predicted_maps(lm, args, 512, refine=False)
    maps = {name: maps[name] for name in ("plan 3b tiers", "plan 3b tiers predicted", "plan 2.5b tiers predicted")}
    windows = token_windows(lm.tokenizer, load_text(args.text), 512, args.export_windows)
    simulated = {r.name: r for r in evaluate(lm, maps, text=args.text, window=512, max_windows=args.export_windows,
                                             progress=False)}
    with torch.no_grad():
        refs = [torch.log_softmax(lm.model(ids[None], use_cache=False).logits[0, :-1].double(), -1) for ids in windows]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pmap in maps.items():
            t0 = time.perf_counter()
            ex = export_onnx(lm, pmap, Path(tmp) / name.replace(" ", "_").replace(".", "_"), max_context=512)
            export_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            decoder = open_decoder(ex, "ort", threads=args.threads)
            session_seconds = time.perf_counter() - t0
            nll = nll_ref = kl = 0.0
            agree = count = 0
            steps = []
            for ids, ref in zip(windows, refs):
                state, out = decoder.start(1), []
                for t in range(len(ids) - 1):
                    t1 = time.perf_counter()
                    logits, state = decoder.step(ids[None, t:t + 1].numpy(), state)
                    steps.append(time.perf_counter() - t1)
                    out.append(logits[0, -1])
                logp = torch.log_softmax(torch.from_numpy(np.stack(out)).double(), -1)
                target = ids[1:, None]
                nll -= float(logp.gather(-1, target).sum())
                nll_ref -= float(ref.gather(-1, target).sum())
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
                count += len(target)
            sim = simulated[name]
            rows.append({"name": name, "predicted": pmap.predictors is not None,
                         "bits_per_element": pmap.bits_per_element(512),
                         "exported_delta_ppl_pct": float(100 * np.expm1((nll - nll_ref) / count)), "exported_kl": kl / count,
                         "exported_top1_agreement": agree / count, "simulated_delta_ppl_pct": sim.delta_ppl_pct,
                         "simulated_kl": sim.kl, "export_seconds": export_seconds, "session_seconds": session_seconds,
                         "decode_step_median_s": float(np.median(steps)), "runner": decoder.name,
                         "kvcompile_nodes": ex.targets["onnx"]["kvcompile_nodes"]})
            r = rows[-1]
            print(f"{name}: {r['bits_per_element']:.3f} bits, exported ΔPPL {r['exported_delta_ppl_pct']:+.2f} % "
                  f"(KL {r['exported_kl']:.4f}), simulated {r['simulated_delta_ppl_pct']:+.2f} % (KL {r['simulated_kl']:.4f}); "
                  f"{1e3 * r['decode_step_median_s']:.1f} ms per decode step", flush=True)
            decoder.deactivate()
    return {"window": 512, "windows": len(windows), "text": args.text, "mode": "decode token by token (prefill 1)",
            "results": rows, "goals": goals([{"name": r["name"], "bits_per_element": r["bits_per_element"],
                                              "delta_ppl_pct": r["exported_delta_ppl_pct"]} for r in rows], "short")}


def predicted_export_long_stage(lm, args) -> dict:
    """The ``predicted_long`` stage's maps at 2.5 bits (predicted and not) exported with a 4,096-position
    context and run by ONNX Runtime on ``--long-windows`` held-out windows of ``--long-context``: a prefill
    of all but the last ``--export-decode-steps`` positions, then one decode step per position, beside the
    simulation of the same protocol (``prefill_length``).  Token-by-token decoding of a whole window
    (what the goals measure) would take about an hour per window here."""
    import tempfile

    import numpy as np
    import torch

    from kvcompile.data import load_text
    from kvcompile.export import export_onnx
    from kvcompile.measure.quality import evaluate, token_windows
    from kvcompile.runtime import open_decoder

    context, steps = args.long_context, args.export_decode_steps
    prefill = context - steps
    maps, _, _ = predicted_maps(lm, args, context, refine=False)
    maps = {name: maps[name] for name in ("plan 2.5b tiers", "plan 2.5b tiers predicted")}
    windows = token_windows(lm.tokenizer, load_text(args.text), context, args.long_windows)
    simulated = {r.name: r for r in evaluate(lm, maps, text=args.text, window=context, max_windows=args.long_windows,
                                             prefill_length=prefill, progress=False)}
    with torch.no_grad():
        refs = [torch.log_softmax(lm.model(ids[None], use_cache=False).logits[0, :-1].double(), -1) for ids in windows]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pmap in maps.items():
            ex = export_onnx(lm, pmap, Path(tmp) / name.replace(" ", "_").replace(".", "_"), max_context=context)
            decoder = open_decoder(ex, "ort", threads=args.threads)
            nll = nll_ref = kl = 0.0
            count, prefill_s, step_s = 0, [], []
            for ids, ref in zip(windows, refs):
                t0 = time.perf_counter()
                logits, state = decoder.step(ids[None, :prefill].numpy(), decoder.start(1))
                prefill_s.append(time.perf_counter() - t0)
                out = [logits[0]]
                for t in range(prefill, context - 1):
                    t0 = time.perf_counter()
                    logits, state = decoder.step(ids[None, t:t + 1].numpy(), state)
                    step_s.append(time.perf_counter() - t0)
                    out.append(logits[0])
                logp = torch.log_softmax(torch.from_numpy(np.concatenate(out)).double(), -1)
                target = ids[1:, None]
                nll -= float(logp.gather(-1, target).sum())
                nll_ref -= float(ref.gather(-1, target).sum())
                kl += float((ref.exp() * (ref - logp)).sum())
                count += len(target)
            sim = simulated[name]
            rows.append({"name": name, "predicted": pmap.predictors is not None,
                         "bits_per_element": pmap.bits_per_element(context),
                         "exported_delta_ppl_pct": float(100 * np.expm1((nll - nll_ref) / count)),
                         "exported_kl": kl / count, "simulated_delta_ppl_pct": sim.delta_ppl_pct, "simulated_kl": sim.kl,
                         "prefill_median_s": float(np.median(prefill_s)), "decode_step_median_s": float(np.median(step_s)),
                         "runner": decoder.name})
            r = rows[-1]
            print(f"{name}: {r['bits_per_element']:.3f} bits, exported ΔPPL {r['exported_delta_ppl_pct']:+.2f} % "
                  f"(KL {r['exported_kl']:.4f}), simulated {r['simulated_delta_ppl_pct']:+.2f} % (KL {r['simulated_kl']:.4f}); "
                  f"prefill {r['prefill_median_s']:.1f} s, {1e3 * r['decode_step_median_s']:.0f} ms per decode step", flush=True)
            decoder.deactivate()
    return {"window": context, "windows": len(windows), "prefill": prefill, "decode_steps": steps, "text": args.text,
            "results": rows}


def prerope_lloyd_stage(lm, args) -> dict:
    calib, seconds, menu = stage_calibration(lm, args, "prerope_lloyd", args.prerope_lloyd_calibration,
                                             PRE_ROPE_LLOYD_SCHEMES)
    out = {"calibration_seconds": seconds, "schemes": calib.schemes}
    for context, windows in ((512, args.short_windows), (args.long_context, args.long_windows)):
        rows = prerope_comparison(lm, args, calib, menu, context, windows,
                                  f"keys before RoPE on per-channel Lloyd-Max codes ({context}-token windows)")
        out[str(context)] = {"window": context, "windows": windows, "results": rows,
                             "goals": goals(rows, "short" if context == 512 else "long")}
    return out


def sketch_stage(lm, args) -> dict:
    from kvcompile.kv.precision_map import PrecisionMap
    from kvcompile.measure.quality import evaluate, format_table
    from kvcompile.quant import get_scheme

    g = lm.geometry
    maps = {f"keys {k}": PrecisionMap.uniform(g.num_layers, g.num_kv_heads, g.head_dim, key=k, value="fp16")
            for k in SKETCH_KEYS}
    results = evaluate(lm, maps, text=args.text, window=512, max_windows=args.short_windows, progress=False)
    print("\nthe 1-bit residual sketch on keys (512-token windows; values fp16)")
    print(format_table(results))
    bits = {k: get_scheme(k).bits_per_element(g.head_dim) for k in SKETCH_KEYS}
    rows = [{"name": r.name, "key_scheme": r.name.removeprefix("keys "), "key_bits": bits[r.name.removeprefix("keys ")],
             "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct, "kl": r.kl,
             "top1_agreement": r.top1_agreement} for r in results]
    return {"window": 512, "windows": args.short_windows, "results": rows}


def retrieval_split_stage(lm, calib, args) -> dict:
    from dataclasses import replace

    from kvcompile.calibrate import Calibration
    from kvcompile.measure.retrieval import format_retrieval_table, retrieval
    from kvcompile.plan.optimize import plan

    context = 4096
    planned = plan(calib, budget_bits=3.0, context=context, age_tiers=1).pmap

    def with_fp16(stream):
        fp16 = {c: tuple(tuple("fp16" for _ in row) for row in grid) for c, grid in planned.schemes[stream].items()}
        return replace(planned, schemes={**planned.schemes, stream: fp16}, _resolved={})

    maps = {"plan 3b tiers": planned, "its keys, fp16 values": with_fp16("value"),
            "its values, fp16 keys": with_fp16("key"),
            "plan 3b tiers + pre-RoPE": plan(Calibration.load(args.prerope_calibration), budget_bits=3.0,
                                             context=context, age_tiers=1).pmap}
    results = retrieval(lm, maps, context=context, depths=args.depths, trials=args.trials, text=args.text,
                        progress=False)
    print(f"\nretrieval at {context} tokens: keys or values?")
    print(format_retrieval_table(results))
    return {"context": context, "depths": args.depths, "trials": args.trials, "results": [r.to_json() for r in results]}


def retrieval_stage(lm, calib, args) -> dict:
    from kvcompile.measure.retrieval import format_retrieval_table, retrieval
    from kvcompile.plan.presets import resolve_map

    previous = json.loads(Path(args.out).read_text()).get("retrieval", {}) if Path(args.out).exists() else {}
    out = {k: v for k, v in previous.items() if "results" in v}  # contexts measured by an earlier run stay
    for context in args.retrieval_contexts:
        maps = {"kivi-2": resolve_map("kivi-2", lm.geometry), **planned_maps(calib, context, False)}
        if args.retrieval_maps is not None:
            maps = {k: v for k, v in maps.items() if k in args.retrieval_maps}
        maps.update({name: resolve_map(name, lm.geometry) for name in args.retrieval_schemes})
        results = retrieval(lm, maps, context=context, depths=args.depths, trials=args.trials, text=args.text,
                            progress=False)
        print(f"\nretrieval at {context} tokens")
        print(format_retrieval_table(results))
        rows = [r.to_json() for r in results]
        kept = out.get(str(context), {})
        if kept.get("depths") == args.depths and kept.get("trials") == args.trials:  # same cases: add these rows
            rows = [r for r in kept["results"] if r["name"] not in maps] + rows
        fits = [r for r in rows if r["bits_per_element"] <= 3.0 + 1e-9 and r["name"].startswith("plan")]
        best = max(fits, key=lambda r: r["accuracy"])
        out[str(context)] = {"depths": args.depths, "trials": args.trials, "results": rows, "goal": {
            "bits_at_most": 3.0, "best_map": best["name"], "accuracy": best["accuracy"],
            "accuracy_reference": best["accuracy_reference"], "met": best["accuracy"] >= best["accuracy_reference"]}}
        write_partial(args, "retrieval", out)
    return out


def goal_line(g: dict, window: int, qualifier: str = "") -> str:
    verdict = "met" if g["met"] else f"missed by {g['miss_factor']:.1f}x"
    return (f"- goal at {window} tokens{qualifier}, ≤ {g['bits_at_most']} bits at ΔPPL ≤ {g['delta_ppl_pct_at_most']} %: "
            f"best {g['best_map']}, {g['bits_per_element']:.3f} bits, {g['delta_ppl_pct']:+.2f} %: {verdict}")


def prerope_row(r: dict) -> str:
    return (f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
            f"{r['sink_tokens']} | {r['recent_window']} + {r['age_windows']} | {r['pre_rope_sites']} |")


def readme_lines(doc: dict) -> list[str]:
    """The Markdown README.md quotes from the JSON (``tests/unit/test_docs_figures.py`` checks it is there)."""
    out = []
    for stage in ("short", "long"):
        if "results" not in doc.get(stage, {}):
            continue
        sec = doc[stage]
        out += [f"| {sec['window']} tokens | bits/elt | ΔPPL | KL | sinks | window + age tiers | Lloyd-Max entries |",
                "|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            sinks = f"{r['sink_tokens']} ({'/'.join(r['sink_schemes'])})" if r["sink_tokens"] else "0"
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
                       f"{sinks} | {r['recent_window']} + {r['age_windows']} | {r['lloyd_max_sites']} |")
        out += [goal_line(g, sec["window"]) for g in sec["goals"]]
        for t in sec.get("target_kl", []):
            out.append(f"- target KL {t['target']}: {t['map']} measures {t['held_out_kl']:.4f} on held-out text "
                       f"({t['ratio']:.2f}x the target)")
    if "results" in doc.get("outliers", {}):
        out += ["| 512 tokens, menu with outlier formats | bits/elt | ΔPPL | KL | entries in an outlier format |",
                "|---|---|---|---|---|"]
        for r in doc["outliers"]["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
                       f"{r['outlier_sites']} |")
    if "results" in doc.get("prerope", {}):
        out += ["| 512 tokens, menu with pre-RoPE keys | bits/elt | ΔPPL | KL | sinks | window + age tiers | "
                "key entries stored before RoPE |", "|---|---|---|---|---|---|---|"]
        out += [prerope_row(r) for r in doc["prerope"]["results"]]
        out += [goal_line(g, 512, " with these maps") for g in doc["prerope"].get("goals", [])]
    if "results" in doc.get("prerope_long", {}):
        sec = doc["prerope_long"]
        out += [f"| {sec['window']} tokens, menu with pre-RoPE keys | bits/elt | ΔPPL | KL | sinks | window + age tiers | "
                "key entries stored before RoPE |", "|---|---|---|---|---|---|---|"]
        out += [prerope_row(r) for r in sec["results"]]
    for stage in ("lloyd_channel", "lloyd_channel_long"):
        if "results" not in doc.get(stage, {}):
            continue
        sec = doc[stage]
        out += [f"| {sec.get('window', 512)} tokens, per-channel codes | bits/elt | ΔPPL | KL | sinks | window + age tiers | "
                "entries lm-ch K/V | entries int-ch K/V |", "|---|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            lloyd, uniform = r["lloyd_channel_sites"], r["uniform_channel_sites"]
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
                       f"{r['sink_tokens']} | {r['recent_window']} + {r['age_windows']} | {lloyd['key']}/{lloyd['value']} | "
                       f"{uniform['key']}/{uniform['value']} |")
        out += [goal_line(g, sec.get("window", 512), " with these maps") for g in sec.get("goals", [])]
    for context, sec in doc.get("prerope_lloyd", {}).items():
        if not isinstance(sec, dict) or "results" not in sec:
            continue
        out += [f"| {context} tokens, pre-RoPE per-channel Lloyd-Max keys | bits/elt | ΔPPL | KL | sinks | "
                "window + age tiers | key entries stored before RoPE |", "|---|---|---|---|---|---|---|"]
        out += [prerope_row(r) for r in sec["results"]]
    if "results" in doc.get("sketch", {}):
        out += ["| 512 tokens, keys only (values fp16) | key bits/elt | ΔPPL | KL | top-1 |", "|---|---|---|---|---|"]
        for r in doc["sketch"]["results"]:
            out.append(f"| {r['key_scheme']} | {r['key_bits']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
                       f"{r['top1_agreement']:.3f} |")
    for stage in ("retrieval_split", "lloyd_channel_retrieval"):
        if "results" not in doc.get(stage, {}):
            continue
        sec = doc[stage]
        out += [f"| {sec['context']} tokens | bits/elt | accuracy | full precision | agreement |", "|---|---|---|---|---|"]
        for r in sec["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['accuracy']:.2f} | "
                       f"{r['accuracy_reference']:.2f} | {r['agreement']:.2f} |")
    if "results" in doc.get("retrieval_heads", {}):
        sec = doc["retrieval_heads"]
        out += [f"| {sec['context']} tokens | bits/elt | protected kv heads | accuracy | full precision | "
                "answer log-prob | full precision |", "|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {len(r['protected_heads'])} | {r['accuracy']:.2f} | "
                       f"{r['accuracy_reference']:.2f} | {r['answer_logprob']:.2f} | {r['answer_logprob_reference']:.2f} |")
    for stage in ("predicted", "predicted_long"):
        if "results" not in doc.get(stage, {}):
            continue
        sec = doc[stage]
        out += [f"| {sec['window']} tokens, cross-layer prediction | bits/elt | ΔPPL | KL | top-1 | sinks | "
                "window + age tiers |", "|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} % | {r['kl']:.4f} | "
                       f"{r['top1_agreement']:.3f} | {r['sink_tokens']} | {r['recent_window']} + {r['age_windows']} |")
        out += [goal_line(g, sec["window"], " with these maps") for g in sec.get("goals", [])]
    if "results" in doc.get("predicted_export", {}):
        sec = doc["predicted_export"]
        out += [f"| exported, {sec['windows']} windows of {sec['window']} | bits/elt | ONNX Runtime ΔPPL | KL | "
                "simulated ΔPPL | KL | ms per decode step |", "|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['exported_delta_ppl_pct']:+.2f} % | "
                       f"{r['exported_kl']:.4f} | {r['simulated_delta_ppl_pct']:+.2f} % | {r['simulated_kl']:.4f} | "
                       f"{1e3 * r['decode_step_median_s']:.1f} |")
        out += [goal_line(g, sec["window"], ", exported") for g in sec.get("goals", [])]
    if "results" in doc.get("predicted_export_long", {}):
        sec = doc["predicted_export_long"]
        out += [f"| exported, {sec['windows']} windows of {sec['window']}, prefill {sec['prefill']} | bits/elt | "
                "ONNX Runtime ΔPPL | KL | simulated ΔPPL | KL | prefill s | ms per decode step |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sec["results"]:
            out.append(f"| {r['name']} | {r['bits_per_element']:.3f} | {r['exported_delta_ppl_pct']:+.2f} % | "
                       f"{r['exported_kl']:.4f} | {r['simulated_delta_ppl_pct']:+.2f} % | {r['simulated_kl']:.4f} | "
                       f"{r['prefill_median_s']:.1f} | {1e3 * r['decode_step_median_s']:.0f} |")
    if doc.get("predicted_retrieval") and "error" not in doc["predicted_retrieval"]:
        out += ["| context, cross-layer prediction | map | bits/elt | accuracy | full precision | answer log-prob | "
                "full precision |", "|---|---|---|---|---|---|---|"]
        for context, sec in doc["predicted_retrieval"].items():
            for r in sec["results"]:
                out.append(f"| {context} | {r['name']} | {r['bits_per_element']:.3f} | {r['accuracy']:.2f} | "
                           f"{r['accuracy_reference']:.2f} | {r['answer_logprob']:.2f} | {r['answer_logprob_reference']:.2f} |")
        for context, sec in doc["predicted_retrieval"].items():
            g = sec["goal"]
            out.append(f"- retrieval goal at {context} tokens with these maps, ≤ 3 bits: best {g['best_map']}, accuracy "
                       f"{g['accuracy']:.2f} against {g['accuracy_reference']:.2f} at full precision: "
                       f"{'met' if g['met'] else 'missed'}")
    if doc.get("retrieval") and "error" not in doc["retrieval"]:
        out += ["| context | map | bits/elt | accuracy | full precision | agreement |", "|---|---|---|---|---|---|"]
        for context, sec in doc["retrieval"].items():
            for r in sec["results"]:
                out.append(f"| {context} | {r['name']} | {r['bits_per_element']:.3f} | {r['accuracy']:.2f} | "
                           f"{r['accuracy_reference']:.2f} | {r['agreement']:.2f} |")
        for context, sec in doc["retrieval"].items():
            g = sec["goal"]
            out.append(f"- retrieval goal at {context} tokens, ≤ 3 bits: best {g['best_map']}, accuracy {g['accuracy']:.2f} "
                       f"against {g['accuracy_reference']:.2f} at full precision: {'met' if g['met'] else 'missed'}")
    return out


def write_partial(args, stage: str, section) -> None:
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[stage] = section
    doc["environment"] = environment(args.threads)
    write_json(path, doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--calibration", default="bench/results/quality-per-bit-calibration")
    ap.add_argument("--prerope-calibration", default="bench/results/quality-per-bit-prerope-calibration")
    ap.add_argument("--lloyd-channel-calibration", default="bench/results/quality-per-bit-lloyd-channel-calibration")
    ap.add_argument("--prerope-lloyd-calibration", default="bench/results/quality-per-bit-prerope-lloyd-calibration")
    ap.add_argument("--predicted-calibration", default="bench/results/quality-per-bit-predicted-calibration")
    ap.add_argument("--retrieval-heads", default="bench/results/smollm2-retrieval-heads.json",
                    help="the predicted_retrieval stage's protected heads (kvcompile retrieval-heads)")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--short-windows", type=int, default=16)
    ap.add_argument("--long-context", type=int, default=4096)
    ap.add_argument("--long-windows", type=int, default=2)
    ap.add_argument("--export-windows", type=int, default=4,
                    help="held-out windows of 512 the predicted_export stage decodes token by token")
    ap.add_argument("--export-decode-steps", type=int, default=32,
                    help="decode steps after the prefill in predicted_export_long")
    ap.add_argument("--retrieval-contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    ap.add_argument("--trials", type=int, default=1, help="retrieval cases per depth")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="retrieval needle depths")
    ap.add_argument("--retrieval-maps", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="only these of kivi-2 and the planned maps (a simulated pass at 8,192 tokens takes minutes)")
    ap.add_argument("--retrieval-schemes", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="also these uniform schemes or presets (e.g. int8,kivi-4): where does retrieval come back?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/quality_per_bit.json")
    args = ap.parse_args()
    setup(args.threads)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; expected some of {', '.join(STAGES)}")

    from kvcompile.calibrate import Calibration, calibrate
    from kvcompile.models import load_model

    lm = load_model(args.model)
    if "calibrate" in stages or not Path(args.calibration).exists():
        t0 = time.perf_counter()
        calib = calibrate(lm)
        seconds = time.perf_counter() - t0
        calib.save(args.calibration)
        print(f"calibration: {seconds:.1f} s for {len(calib.schemes)} schemes on {calib.windows} x {calib.window} tokens")
        write_partial(args, "calibrate", {"seconds": seconds, "schemes": calib.schemes, "windows": calib.windows,
                                          "window": calib.window, "estimator": calib.estimator,
                                          "directory": args.calibration})
    calib = Calibration.load(args.calibration)
    failed = []
    with_calibration = {"short": lambda: quality_stage(lm, calib, args, "short"),
                        "long": lambda: quality_stage(lm, calib, args, "long"),
                        "retrieval": lambda: retrieval_stage(lm, calib, args),
                        "retrieval_split": lambda: retrieval_split_stage(lm, calib, args)}
    own_calibration = {"outliers": outliers_stage, "prerope": prerope_stage, "prerope_long": prerope_long_stage,
                       "lloyd_channel": lloyd_channel_stage, "lloyd_channel_long": lloyd_channel_long_stage,
                       "lloyd_channel_retrieval": lloyd_channel_retrieval_stage,
                       "prerope_lloyd": prerope_lloyd_stage, "sketch": sketch_stage,
                       "retrieval_heads": retrieval_heads_stage, "predictors": predictors_stage, "predicted": predicted_stage,
                       "predicted_long": predicted_long_stage, "predicted_retrieval": predicted_retrieval_stage,
                       "predicted_export": predicted_export_stage, "predicted_export_long": predicted_export_long_stage}
    for stage in stages:
        if stage == "calibrate":
            continue
        try:
            section = with_calibration[stage]() if stage in with_calibration else own_calibration[stage](lm, args)
            write_partial(args, stage, section)
        except Exception:  # keep the other stages' results; the error goes into the JSON
            traceback.print_exc()
            failed.append(stage)
            write_partial(args, stage, {"error": traceback.format_exc(limit=3)})
    print("\n".join(readme_lines(json.loads(Path(args.out).read_text()))))
    print(f"wrote {args.out}" + (f"; failed stages: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
