"""Where `kvcompile validate` draws the line: its noise floor, faithful exports, and injected faults.

    python bench/validate_faults.py [--windows 2] [--out bench/results/validate_faults.json]

On held-out windows of `validate`'s protocol (160 tokens: a 32-token prefill, then 128 decode steps),
it measures how closely one decoder follows the torch reference (MixedPrecisionCache with the same
map), with the statistics `validate` thresholds (kvcompile.validate.compare.agreement on the logits, and
for ONNX Runtime the packed cache compared with the reference's after every step:
compare.lockstep):

* noise floor: the torch reference against itself with 1 thread instead of 2 (the same map; the
  two differ only by float rounding, which flips low-bit codes now and then);
* faithful exports through ONNX Runtime (fp16, int8, KIVI-2, the per-head mixed map below, and the
  3-bit plan of the default menu with one age tier, bench/results/smollm2-plan-3b-tiers-lm-ch.json,
  which stores the newest positions at 2-4 bits);
* faults (kvcompile.validate.faults) in the export of the mixed map: a window one position short,
  a dropped sink, kv heads 0 and 1 swapped, every integer scale read 5 % (and 1 %) too large.

``--predicted MAP`` (a map with cross-layer predictors, e.g. bench/results/smollm2-plan-3b-tiers-predicted.json)
instead measures its faithful export and the ``wrong_predictors`` fault (every predictor weight 1 %
too large in the graph), written to bench/results/validate_predicted.json; ``kl_same_cache`` is the
KL over the positions whose step stored the reference's codes, which validate bounds for such maps.

The mixed map is kvcompile.validate.faults.probe_map: KIVI-2 (per-channel 2-bit keys, per-token
2-bit values, groups of 32) with an fp16 window of 32 and 4 fp16 sinks, except kv head 1 of every
layer, which is KIVI-4.
The cosine statistic is validate's: over the positions whose step stored the codes the reference stored
(``min_cosine``; over all positions: ``min_cosine_all``; their share: ``same_cache``).
Prints a table (per case, the worst window) and writes JSON with every window.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


class Threads:
    """A decoder whose steps run with ``threads`` torch threads."""

    def __init__(self, decoder, threads: int):
        self.decoder, self.threads = decoder, threads

    def start(self, batch):
        return self.decoder.start(batch)

    def step(self, ids, state):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.decoder.step(ids, state)
        finally:
            torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=160)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--predicted", metavar="MAP",
                    help="instead: a map with cross-layer predictors, its faithful export and the wrong_predictors "
                         "fault (predictor weights 1 %% too large), to --out (default bench/results/validate_predicted.json)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or f"bench/results/validate_{'predicted' if args.predicted else 'faults'}.json"
    setup(args.threads)

    from kvcompile.data import load_text
    from kvcompile.export import export_onnx
    from kvcompile.kv.precision_map import PrecisionMap
    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map
    from kvcompile.runtime import open_decoder
    from kvcompile.validate import compare, faults
    from kvcompile.measure.quality import token_windows

    lm = load_model(args.model)
    windows = token_windows(lm.tokenizer, load_text(args.text), args.window, args.windows).numpy()
    if args.predicted:
        pmap = PrecisionMap.load(args.predicted)
        tmp = Path(tempfile.mkdtemp(prefix="validate-predicted-"))
        faithful = export_onnx(lm, pmap, tmp / "faithful", max_context=args.window)
        with faults.wrong_predictors(1.01):
            faulty = export_onnx(lm, pmap, tmp / "wrong_predictors", max_context=args.window)
        label = Path(args.predicted).stem
        cases = [(f"{label}: ONNX Runtime export", "faithful", faithful, open_decoder(faithful, "ort", threads=args.threads)),
                 (f"{label}: wrong_predictors x1.01", "fault", faulty, open_decoder(faulty, "ort", threads=args.threads))]
        return run_cases(args, lm, windows, cases)
    maps = {"fp16": resolve_map("fp16", lm.geometry), "int8": resolve_map("int8", lm.geometry),
            "kivi-2": resolve_map("kivi-2", lm.geometry), "mixed": faults.probe_map(lm.geometry),
            "3-bit plan": PrecisionMap.load(Path(__file__).resolve().parent / "results" / "smollm2-plan-3b-tiers-lm-ch.json")}
    tmp = Path(tempfile.mkdtemp(prefix="validate-faults-"))
    exports = {name: export_onnx(lm, pmap, tmp / name, max_context=args.window) for name, pmap in maps.items()}
    for factor in (1.01, 1.05):
        with faults.wrong_scale_lowering(factor):
            exports[f"wrong_scale {factor}"] = export_onnx(lm, maps["mixed"], tmp / f"scale{factor}", max_context=args.window)

    # (case, kind, map the reference decodes with, decoder under test)
    cases = []
    for name in ("kivi-2", "mixed"):
        ref = open_decoder(exports[name], "torch", lm=lm)
        cases.append((f"{name}: torch, 1 thread", "noise floor", exports[name], Threads(ref, 1)))
    for name, ex in exports.items():
        if not name.startswith("wrong_scale"):
            cases.append((f"{name}: ONNX Runtime export", "faithful", ex, open_decoder(ex, "ort", threads=args.threads)))
    mixed_ort = open_decoder(exports["mixed"], "ort", threads=args.threads)
    for fault in faults.MAP_FAULTS:
        claimed = replace(exports["mixed"], pmap=faults.claimed_map(maps["mixed"], fault))
        cases.append((f"mixed: {fault}", "fault", claimed, mixed_ort))
    for name, ex in exports.items():
        if name.startswith("wrong_scale"):
            # the fault is in the ONNX lowering, which only the function bodies run (native=False)
            cases.append((f"mixed: {name.replace(' ', ' x')}", "fault", ex,
                          open_decoder(ex, "ort", threads=args.threads, native=False)))

    run_cases(args, lm, windows, cases)


def run_cases(args, lm, windows, cases) -> None:
    """Each case's decoder against the torch reference of its claimed export, in lockstep; table and JSON."""
    from kvcompile.runtime import open_decoder
    from kvcompile.validate import compare

    rows = []
    print(f"model {args.model}, {len(windows)} windows of {args.window} ({args.prefill} prefill + "
          f"{args.window - args.prefill} decode steps); worst window per case")
    print(f"{'case':<44} {'kind':<12} {'pass rate':>9} {'KL':>9} {'KL same':>9} {'top-1':>6} {'min cos':>8} {'median|e|':>9} "
          f"{'cache: shape':>12} {'differ %':>9} {'cos, all':>8} {'same %':>7}")
    for label, kind, claimed, decoder in cases:
        reference = open_decoder(claimed, "torch", lm=lm)
        per_window = []
        for ids in windows:
            logits, ref_logits, state = compare.lockstep(decoder, reference, ids, args.prefill, claimed.pmap)
            checked = state["compared"] > 0 or state["mismatched"] > 0
            stats = compare.agreement([logits], [ref_logits], args.prefill,
                                      same_cache=[state["same_cache"]] if checked else None)
            per_window.append({**stats, "cache_checked": checked, "cache_mismatched": state["mismatched"],
                               "cache_differing": state["differing"] / max(state["compared"], 1),
                               "same_cache": stats["rows_same_cache"] / stats["rows"]})
        worst = {"pass_rate": min(w["pass_rate"] for w in per_window), "kl": max(w["kl"] for w in per_window),
                 "kl_same_cache": max(w["kl_same_cache"] for w in per_window),
                 "top1_same_cache": min(w["top1_same_cache"] for w in per_window),
                 "top1": min(w["top1"] for w in per_window), "min_cosine": min(w["min_cosine"] for w in per_window),
                 "min_cosine_all": min(w["min_cosine_all"] for w in per_window),
                 "same_cache": min(w["same_cache"] for w in per_window),
                 "median_abs_error": max(w["median_abs_error"] for w in per_window),
                 "cache_checked": per_window[0]["cache_checked"],
                 "cache_mismatched": max(w["cache_mismatched"] for w in per_window),
                 "cache_differing": max(w["cache_differing"] for w in per_window)}
        rows.append({"case": label, "kind": kind, "worst": worst, "windows": per_window})
        cache = (f"{worst['cache_mismatched']:>12} {100 * worst['cache_differing']:>9.4f} "
                 f"{worst['min_cosine_all']:>8.5f} {100 * worst['same_cache']:>7.1f}" if worst["cache_checked"]
                 else f"{'n/a':>12} {'n/a':>9} {'n/a':>8} {'n/a':>7}")
        print(f"{label:<44} {kind:<12} {worst['pass_rate']:>9.3f} {worst['kl']:>9.2e} {worst['kl_same_cache']:>9.2e} "
              f"{worst['top1']:>6.3f} "
              f"{worst['min_cosine']:>8.5f} {worst['median_abs_error']:>9.4f} {cache}", flush=True)
    write_json(args.out, {"benchmark": "validate_faults", "environment": environment(args.threads), "model": args.model,
                          "text": args.text, "window": args.window, "prefill": args.prefill, "windows": len(windows),
                          "results": rows})


def predicted_table_lines(doc: dict) -> list[str]:
    """docs/export.md's rows of the ``--predicted`` run (tests/unit/test_docs_figures.py checks them)."""
    out = []
    for r in doc["results"]:
        w = r["worst"]
        judged = (f"{w['kl_same_cache']:.1e} | {w['top1_same_cache']:.3f}" if w["same_cache"] > 0
                  else "none judged | none judged")
        out.append(f"| {r['case']} | {r['kind']} | {100 * w['pass_rate']:.1f} % | {w['kl']:.1e} | {judged} | "
                   f"{100 * w['cache_differing']:.2f} % | {100 * w['same_cache']:.1f} % |")
    return out


if __name__ == "__main__":
    main()
