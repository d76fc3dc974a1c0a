"""Outside peers beside kvcompile's maps: transformers' QuantizedCache (optimum-quanto, HQQ), same windows.

    python bench/peers.py [--windows 2] [--window 512] [--calibration DIR] [--out bench/results/peers.json]
    python bench/peers.py --smoke        (1 window of 48 tokens, one peer per backend, no planned maps: a test)
    python bench/peers.py --calibration DIR --schemes A,B --age-tiers 1 --out bench/results/peers_default_menu.json
                                         (the planned maps from a menu, with age tiers)

Needs the optional peers (``pip install "kvcompile[peers]"``: optimum-quanto, hqq; install.sh installs them).

Protocol, the same for every configuration: consecutive held-out windows of ``--text`` (default
wikipedia-heldout), each decoded from an empty cache one token at a time (prefill 1), the logits
at every position scored against the full-precision model on the same tokens: PPL, dPPL %, KL,
top-1 agreement (kvcompile/measure/quality.py).

* Peers: ``transformers.QuantizedCache(backend, nbits in {4, 2}, q_group_size=64)`` with the
  library's defaults (axis 0, ``residual_length=128``) and with ``residual_length=32`` (KIVI's
  window) at each backend's two axis choices (quanto: 0 or -1; HQQ: 0 or 1; keys and values
  alike), decoded token by token.  It keeps up to ``residual_length`` newest positions unquantized
  and, when they fill, re-quantizes the whole cache from its de-quantized values.
* kvcompile: uniform and KIVI-style maps, and (unless --smoke) maps planned by kvcompile at each
  peer's bits/element, scored by the exact simulation of the same token-by-token decoding (equal to
  decoding through MixedPrecisionCache within float rounding: tests/integration/test_simulation.py).

Bits per element count every stored bit at the end of a window, averaged over windows: for a peer,
``nbits`` per quantized element plus a scale and a zero point per group of 64 at 16 bits (what an
fp16 deployment stores; the float32 model here keeps them in float32), and 16 bits per residual
element; for a map, ``PrecisionMap.bits_per_element(window)`` (codes, scales, zero points, padding,
fp16 sinks and window).  The issue's goal is checked per planned map: its dPPL against half the
dPPL of the best peer with at least as many bits.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

# (backend, bits, axis for keys and values, residual length): the library's defaults (axis 0,
# residual 128), and a residual of 32 (KIVI's window) with each backend's two axis choices
PEERS = [(backend, bits, axis, residual)
         for backend, other_axis in (("quanto", -1), ("hqq", 1))
         for residual, axes in ((128, (0,)), (32, (0, other_axis)))
         for axis in axes for bits in (4, 2)]
GROUP = 64
BASELINES = ["int4-g64", "int2-g64", "kivi-4", "kivi-2"]


def peer_bits(cache, nbits: int) -> float:
    """Stored bits per K/V element of a QuantizedCache (16-bit parameters and residual)."""
    total = bits = 0.0
    for layer in cache.layers:
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        quantized = layer.cumulative_length - residual
        total += 2 * layer.cumulative_length
        bits += 2 * (quantized * (nbits + 2 * 16 / GROUP) + residual * 16)
    return bits / total


@torch.no_grad()
def peer_logits(model, ids: torch.Tensor, backend: str, nbits: int, axis: int,
                residual: int) -> tuple[torch.Tensor, float]:
    """Token-by-token logits [T, vocab] of one window through a QuantizedCache, and its bits/element."""
    from transformers import QuantizedCache

    cache = QuantizedCache(backend=backend, config=model.config, nbits=nbits, axis_key=axis, axis_value=axis,
                           q_group_size=GROUP, residual_length=residual)
    outs = [model(ids[None, i:i + 1], past_key_values=cache, use_cache=True).logits[0] for i in range(len(ids))]
    return torch.cat(outs, 0), peer_bits(cache, nbits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="wikipedia-heldout")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="windows (default 2: each peer decodes token by token, ~1 min per window here)")
    ap.add_argument("--calibration", help="a calibration directory for the planned maps (default: calibrate now)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true",
                    help="1 window of 48 tokens, one peer per backend, no planned maps (tests this script)")
    ap.add_argument("--schemes", help="the planned maps' menu: comma-separated calibrated schemes (default: all)")
    ap.add_argument("--age-tiers", type=int, default=0, help="plan the maps with up to this many age tiers (default 0)")
    ap.add_argument("--out", default="bench/results/peers.json")
    args = ap.parse_args()
    setup(args.threads)
    if args.smoke:
        args.window, args.windows = 48, 1
    import warnings

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    from kvcompile.data import load_text
    from kvcompile.measure.quality import QualityResult, _Scores, evaluate, format_table, token_windows
    from kvcompile.models import load_model
    from kvcompile.plan.presets import resolve_map

    lm = load_model(args.model)
    g = lm.geometry
    windows = token_windows(lm.tokenizer, load_text(args.text), args.window, args.windows)
    rows: list[QualityResult] = []
    with torch.no_grad():
        references = [lm.model(ids[None], use_cache=False).logits[0] for ids in windows]
    smoke_peers = [p for p in PEERS if p[1] == 4 and p[2] == 0 and p[3] == 128]  # one per backend
    refused = []  # settings a backend rejects, or fails on, for this model's shapes
    for backend, nbits, axis, residual in smoke_peers if args.smoke else PEERS:
        name = f"{backend} int{nbits} axis {axis} r{residual}"
        scores, bits, t0 = _Scores(), [], time.perf_counter()
        try:
            for ids, ref in zip(windows, references):
                logits, b = peer_logits(lm.model, ids, backend, nbits, axis, residual)
                scores.add(logits[:-1], ref[:-1], ids[1:])
                bits.append(b)
        except (ValueError, RuntimeError) as e:  # a setting the backend cannot apply to these shapes
            refused.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            print(f"{name}: refused by {backend}: {refused[-1]['error']}", flush=True)
            continue
        rows.append(QualityResult(
            name=name, description=f"transformers QuantizedCache backend={backend} nbits={nbits} axis_key={axis} "
                                   f"axis_value={axis} q_group_size={GROUP} residual_length={residual}",
            ppl=math.exp(scores.nll / scores.count), ppl_reference=math.exp(scores.nll_ref / scores.count),
            kl=scores.kl / scores.count, top1_agreement=scores.agree / scores.count,
            bits_per_element=sum(bits) / len(bits),
            kv_bytes=sum(bits) / len(bits) / 8 * 2 * g.num_layers * g.num_kv_heads * g.head_dim * args.window,
            tokens_scored=scores.count, windows=len(windows), window=args.window, mode="decode (peer)",
            seconds=time.perf_counter() - t0, window_nll=scores.window_nll, window_nll_reference=scores.window_nll_ref))
        print(f"{name}: dPPL {rows[-1].delta_ppl_pct:+.2f} % at {rows[-1].bits_per_element:.2f} bits", flush=True)
    maps = {name: resolve_map(name, g) for name in BASELINES}
    planned = {}
    if not args.smoke:
        from kvcompile.calibrate import Calibration, calibrate
        from kvcompile.plan.optimize import plan

        if args.calibration:
            calib = Calibration.load(args.calibration)
        else:
            t0 = time.perf_counter()
            calib = calibrate(lm, windows=4)
            print(f"calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        schemes = args.schemes.split(",") if args.schemes else None
        for bits in sorted({round(peer.bits_per_element, 4) for peer in rows}):  # the peers' memory, once each
            planned[f"planned @ {bits:.2f} bits"] = plan(calib, budget_bits=bits, context=args.window, schemes=schemes,
                                                         age_tiers=args.age_tiers).pmap
        maps.update(planned)
    ours = evaluate(lm, maps, text=args.text, window=args.window, max_windows=args.windows, mode="simulate",
                    progress=False)
    results = rows + ours
    print(format_table(results))
    goals = []
    for r in (o for o in ours if o.name in planned):
        peers = [p for p in rows if p.bits_per_element >= r.bits_per_element - 1e-9]
        best = min(peers, key=lambda p: p.delta_ppl_pct) if peers else None
        goals.append({"map": r.name, "bits_per_element": r.bits_per_element, "delta_ppl_pct": r.delta_ppl_pct,
                      "best_peer": best.name if best else None,
                      "best_peer_delta_ppl_pct": best.delta_ppl_pct if best else None,
                      "met": bool(best) and r.delta_ppl_pct <= 0.5 * best.delta_ppl_pct})
        if best:
            print(f"{r.name}: dPPL {r.delta_ppl_pct:+.2f} % vs best peer with >= bits {best.name} "
                  f"{best.delta_ppl_pct:+.2f} %: goal (<= half) {'met' if goals[-1]['met'] else 'missed'}")
    if args.smoke and args.out == ap.get_default("out"):  # a smoke run never replaces the committed results
        import tempfile

        args.out = str(Path(tempfile.gettempdir()) / "peers.smoke.json")
    write_json(args.out,
               {"benchmark": "peers", "model": args.model, "text": args.text, "window": args.window,
                "windows": len(windows), "peer_settings": {"q_group_size": GROUP},
                "calibration": args.calibration, "schemes": args.schemes, "age_tiers": args.age_tiers,
                "environment": environment(args.threads), "results": [r.to_json() for r in results], "goals": goals,
                "refused": refused})
    return 0


if __name__ == "__main__":
    sys.exit(main())
