"""Do Lloyd-Max codebooks calibrated per layer or per (layer, kv head, K/V) beat the Gaussian one?

    python bench/codebooks.py            # ~10 min on 2 cores

KVQuant (arXiv 2401.18079, sec. 3.4) fits a non-uniform codebook per layer on calibration data.
kvcompile's Lloyd-Max formats (``kvcompile.quant.lloyd``) use one codebook per (bits, group size,
normalization): the Lloyd-Max quantizer of normalized Gaussian groups.  This bench measures what
calibration would add.  Keys and values of SmolLM2-135M are captured on the calibration text
(fit) and on held-out text (score), 4 windows of 512 tokens each.  For each format, codebooks are
fitted on the calibration data's normalized coordinates ``y`` (exactly those the format quantizes,
``LloydMaxScheme.normalized``) by Lloyd's iteration weighted by the squared scale (so it minimizes
the stored error, not the normalized one), with all ``2^b`` levels free (not mirrored): the most
favourable case for calibration.  Sources: ``gaussian`` (the format's own codebook), ``global``
(one fit over all layers), ``layer`` (one per layer, K and V apart), ``site`` (one per layer,
kv head and K/V).  Each is scored by the held-out mean squared error of the real round trip
(the format's reference with the codebook swapped), relative to ``gaussian``.  The uniform
per-channel formats of equal bits (``int<b>-ch[-g64]``) are scored beside the per-channel ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

#: format -> the uniform format of equal bits it is compared with (None: none)
FORMATS = {"lm2-rot": None, "lm3-rot": None, "lm2-ch": "int2-ch", "lm3-ch-g64": "int3-ch-g64"}
SOURCES = ("gaussian", "global", "layer", "site")


def capture(lm, text: str, windows: int, window: int) -> dict[str, list[torch.Tensor]]:
    """Keys and values as the cache stores them (after RoPE): ``{"key": [L x [W, H, T, D]], "value": ...}``."""
    from transformers import DynamicCache

    from kvcompile.data import load_text
    from kvcompile.measure.quality import token_windows

    ids = token_windows(lm.tokenizer, load_text(text), window, windows)
    cache = DynamicCache()
    with torch.no_grad():
        lm.model(ids, past_key_values=cache, use_cache=True)
    return {"key": [layer.keys.float() for layer in cache.layers],
            "value": [layer.values.float() for layer in cache.layers]}


def fit_levels(y: torch.Tensor, weight: torch.Tensor, bits: int, iterations: int = 60) -> torch.Tensor:
    """``2^bits`` ascending levels minimizing ``sum weight * (y - level)^2`` (weighted Lloyd, float64)."""
    y, weight = y.reshape(-1).double(), weight.reshape(-1).double()
    n = 2 ** bits
    order = torch.argsort(y)
    levels = y[order][((torch.arange(n) + 0.5) / n * len(y)).long()]  # start at quantiles
    for _ in range(iterations):
        cells = torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, cells, weight)
        moment = torch.zeros(n, dtype=torch.float64).index_add_(0, cells, weight * y)
        levels = torch.where(mass > 0, moment / mass.clamp(min=1e-300), levels)
    return levels.sort().values.float()


def normalized_with_weight(scheme, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, scale^2)`` of every element of ``x`` under ``scheme`` (flattened)."""
    y, params = scheme.normalized(x)
    return y.reshape(-1), (params["scale"].float() ** 2).expand_as(y).reshape(-1)


def table_lines(doc: dict) -> list[str]:
    """The Markdown table docs/formats.md quotes (``tests/unit/test_docs_figures.py`` checks it is there)."""
    out = ["| format | stream | calibrated: global | per layer | per (layer, head) | best / worst site | "
           "uniform codes of equal bits |", "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        uniform = f"{r['uniform']} {r['uniform_mse_ratio']:.3f}" if "uniform" in r else "–"
        out.append(f"| {r['format']} | {r['stream']} | {r['global_mse_ratio']:.3f} | {r['layer_mse_ratio']:.3f} | "
                   f"{r['site_mse_ratio']:.3f} | {r['site_best_mse_ratio']:.3f} / {r['site_worst_mse_ratio']:.3f} | "
                   f"{uniform} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/codebooks.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.models import load_model
    from kvcompile.quant import get_scheme
    from kvcompile.quant.lloyd import LloydMaxScheme

    @dataclass(frozen=True)
    class Swapped(LloydMaxScheme):  # the reference with another codebook
        levels: tuple = ()

        @property
        def codebook(self) -> torch.Tensor:
            return torch.tensor(self.levels)

    t0 = time.perf_counter()
    lm = load_model(args.model)
    fit_kv = capture(lm, "wikipedia-calibration", args.windows, args.window)
    held_kv = capture(lm, "wikipedia-heldout", args.windows, args.window)
    layers, heads = len(fit_kv["key"]), fit_kv["key"][0].shape[1]
    rows = []
    for name, uniform in FORMATS.items():
        scheme = get_scheme(name)
        fields = {"bits": scheme.bits, "group_size": scheme.group_size, "rotate": scheme.rotate, "axis": scheme.axis}
        for stream in ("key", "value"):
            def mse(s, layer, head):
                x = held_kv[stream][layer][:, head]
                return (s.roundtrip(x) - x).pow(2).mean().item()

            data = [[normalized_with_weight(scheme, fit_kv[stream][layer][:, head]) for head in range(heads)]
                    for layer in range(layers)]
            sample = slice(None, None, 4)  # every 4th element: the global fit over 30 layers stays small
            global_levels = fit_levels(torch.cat([y[sample] for row in data for y, _ in row]),
                                       torch.cat([w[sample] for row in data for _, w in row]), scheme.bits)
            errors = {source: [] for source in SOURCES}
            uniform_errors = []
            for layer in range(layers):
                layer_levels = fit_levels(torch.cat([y for y, _ in data[layer]]), torch.cat([w for _, w in data[layer]]),
                                          scheme.bits)
                for head in range(heads):
                    site_levels = fit_levels(*data[layer][head], scheme.bits)
                    base = mse(scheme, layer, head)
                    errors["gaussian"].append(1.0)
                    for source, levels in (("global", global_levels), ("layer", layer_levels), ("site", site_levels)):
                        errors[source].append(mse(Swapped(**fields, levels=tuple(levels.tolist())), layer, head) / base)
                    if uniform:
                        uniform_errors.append(mse(get_scheme(uniform), layer, head) / base)
            row = {"format": name, "stream": stream, "bits_per_element": scheme.bits_per_element(scheme.group_size),
                   "sites": len(errors["site"]),
                   **{f"{source}_mse_ratio": sum(v) / len(v) for source, v in errors.items()},
                   "site_best_mse_ratio": min(errors["site"]), "site_worst_mse_ratio": max(errors["site"]),
                   "global_levels": [round(v, 4) for v in global_levels.tolist()],
                   "gaussian_levels": [round(v, 4) for v in scheme.codebook.tolist()]}
            if uniform:
                row.update(uniform=uniform, uniform_mse_ratio=sum(uniform_errors) / len(uniform_errors))
            rows.append(row)
            print(f"{name:12s} {stream:5s} held-out MSE / gaussian: " + "  ".join(
                f"{s} {row[f'{s}_mse_ratio']:.3f}" for s in SOURCES[1:])
                + (f"  | {uniform} {row['uniform_mse_ratio']:.3f}" if uniform else ""))
    seconds = time.perf_counter() - t0
    doc = {"model": args.model, "fit_text": "wikipedia-calibration", "score_text": "wikipedia-heldout",
           "windows": args.windows, "window": args.window, "results": rows, "seconds": seconds,
           "environment": environment(args.threads)}
    write_json(args.out, doc)
    print("\n".join(table_lines(doc)))


if __name__ == "__main__":
    main()
