"""``kvcompile`` command line: a thin layer over the Python API.

A :class:`~kvcompile.errors.KvcompileError` is printed as one line ``kvcompile: error: ...`` and
exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvcompile.errors import KvcompileError
from kvcompile.version import __version__


# ----------------------------------------------------------------------------- argument types
# Every number is range-checked before any work: a bad value is one line and exit status 2.

MAX_TOKENS = 1 << 20  # no model here reads a million positions; larger values are typos or overflow


def _int_in(lo: int, hi: int = MAX_TOKENS):
    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-")
        value = int(text) if digits.isascii() and digits.isdigit() else None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}")
        return value
    return parse


def _native_flag(p) -> None:
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="ort backend: run KVAttention with kvcompile's native library (default: when it is built; "
                        "--no-native runs the ONNX function bodies, as stock ONNX Runtime does)")


def _float_in(lo: float, hi: float, *, lo_open: bool = False):
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            bound = f"{'above' if lo_open else 'from'} {lo:g} {'up ' if lo_open else ''}to {hi:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value
    return parse


POSITIVE = _int_in(1)
NON_NEGATIVE = _int_in(0)
THREADS = _int_in(1, 1024)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (``kvcompile: error: ...``, exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_map_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="precision map JSON (from `kvcompile plan` or hand-written)")
    g.add_argument("--scheme", help="a storage scheme (uniform map) or a preset such as kivi-2; "
                   "comma-separated to compare several")
    p.add_argument("--sinks", type=NON_NEGATIVE, default=None, help="override the number of sink positions")
    p.add_argument("--recent", type=NON_NEGATIVE, default=None, help="override the recent-window length")


def _resolve_maps(args, geometry, model_name: str) -> dict:
    from kvcompile.plan.presets import resolve_map

    specs = [args.map] if args.map else [s.strip() for s in args.scheme.split(",") if s.strip()]
    maps = {}
    for spec in specs:
        pmap = resolve_map(spec, geometry, sink_tokens=args.sinks, recent_window=args.recent, model=model_name)
        label = os.path.basename(spec) if args.map else spec
        if args.sinks is not None or args.recent is not None:
            label += f" s{pmap.sink_tokens}w{pmap.recent_window}"
        maps[label] = pmap
    return maps


def _quiet_loading(quiet: bool) -> None:
    """``--quiet``: no weight-loading progress bar from transformers either."""
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_eval(args) -> int:
    from kvcompile.artifacts import atomic_write_bytes
    from kvcompile.models import load_model
    from kvcompile.measure.quality import evaluate, format_table

    _set_threads(args.threads)
    _quiet_loading(args.quiet)
    lm = load_model(args.model)
    maps = _resolve_maps(args, lm.geometry, args.model)
    if args.task == "retrieval":
        return _eval_retrieval(args, lm, maps)
    results = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.max_windows,
                       mode=args.mode, prefill_length=args.prefill, progress=not args.quiet)
    print(f"model {args.model}, text {args.text}")
    print(format_table(results))
    if args.json:
        doc = {"model": args.model, "text": args.text, "kvcompile_version": __version__,
               "results": [r.to_json() for r in results]}
        if len(results) == 1:
            doc.update(results[0].to_json())
        atomic_write_bytes(args.json, (json.dumps(doc, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _depths(text: str | None) -> list[float] | None:
    """``--depths``: comma-separated needle depths (None: the default)."""
    try:
        return [float(d) for d in text.split(",")] if text else None
    except ValueError:
        raise KvcompileError(f"--depths: expected comma-separated fractions such as 0.1,0.5,0.9, got {text!r}") from None


def _eval_retrieval(args, lm, maps) -> int:
    from kvcompile.artifacts import atomic_write_bytes
    from kvcompile.measure.retrieval import DEFAULT_DEPTHS, format_retrieval_table, retrieval

    if args.mode != "simulate" or args.prefill != 1:
        raise KvcompileError("--task retrieval scores by the exact simulation with the prompt as prefill; "
                             "drop --mode and --prefill")
    results = retrieval(lm, maps, context=args.window, depths=_depths(args.depths) or DEFAULT_DEPTHS, trials=args.trials,
                        text=args.text, progress=not args.quiet)
    print(f"model {args.model}, text {args.text}")
    print(format_retrieval_table(results))
    if args.json:
        doc = {"model": args.model, "text": args.text, "task": "retrieval", "kvcompile_version": __version__,
               "results": [r.to_json() for r in results]}
        atomic_write_bytes(args.json, (json.dumps(doc, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvcompileError(f"expected a comma-separated list of integers, got {text!r}") from None


def cmd_calibrate(args) -> int:
    from kvcompile.calibrate import calibrate
    from kvcompile.models import load_model

    _set_threads(args.threads)
    _quiet_loading(args.quiet)
    lm = load_model(args.model)
    predictors = None
    if args.predict:
        from kvcompile.calibrate.predictors import fit_predictors

        predictors = fit_predictors(lm, text=args.text, windows=args.predict_windows, window=args.window,
                                    progress=not args.quiet)
        print(f"fitted cross-layer predictors on {predictors.fit['windows']} x {args.window} tokens in "
              f"{predictors.fit['seconds']:.1f} s: {predictors.parameters / 1e6:.2f} M parameters "
              f"({predictors.parameters * 2 / 2**20:.1f} MiB in fp16, a per-model constant not counted in bits/element)")
    calib = calibrate(lm, text=args.text, windows=args.windows, window=args.window, estimator=args.estimator,
                      schemes=args.schemes.split(",") if args.schemes else None,
                      sink_options=_int_list(args.sink_options), window_options=_int_list(args.window_options),
                      samples=args.samples, correction_windows=args.correction_windows, predictors=predictors,
                      progress=not args.quiet)
    calib.save(args.output)
    print(f"calibrated {args.model} on {calib.windows} x {calib.window} tokens of {args.text} with the {calib.estimator} "
          f"estimator in {calib.seconds:.1f} s: {len(calib.schemes)} schemes x {len(calib.window_options)} windows x "
          f"{len(calib.sink_options)} sink options per site -> {args.output}")
    return 0


def cmd_retrieval_heads(args) -> int:
    from kvcompile.calibrate.retrieval_heads import probe_retrieval_heads
    from kvcompile.models import load_model

    if Path(args.output).is_dir():
        raise KvcompileError(f"-o {args.output} is a directory; expected the path of the JSON to write")
    _set_threads(args.threads)
    _quiet_loading(args.quiet)
    lm = load_model(args.model)
    heads = probe_retrieval_heads(lm, text=args.text, context=args.context, depths=_depths(args.depths),
                                  trials=args.trials, progress=not args.quiet)
    heads.save(args.output)
    top = heads.protected(args.threshold)
    print(f"probed {args.model} on {heads.cases} needle cases of {heads.context} tokens of {heads.text} in "
          f"{heads.seconds:.1f} s ({heads.retrieved} answered at full precision, {heads.events} answer tokens scored)")
    print(f"kv heads scoring >= {args.threshold}: "
          + (", ".join(f"layer {l} head {h} ({heads.scores[l][h]:.2f})" for l, h in top) or "none") + f" -> {args.output}")
    return 0


def cmd_plan(args) -> int:
    from kvcompile.calibrate import Calibration
    from kvcompile.plan.optimize import plan

    if Path(args.output).is_dir():
        raise KvcompileError(f"-o {args.output} is a directory; expected the path of the map JSON to write")
    calib = Calibration.load(args.calibration)
    protect = None
    if args.protect_heads:
        from kvcompile.calibrate.retrieval_heads import RetrievalHeads

        heads = RetrievalHeads.load(args.protect_heads)
        if heads.model != calib.model:
            raise KvcompileError(f"{args.protect_heads} scores the heads of {heads.model}; the calibration is of {calib.model}")
        protect = heads.protected(args.protect_threshold)
    options = dict(context=args.context, schemes=args.schemes.split(",") if args.schemes else None,
                   sink_options=_int_list(args.sink_options), window_options=_int_list(args.window_options),
                   corrected=not args.raw, memory=args.memory, age_tiers=args.age_tiers,
                   sink_schemes=args.sink_schemes.split(",") if args.sink_schemes else None,
                   protect=protect, protect_scheme=args.protect_scheme)
    if args.refine:
        from kvcompile.models import load_model
        from kvcompile.measure.quality import kl_meter
        from kvcompile.plan.refine import refine_budget, refine_to_target

        _set_threads(args.threads)
        lm = load_model(args.model or calib.model)
        measure = kl_meter(lm, calib.text, args.context or calib.window, args.refine_windows)
        if args.target_kl is not None:
            refined = refine_to_target(calib, args.target_kl, measure, rounds=args.rounds, **options)
            for i, r in enumerate(refined.rounds):
                print(f"round {i + 1}: planned for {r['planning_target']:.4g} -> {r['bits_per_element']:.3f} bits, "
                      f"predicted {r['predicted_kl']:.4g}, measured {r['measured_kl']:.4g}")
        else:
            refined = refine_budget(calib, args.budget_bits, measure, **options)
            for r in refined.rounds:
                tiers = f", boundaries {r['boundaries']}" if "boundaries" in r else ""
                print(f"sinks {r['sink_tokens']:>2}, window {r['recent_window']:>3}{tiers}: {r['bits_per_element']:.3f} "
                      f"bits, predicted {r['predicted_kl']:.4g}, measured {r['measured_kl']:.4g}")
        result = refined.result
    else:
        result = plan(calib, budget_bits=args.budget_bits, target_kl=args.target_kl, **options)
    result.pmap.save(args.output)
    print(result.pmap.description)
    ages = f", age tiers {list(result.pmap.age_windows)}" if result.pmap.age_windows else ""
    print(f"sinks {result.sink_tokens}, recent window {result.recent_window}{ages}; {result.pmap.summary()} -> {args.output}")
    if protect:
        print(f"protected in {args.protect_scheme} or fp16 (retrieval score >= {args.protect_threshold}): "
              + ", ".join(f"layer {l} head {h}" for l, h in protect))
    if args.refine:
        if not refined.met:
            print(f"warning: no map tried meets the target on the calibration text; the best measures "
                  f"{refined.measured_kl:.4g} ({refined.miss_factor:.2f}x the target)")
    elif args.target_kl is not None and result.predicted_cost > args.target_kl:
        print(f"warning: no calibrated map meets the target; the best predicts {result.predicted_cost:.4g} "
              f"({result.predicted_cost / args.target_kl:.2f}x the target)")
    return 0


def cmd_report(args) -> int:
    from kvcompile.report.build import build_report

    out = build_report(args.calibration, args.output, pmap_path=args.map, validation=args.validation,
                       comparison=args.comparison, context=args.context)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")
    return 0


def cmd_export(args) -> int:
    from kvcompile.models import load_model
    from kvcompile.targets import export

    _set_threads(args.threads)
    lm = load_model(args.model)
    (label, pmap), = _resolve_maps(args, lm.geometry, args.model).items()
    options = {}
    if args.target == "trt":
        options = {"max_batch": args.max_batch, "tensorrt": args.tensorrt, "plugins": args.trt_plugins,
                   "compute_capabilities": tuple(args.compute_capability) if args.compute_capability else None}
    result = export(args.target, lm, pmap, args.output, max_context=args.max_context, **options)
    size = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
    counts = result.targets["onnx"].get("kvcompile_nodes", {})
    nodes = ", ".join(f"{n} {op} nodes" for op, n in counts.items()) or "no kvcompile nodes"
    windowed = sum(bool(g.window) for g in result.groups) // 2
    if windowed:
        nodes += f", {windowed} sliding-window head groups"
    print(f"exported {args.model} with map {label} ({pmap.summary()}) to {result.path} [{args.target}]: "
          f"{nodes}, {len(result.groups)} head groups, max context {result.max_context}, {size / 2**20:.1f} MiB")
    trt = getattr(result, "trt", None)
    if trt:
        where = f" for SM {', '.join(map(str, trt['compute_capabilities']))}" if trt.get("compute_capabilities") else ""
        print(f"  TensorRT engine {result.path / trt['engine']} ({trt['tensorrt']} {trt['tensorrt_version']}{where}): "
              f"{trt['plugin_layers']} kvcompile plugin layers ({trt.get('plugins', 'python')} plugins); report in "
              "engine_report.json, log in build.log")
        if trt.get("trtexec"):
            print(f"  runs in trtexec ({result.path / trt['trtexec']}) and Triton Inference Server "
                  f"({result.path / trt['triton_repository']}, with --backend-config=tensorrt,plugins="
                  f"{result.path / trt['plugin_library']}); see docs/deploy.md")
    for context in sorted({512, result.max_context}):
        if context <= result.max_context:
            print(f"  KV cache at {context} positions: {pmap.bits_per_element(context):.2f} bits/element, "
                  f"{pmap.kv_bytes(context) / 2**20:.2f} MiB per sequence")
    return 0


def _tokenizer_for(export, backend_lm=None):
    if backend_lm is not None:
        return backend_lm.tokenizer
    if export.tokenizer_path is None:
        from kvcompile.errors import ExportError

        raise ExportError(f"{export.path} has no tokenizer/ directory; re-export the model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export.tokenizer_path)


def cmd_run(args) -> int:
    from kvcompile.export import ExportedModel
    from kvcompile.runtime import generate, open_decoder

    _set_threads(args.threads)
    prompts = []
    for p in args.prompt:
        if p.startswith("@"):
            path = Path(p[1:])
            if not path.is_file():
                raise KvcompileError(f"--prompt {p}: expected a file with one prompt per line; {path} does not exist")
            try:
                lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as e:
                raise KvcompileError(f"--prompt {p}: expected UTF-8 text, found byte 0x{e.object[e.start]:02x} at offset "
                                     f"{e.start}") from None
            if not lines:
                raise KvcompileError(f"--prompt {p}: {path} has no non-empty line; expected one prompt per line")
            prompts += lines
        elif not p.strip():
            raise KvcompileError("--prompt is empty; expected text to continue (or @FILE)")
        else:
            prompts.append(p)
    if args.prefix_cache_mb is not None and args.backend not in ("torch", "ort"):
        raise KvcompileError(f"--prefix-cache-mb runs with --backend torch or ort, not {args.backend}")
    ex = ExportedModel.load(args.directory)
    options = {"threads": args.threads, "native": args.native} if args.backend == "ort" else {}
    decoder = open_decoder(ex, args.backend, **options)
    tokenizer = _tokenizer_for(ex, getattr(decoder, "lm", None))
    eos = getattr(tokenizer, "eos_token_id", None)
    if args.prefix_cache_mb is not None:
        return _run_with_prefix_cache(args, ex, decoder, tokenizer, prompts, eos)
    for text in prompts:
        prompt = tokenizer(text).input_ids
        if isinstance(prompt[0], list):
            prompt = prompt[0]
        new: list[int] = []
        shown = ""

        def stream(token: int) -> None:
            nonlocal shown
            new.append(token)
            decoded = tokenizer.decode(new, skip_special_tokens=True)
            print(decoded[len(shown):], end="", flush=True)
            shown = decoded

        print(text, end="", flush=True)
        result = generate(decoder, prompt, args.max_new_tokens, eos_token_id=eos, on_token=stream)
        providers = ",".join(getattr(decoder, "providers", [])) or "torch"
        print(f"\n\n[{decoder.name} ({providers})] prompt {result.prompt_tokens} tokens, prefill "
              f"{1000 * result.prefill_seconds:.0f} ms; {len(result.tokens)} new tokens, decode "
              f"{result.decode_tokens_per_second:.1f} tokens/s; KV cache {result.cache_bytes / 1024:.1f} KiB")
    return 0


def _run_with_prefix_cache(args, ex, decoder, tokenizer, prompts: list[str], eos) -> int:
    from kvcompile.cache import PrefixCache
    from kvcompile.cache.prefix import generate as generate_with_prefix
    from kvcompile.cache.prefix import generate_with_decoder

    prefix = PrefixCache(ex.pmap, block_size=args.prefix_block, capacity_bytes=int(args.prefix_cache_mb * 2**20),
                         ttl_seconds=args.prefix_ttl)
    def serve(text: str) -> str:
        ids = tokenizer(text).input_ids
        ids = ids[0] if isinstance(ids[0], list) else ids
        if args.backend == "torch":
            g = generate_with_prefix(decoder.lm.model, ids, prefix, args.max_new_tokens, max_context=ex.max_context,
                                     eos_token_id=eos)
        else:  # the graph's packed past tensors are the prefix state
            g = generate_with_decoder(decoder, ids, prefix, args.max_new_tokens, eos_token_id=eos)
        return (text + tokenizer.decode(g.tokens, skip_special_tokens=True) + "\n"
                f"[{decoder.name} + prefix cache] prompt {len(ids)} tokens: {g.reused_tokens} restored, {g.computed_tokens} "
                f"computed; prefill {1000 * g.prefill_seconds:.0f} ms\n")

    # Requests share one prefix cache; with --concurrency N they are served by N threads at once
    # (answers print in prompt order).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for answer in pool.map(serve, prompts):
            print(answer)
    s = prefix.stats
    print(f"prefix cache: {s.hits}/{s.lookups} hits, {s.hit_tokens} prompt tokens reused "
          f"({s.token_hit_rate:.0%} of block-aligned tokens), {s.entries} entries, {s.bytes / 2**20:.2f} MiB of "
          f"{args.prefix_cache_mb:g} MiB, evicted {s.evicted_lru} (LRU) + {s.evicted_ttl} (TTL), rejected {s.rejected}")
    return 0


def cmd_validate(args) -> int:
    from kvcompile.export import ExportedModel
    from kvcompile.models import load_model
    from kvcompile.validate.compare import save_result, validate_export

    _set_threads(args.threads)
    _quiet_loading(args.quiet)
    ex = ExportedModel.load(args.directory)
    lm = load_model(args.against or ex.model)
    result = validate_export(ex, backend=args.backend, lm=lm, text=args.text, window=args.window, prefill=args.prefill,
                             max_windows=args.max_windows, atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine,
                             min_top1=args.min_top1, min_pass_rate=args.min_pass_rate, max_kl=args.max_kl,
                             max_cache_differing=args.max_cache_differing, progress=not args.quiet, threads=args.threads,
                             native=args.native)
    print(result.summary())
    if result.polygraphy_commands:
        print("equivalent polygraphy check of the prefill (reference outputs from torch):")
        for c in result.polygraphy_commands:
            print("  " + c)
    if args.json:
        save_result(result, args.json)
        print(f"wrote {args.json}")
    return 0 if result.passed else 1


def cmd_schemes(args) -> int:
    from kvcompile.plan.presets import PRESETS
    from kvcompile.quant import get_scheme, scheme_names

    from kvcompile.errors import SchemeError
    from kvcompile.quant.base import part_layout

    print(f"{'scheme':<12} {'bits/elt (D=' + str(args.head_dim) + ')':>18}  axis     positions/block")
    for name in scheme_names():
        s = get_scheme(name)
        try:
            part_layout(s, args.head_dim)  # quantizes one block: refuses a head dim the scheme cannot store
            bits = f"{s.bits_per_element(args.head_dim):>18.3f}"
        except SchemeError:
            bits = f"{'cannot store':>18}"
        print(f"{name:<12} {bits}  {s.axis:<8} {s.token_group}")
    print("\npresets: " + ", ".join(PRESETS))
    print("grammar: int<2|3|4|8>[-sym][-ch][-g<G>][-s32][-rot]; lm<2|3|4>[-g<G>][-rot]; <int or lm base>-o<k>; "
          "nf4[-g<G>][-nodq]; fp8; fp16")
    return 0


def cmd_texts(args) -> int:
    from kvcompile.data import manifest

    for name, e in manifest().items():
        print(f"{name:<24} {e['role']:<12} {e['bytes']:>9} bytes  {e['licence']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvcompile.data import DEFAULT_EVAL_TEXT
    from kvcompile.models import DEFAULT_MODEL

    parser = _Parser(prog="kvcompile", description="Mixed-precision KV-cache compiler for decoder LLMs.")
    parser.add_argument("--version", action="version", version=f"kvcompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="perplexity / KL / top-1 of a quantized KV cache vs the full-precision cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"built-in name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    _add_map_args(p)
    p.add_argument("--text", default=DEFAULT_EVAL_TEXT, help=f"shipped text name or a file (default {DEFAULT_EVAL_TEXT})")
    p.add_argument("--window", type=_int_in(2), default=512,
                   help="tokens per scored window, or per retrieval case with --task retrieval (default 512)")
    p.add_argument("--max-windows", type=POSITIVE, default=8, help="windows to score (default 8)")
    p.add_argument("--task", choices=("ppl", "retrieval"), default="ppl",
                   help="ppl: perplexity, KL and top-1 on text windows (default); retrieval: a pass key at several "
                        "depths of a --window-token context, accuracy against the full-precision cache")
    p.add_argument("--depths", default=None, help="retrieval: comma-separated needle depths in [0, 1] "
                                                  "(default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--trials", type=POSITIVE, default=2, help="retrieval: cases per depth (default 2)")
    p.add_argument("--mode", choices=("simulate", "decode"), default="simulate",
                   help="exact parallel simulation (default) or real token-by-token decoding through the cache")
    p.add_argument("--prefill", type=POSITIVE, default=1, help="positions prefilled at once before decoding (default 1)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    from kvcompile.calibrate.defaults import DEFAULT_SINKS, DEFAULT_WINDOWS, ESTIMATORS
    from kvcompile.data import DEFAULT_CALIBRATION_TEXT

    p = sub.add_parser("calibrate", help="measure per-site sensitivity of quality to KV quantization")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--text", default=DEFAULT_CALIBRATION_TEXT, help=f"default {DEFAULT_CALIBRATION_TEXT}")
    p.add_argument("--windows", type=POSITIVE, default=4, help="calibration windows (default 4)")
    p.add_argument("--window", type=_int_in(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="hybrid",
                   help="hybrid: exact attention change x output Fisher (default); fisher: diagonal Fisher on K/V; "
                        "attention: closed form, forward only")
    p.add_argument("--schemes", help="comma-separated candidate schemes (default: a broad set)")
    p.add_argument("--sink-options", help=f"comma-separated sink counts to consider (default {DEFAULT_SINKS})")
    p.add_argument("--window-options", help=f"comma-separated recent windows to consider (default {DEFAULT_WINDOWS})")
    p.add_argument("--samples", type=_int_in(1, 1024), default=1, help="sampled targets per window for the Fisher estimate")
    p.add_argument("--correction-windows", type=_int_in(0, 1024), default=1,
                   help="windows on which to measure each scheme's real KL to calibrate the constant c (0 = skip)")
    p.add_argument("--predict", action="store_true",
                   help="fit cross-layer predictors and cost every site as the residual of its prediction (per-token "
                        "schemes only; maps planned from it score in kvcompile eval, no export yet)")
    p.add_argument("--predict-windows", type=_int_in(1, 1024), default=8,
                   help="calibration windows the predictors are fitted on (default 8)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("plan", help="optimal precision map under a memory budget or a quality target")
    p.add_argument("calibration", help="calibration directory (from kvcompile calibrate)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget-bits", type=_float_in(0, 32, lo_open=True), help="average stored bits per K/V element at --context")
    g.add_argument("--target-kl", type=_float_in(0, 100, lo_open=True), help="predicted mean KL per position to stay under (nats)")
    p.add_argument("--context", type=POSITIVE, default=None, help="context length the bits are averaged over (default: calibration window)")
    p.add_argument("--memory", choices=["final", "allocated"], default="final",
                   help="count bits of the cache holding --context positions (final, default) or of buffers that hold "
                        "any length up to it (allocated: the window plus a waiting per-channel block at its largest)")
    p.add_argument("--schemes", help="comma-separated subset of the calibrated schemes")
    p.add_argument("--sink-options", help="subset of the calibrated sink counts")
    p.add_argument("--window-options", help="subset of the calibrated recent windows")
    p.add_argument("--raw", action="store_true", help="plan on the raw Fisher predictions, without the data-calibrated correction")
    p.add_argument("--age-tiers", type=_int_in(0, 3), default=0,
                   help="also consider up to this many recency tiers between the fp16 window and the bulk, their "
                        "boundaries from the calibrated windows, and quantized sinks (default 0: fp16 sinks, fp16 "
                        "window, bulk); a tier from distance 0 is a quantized recent window")
    p.add_argument("--sink-schemes", help="comma-separated sink formats to choose from per site (default: fp16 only; "
                                          "fp16,int8,int4 with --age-tiers)")
    p.add_argument("--refine", action="store_true",
                   help="measure candidate maps' KL on the calibration text: with --budget-bits, choose sinks and window "
                        "(with --age-tiers: the tier structure, among the 8 best predicted) by it; with --target-kl, "
                        "re-plan until the map meets the target")
    p.add_argument("--model", default=None, help="model for --refine (default: the calibrated one)")
    p.add_argument("--refine-windows", type=_int_in(1, 1024), default=2, help="calibration windows measured per round (default 2)")
    p.add_argument("--rounds", type=_int_in(1, 100), default=6, help="most maps measured by --refine --target-kl (default 6)")
    p.add_argument("--protect-heads", help="retrieval-heads JSON (from kvcompile retrieval-heads): kv heads scoring at "
                                           "least --protect-threshold store K and V in --protect-scheme or fp16")
    p.add_argument("--protect-threshold", type=_float_in(0, 1, lo_open=True), default=0.5,
                   help="least retrieval score of a protected kv head (default 0.5)")
    p.add_argument("--protect-scheme", default="int8", help="per-token format of protected heads (default int8)")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("-o", "--output", required=True, help="precision map JSON to write")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("retrieval-heads", help="score each kv head by how much the model copies through it from far back "
                                               "(needle cases on calibration text), for plan --protect-heads")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--text", default=DEFAULT_CALIBRATION_TEXT, help=f"default {DEFAULT_CALIBRATION_TEXT}")
    p.add_argument("--context", type=_int_in(64), default=2048, help="tokens per needle case (default 2048)")
    p.add_argument("--depths", default=None, help="comma-separated needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--trials", type=POSITIVE, default=2, help="cases per depth (default 2)")
    p.add_argument("--threshold", type=_float_in(0, 1, lo_open=True), default=0.5, help="score to list a head at (default 0.5)")
    p.add_argument("-o", "--output", required=True, help="retrieval-heads JSON to write")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_retrieval_heads)

    p = sub.add_parser("report", help="Markdown/HTML report with a per-layer table, heatmap and plots")
    p.add_argument("calibration", help="calibration directory")
    p.add_argument("--map", help="precision map to show (heatmap, chosen schemes)")
    p.add_argument("--validation", help="JSON from bench/bound_validation.py (predicted-vs-measured scatter)")
    p.add_argument("--comparison", help="JSON from bench/plan_vs_uniform.py or bench/quality.py (quality-vs-memory curve)")
    p.add_argument("--context", type=POSITIVE, default=None, help="context for bits/element (default: calibration window)")
    p.add_argument("-o", "--output", required=True, help="report directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export the model with a packed mixed-precision KV cache (ONNX)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _add_map_args(p)
    p.add_argument("--target", default="onnx", help="export target (default onnx)")
    p.add_argument("--max-context", type=POSITIVE, default=None,
                   help="longest prefill + generation the export accepts (default: the model's limit)")
    p.add_argument("--max-batch", type=_int_in(1, 4096), default=1, help="trt: largest batch of the engine's profile (default 1)")
    p.add_argument("--tensorrt", choices=("tensorrt", "tensorrt_rtx"), default=None,
                   help="trt: which TensorRT builds the engine (default: full TensorRT where installed, else TensorRT-RTX; "
                        "env KVCOMPILE_TENSORRT)")
    p.add_argument("--trt-plugins", choices=("compiled", "python"), default="compiled",
                   help="trt: the compiled plugin library (default: the engine loads in trtexec, Triton and C++) or the "
                        "Python plugins (a fallback: the engine runs only in a Python process)")
    p.add_argument("--compute-capability", type=int, action="append", choices=(80, 86, 89, 120, 121), default=None,
                   metavar="SM", help="trt with TensorRT-RTX: a GPU architecture to build for, repeatable (default 80, "
                                      "86, 89, 120); full TensorRT builds for the GPU it runs on")
    p.add_argument("-o", "--output", required=True, help="export directory (replaced if it is an older export)")
    p.add_argument("--threads", type=THREADS, default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="generate text with an exported model, streaming tokens")
    p.add_argument("directory", help="export directory (from kvcompile export)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for several requests (@FILE: one prompt per line of FILE)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    p.add_argument("--backend", default="ort", help="ort (ONNX Runtime, default) or torch (reference)")
    _native_flag(p)
    p.add_argument("--prefix-cache-mb", type=_float_in(0, 2**20, lo_open=True), default=None,
                   help="reuse the compressed KV cache of shared prompt prefixes across the prompts, up to this many MiB "
                        "(torch and ort backends)")
    p.add_argument("--prefix-block", type=POSITIVE, default=64, help="prefix cache granularity in tokens (default 64)")
    p.add_argument("--prefix-ttl", type=_float_in(0, 1e9, lo_open=True), default=600.0, help="seconds an unused prefix stays cached (default 600)")
    p.add_argument("--concurrency", type=_int_in(1, 256), default=1,
                   help="with --prefix-cache-mb: serve the prompts from this many threads sharing the prefix cache")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads (ONNX Runtime intra-op / torch)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="compare an export with the torch reference (polygraphy) and full precision")
    p.add_argument("directory", help="export directory")
    p.add_argument("--against", help="model to compare with (default: the exported model's source)")
    p.add_argument("--backend", default="ort")
    _native_flag(p)
    p.add_argument("--text", default=DEFAULT_EVAL_TEXT, help=f"held-out text (default {DEFAULT_EVAL_TEXT})")
    p.add_argument("--window", type=_int_in(2), default=160, help="tokens per window (default 160)")
    p.add_argument("--prefill", type=POSITIVE, default=32, help="tokens prefilled before decoding each window (default 32)")
    p.add_argument("--max-windows", type=POSITIVE, default=1, help="windows (default 1)")
    p.add_argument("--atol", type=_float_in(0, 1e6), default=0.05, help="polygraphy absolute tolerance on the median error")
    p.add_argument("--rtol", type=_float_in(0, 1e6), default=0.05, help="polygraphy relative tolerance on the median error")
    from kvcompile.validate import compare

    strict, free = compare.STRICT, compare.FREE_RUNNING
    for flag, key, lo, hi, what in (("--min-cosine", "min_cosine", -1, 1, "least logits cosine similarity per position"),
                                    ("--min-top1", "min_top1", 0, 1, "least greedy agreement with the torch reference"),
                                    ("--min-pass-rate", "min_pass_rate", 0, 1, "least fraction of steps polygraphy passes"),
                                    ("--max-kl", "max_kl", 0, 100, "most mean KL(torch reference || export) per position"),
                                    ("--max-cache-differing", "max_cache_differing", 0, 1,
                                     "most fraction of stored cache elements that differ from the reference's")):
        p.add_argument(flag, type=_float_in(lo, hi), default=None,
                       help=f"{what} (default {strict[key]:g} with the cache compared, {free[key]:g} without)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schemes", help="list storage schemes with their exact bits per element")
    p.add_argument("--head-dim", type=_int_in(1, 65536), default=64)
    p.set_defaults(func=cmd_schemes)

    p = sub.add_parser("texts", help="list the shipped calibration / evaluation texts")
    p.set_defaults(func=cmd_texts)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KvcompileError as e:
        print(f"kvcompile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
