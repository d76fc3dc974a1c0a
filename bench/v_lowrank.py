"""Would a calibrated low-rank (PCA) projection of V (or K) store the cache better than quantizing it as is?

    python bench/v_lowrank.py [--fit-windows 4] [--test-windows 4] [--window 512] [--out bench/results/v_lowrank.json]

For every (layer, kv head) of the model (``--model``, default SmolLM2-135M), a PCA basis ``B`` [D, r] and mean ``mu`` are fitted on
V (and, for contrast, on K as cached, i.e. after RoPE) from ``--fit-windows`` windows of the
calibration text, and applied to ``--test-windows`` windows of the held-out text.  Measured per site:

* energy: the fraction of the test variance inside the top-r fitted components;
* transform-coding gain ``(1 / 2D) sum_i log2(var x_i / var c_i)`` bits/element (``c = (x - mu) B``
  at full rank): what decorrelating in the fitted basis saves over quantizing each channel at high
  rate (Gersho & Gray, *Vector Quantization and Signal Compression*, 1992, ch. 8);
* relative error ``||x - x_hat||^2 / ||x - mean(x)||^2`` at equal stored bits, for per-channel
  integer formats on the raw vectors (``int<b>-ch``: b + 1 bits with fp16 scale and zero per 32
  positions) and on the first r PCA coefficients (``r (b + 1) / D`` bits; the basis itself is a
  per-site constant and is not counted).

It answers whether a PCA storage scheme belongs in the planner's menu for this model; no such
scheme is built.  Prints a table of medians over sites and writes JSON.

``--ppl-windows N`` also measures what the reconstruction error does to the model: V of every
layer replaced, inside attention, by its round trip through one of the formats above (the raw
per-channel format, or the fitted PCA basis with per-channel coefficients), K and everything else
exact, on N held-out windows: delta PPL and KL against the unmodified model.  Every position goes
through its block's round trip at once (blocks of 32 positions are complete in the parallel pass;
a cache would hold the last, incomplete one in fp16), alike for both kinds of format.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402

RAW = [("int2-ch-g64", 2, 64), ("int2-ch", 2, 32), ("int3-ch", 3, 32), ("int4-ch", 4, 32)]  # (scheme, bits, group)
# (rank as a fraction of D, coefficient bits), 32-position groups: at D = 64 the ranks 32, 64, 48, ...
PCA = [(1 / 4, 8), (1 / 2, 4), (1, 2), (3 / 4, 3), (3 / 4, 4), (1, 3), (1 / 2, 8), (1, 4)]


def cached_kv(lm, windows):
    """Per layer: (K, V) as the cache holds them, each [H, K*T, D] over all ``windows`` [K, T]."""
    import torch

    keys, values = None, None
    from transformers import DynamicCache

    with torch.no_grad():
        for ids in windows:  # a plain DynamicCache keeps every position, also of sliding-window layers
            cache = lm.model(ids[None], use_cache=True, past_key_values=DynamicCache()).past_key_values
            k = [layer.keys[0].float() for layer in cache.layers]
            v = [layer.values[0].float() for layer in cache.layers]
            keys = k if keys is None else [torch.cat([a, b], 1) for a, b in zip(keys, k)]
            values = v if values is None else [torch.cat([a, b], 1) for a, b in zip(values, v)]
    return keys, values


def relative_error(x, x_hat):
    return (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()


def site_metrics(fit, test, quantize):
    """Metrics of one site: ``fit`` / ``test`` [T, D] vectors."""
    import torch

    d = fit.shape[1]
    mu = fit.mean(0)
    _, _, vh = torch.linalg.svd(fit - mu, full_matrices=False)
    basis = vh.T  # [D, D], columns by decreasing fitted variance
    coeffs = (test - mu) @ basis
    total = ((test - test.mean(0)) ** 2).sum().item()
    out = {"gain_bits": (0.5 / d) * torch.log2(test.var(0) / coeffs.var(0)).sum().item()}
    for r in (d // 4, d // 2, 3 * d // 4):
        out[f"energy_r{r}"] = ((coeffs[:, :r] - coeffs[:, :r].mean(0)) ** 2).sum().item() / total
    for name, b, g in RAW:
        out[f"{name} ({b + 32 / g:.2f} b)"] = relative_error(test, quantize(name, test))
    for fraction, b in PCA:
        r = int(fraction * d)
        c_hat = quantize(f"int{b}-ch", coeffs[:, :r])
        out[f"pca r{r} int{b}-ch ({r * (b + 1) / d:.2f} b)"] = relative_error(test, c_hat @ basis[:, :r].T + mu)
    return out


def v_roundtrip_ppl(lm, windows, bases, formats, quantize):
    """``{format: (delta PPL %, KL)}``: V replaced by its round trip in every layer (see the module doc).

    ``bases``: per layer ``(mu [H, D], basis [H, D, D])``; ``formats``: ``{label: (scheme, rank or None)}``."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    active = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        scheme, rank = active["format"]
        mu, basis = bases[module.layer_idx]
        out = torch.empty_like(value)
        for h in range(value.shape[1]):
            x = value[0, h].float()
            if rank is None:
                out[0, h] = quantize(scheme, x)
            else:
                b = basis[h][:, :rank]
                out[0, h] = quantize(scheme, (x - mu[h]) @ b) @ b.T + mu[h]
        return sdpa_attention_forward(module, query, key, out.to(value.dtype), attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("v_roundtrip", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("v_roundtrip", sdpa_mask)
    model = lm.model
    previous = model.config._attn_implementation
    results = {}
    with torch.no_grad():
        refs = [model(ids[None], use_cache=False).logits[0, :-1].float() for ids in windows]
        model.set_attn_implementation("v_roundtrip")
        try:
            for label, fmt in formats.items():
                active["format"] = fmt
                nll = nll_ref = kl = count = 0.0
                for ids, ref in zip(windows, refs):
                    logp = F.log_softmax(model(ids[None], use_cache=False).logits[0, :-1].float(), -1)
                    logp_ref = F.log_softmax(ref, -1)
                    targets = ids[1:, None]
                    nll -= logp.gather(-1, targets).sum().item()
                    nll_ref -= logp_ref.gather(-1, targets).sum().item()
                    kl += (logp_ref.exp() * (logp_ref - logp)).sum().item()
                    count += len(targets)
                import math

                results[label] = {"delta_ppl_pct": 100 * (math.exp((nll - nll_ref) / count) - 1), "kl": kl / count}
                print(f"  V through {label}: dPPL {results[label]['delta_ppl_pct']:+.2f} %, KL {results[label]['kl']:.4f}",
                      flush=True)
        finally:
            model.set_attn_implementation(previous)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fit-windows", type=int, default=4)
    ap.add_argument("--test-windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=0,
                    help="also measure dPPL with V through each format on this many held-out windows")
    ap.add_argument("--out", default="bench/results/v_lowrank.json")
    args = ap.parse_args()
    setup(args.threads)

    import numpy as np

    from kvcompile.data import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVAL_TEXT, load_text
    from kvcompile.models import load_model
    from kvcompile.quant import get_scheme
    from kvcompile.measure.quality import token_windows

    def quantize(name, x):  # x [T, D]; T a multiple of 64 so every per-channel group is whole
        s = get_scheme(name)
        return s.dequantize(s.quantize(x[None]))[0]

    t0 = time.perf_counter()
    lm = load_model(args.model)
    fit_k, fit_v = cached_kv(lm, token_windows(lm.tokenizer, load_text(DEFAULT_CALIBRATION_TEXT), args.window, args.fit_windows))
    test_k, test_v = cached_kv(lm, token_windows(lm.tokenizer, load_text(DEFAULT_EVAL_TEXT), args.window, args.test_windows))
    sites = []
    for stream, fit, test in (("V", fit_v, test_v), ("K", fit_k, test_k)):
        for layer in range(len(fit)):
            for head in range(fit[layer].shape[0]):
                sites.append({"stream": stream, "layer": layer, "head": head,
                              **site_metrics(fit[layer][head], test[layer][head], quantize)})
    columns = [c for c in sites[0] if c not in ("stream", "layer", "head")]
    summary = {s: {c: float(np.median([x[c] for x in sites if x["stream"] == s])) for c in columns} for s in ("V", "K")}
    print(f"medians over {len(sites) // 2} (layer, kv head) sites; relative error = ||x - x_hat||^2 / ||x - mean||^2")
    print(f"{'':<28} {'V':>9} {'K (RoPE)':>9}")
    for c in columns:
        print(f"{c:<28} {summary['V'][c]:>9.4f} {summary['K'][c]:>9.4f}")
    ppl = {}
    if args.ppl_windows:
        import torch

        bases = []
        for layer in range(len(fit_v)):
            mus, vhs = [], []
            for head in range(fit_v[layer].shape[0]):
                x = fit_v[layer][head]
                mu = x.mean(0)
                vhs.append(torch.linalg.svd(x - mu, full_matrices=False)[2].T)
                mus.append(mu)
            bases.append((mus, vhs))
        d = fit_v[0].shape[-1]
        formats = {f"{name} ({b + 32 / g:.2f} b)": (name, None) for name, b, g in RAW}
        formats.update({f"pca r{int(f * d)} int{b}-ch ({int(f * d) * (b + 1) / d:.2f} b)": (f"int{b}-ch", int(f * d))
                        for f, b in PCA})
        windows = token_windows(lm.tokenizer, load_text(DEFAULT_EVAL_TEXT), args.window, args.ppl_windows)
        ppl = v_roundtrip_ppl(lm, windows, bases, formats, quantize)
    write_json(args.out, {"benchmark": "v_lowrank", "environment": environment(args.threads), "v_roundtrip_ppl": ppl,
                          "ppl_windows": args.ppl_windows,
                          "fit": {"text": DEFAULT_CALIBRATION_TEXT, "windows": args.fit_windows, "window": args.window},
                          "test": {"text": DEFAULT_EVAL_TEXT, "windows": args.test_windows, "window": args.window},
                          "seconds": time.perf_counter() - t0, "median": summary, "sites": sites})


if __name__ == "__main__":
    main()
