"""Fuzz the artifact loaders with mutated artifacts and count the outcomes.

    python bench/fuzz.py [--cases 1000] [--seed 0] [--out bench/results/fuzz.json]

For each loader (PrecisionMap.load, Calibration.load, ExportedModel.load) it writes --cases artifacts
made by mutating a valid one (kvcompile.fuzzing: hostile JSON values, removed or added keys,
truncated files, flipped bytes, NaN / wrongly typed / wrongly shaped tensors) and classifies each
load against an independent validity oracle: one-line error, accepted valid, invalid accepted,
valid refused, other exception.  The last three are loader bugs; the goal is 0 of each.  Prints a
table and writes JSON with the first examples of every outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup, write_json  # noqa: E402


def tiny_lm():
    """A random 2-layer Llama (2 kv heads, head_dim 32): an export of it is a real export directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcompile.models import LoadedModel
    from kvcompile.models.adapters import adapter_for

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    adapter = adapter_for(config)
    return LoadedModel(model, None, adapter.geometry(config), adapter, "tiny-llama")


def base_maps(geometry):
    from dataclasses import replace

    from kvcompile.plan.presets import resolve_map

    mixed = resolve_map("kivi-2", geometry, sink_tokens=2, recent_window=8)
    schemes = {s: {c: tuple((row[0], "int4" if c != "bulk" or s == "value" else "int4-ch", *row[2:]) for row in g)
                   for c, g in v.items()} for s, v in mixed.schemes.items()}
    return [resolve_map("int4", geometry), resolve_map("nf4", geometry, sink_tokens=4),
            replace(mixed, schemes=schemes, _resolved={})]


def fuzz_maps(cases: int, rng: random.Random, work: Path, geometry):
    from kvcompile import fuzzing
    from kvcompile.kv.precision_map import PrecisionMap

    bases = []
    for i, pmap in enumerate(base_maps(geometry)):
        pmap.save(work / f"base{i}.json")
        bases.append((work / f"base{i}.json").read_bytes())
    path = work / "map.json"
    for _ in range(cases):
        data = rng.choice(bases)
        if rng.random() < 0.8:
            data = json.dumps(fuzzing.mutate_json(json.loads(data), rng)).encode()
        else:
            data = fuzzing.mutate_bytes(data, rng)
        path.write_bytes(data)
        yield fuzzing.classify(lambda: PrecisionMap.load(path), fuzzing.map_doc_problem(fuzzing.parse_strict(data)))


def fuzz_calibrations(cases: int, rng: random.Random, work: Path, geometry):
    import torch
    from safetensors.torch import load, save

    from kvcompile import fuzzing
    from kvcompile.calibrate import Calibration

    schemes, sinks, windows = ["fp16", "int8", "int4", "int2-ch"], [0, 4], [0, 16]
    g = torch.Generator().manual_seed(0)
    shape = (geometry.num_layers, geometry.num_kv_heads, 2)
    base = Calibration(model="tiny-llama", geometry=geometry, text="wikipedia-calibration", windows=2, window=64,
                       estimator="hybrid", cost_unit="nats per position", schemes=schemes, sink_options=sinks,
                       window_options=windows,
                       cost=torch.rand(*shape, len(schemes), len(windows), len(sinks), generator=g, dtype=torch.float64),
                       curvature=torch.rand(*shape, len(windows), generator=g, dtype=torch.float64),
                       diameter=torch.rand(*shape, generator=g, dtype=torch.float64), seconds=1.0)
    directory = base.save(work / "cal")
    doc0 = json.loads((directory / "calibration.json").read_text())
    blob0 = (directory / "calibration.safetensors").read_bytes()
    for _ in range(cases):
        doc, blob = json.loads(json.dumps(doc0)), blob0
        kind = rng.random()
        if kind < 0.55:
            doc = fuzzing.mutate_json(doc, rng)
        elif kind < 0.9:  # a tensor edit, the hash re-recorded so that only the edit is wrong
            tensors = load(blob0)
            name = rng.choice(sorted(tensors))
            t = tensors[name]
            edit = rng.randrange(6)
            if edit == 0:
                t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -1.0, -1e-300])
            elif edit == 1:
                tensors[name] = t.to(rng.choice([torch.int64, torch.float16, torch.int8, torch.bool]))
            elif edit == 2:
                tensors[name] = t.reshape(-1)[: max(t.numel() - rng.randrange(1, 3), 0)].clone()
            elif edit == 3:
                del tensors[name]
            elif edit == 4:
                tensors[name] = t.unsqueeze(0).clone()
            else:
                t.view(-1)[rng.randrange(t.numel())] = rng.random() * 10  # a valid edit
            blob = save(tensors)
            doc["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        else:  # corrupt bytes of the tensor file, hash re-recorded
            blob = fuzzing.mutate_bytes(blob0, rng)
            doc["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        (directory / "calibration.json").write_text(json.dumps(doc))
        (directory / "calibration.safetensors").write_bytes(blob)
        try:
            tensors = load(blob)
        except Exception:  # noqa: BLE001 - the format's own reader refuses it: the oracle's "unreadable"
            tensors = None
        problem = fuzzing.calibration_problem(doc, tensors)
        if problem is None and doc.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
            problem = "tensors_sha256"
        yield fuzzing.classify(lambda: Calibration.load(directory), problem)


def fuzz_exports(cases: int, rng: random.Random, work: Path, lm):
    from kvcompile import fuzzing
    from kvcompile.export import ExportedModel, export_onnx
    from kvcompile.export.onnx_export import DATA_FILE, MANIFEST, MODEL_FILE

    ex = export_onnx(lm, base_maps(lm.geometry)[2], work / "export", max_context=128)
    original = json.loads((ex.path / MANIFEST).read_text())
    saved = {name: (ex.path / name).read_bytes() for name in (MANIFEST, MODEL_FILE, DATA_FILE)}
    for _ in range(cases):
        kind = rng.random()
        problem = None
        if kind < 0.85:
            data = json.dumps(fuzzing.mutate_json(original, rng)).encode() if rng.random() < 0.85 else \
                fuzzing.mutate_bytes(saved[MANIFEST], rng)
            (ex.path / MANIFEST).write_bytes(data)
            problem = fuzzing.export_manifest_problem(fuzzing.parse_strict(data), original)
        else:  # the files themselves: removed, truncated, or the graph's bytes changed
            name = rng.choice([MODEL_FILE, DATA_FILE])
            edit = rng.randrange(3)
            if edit == 0:
                (ex.path / name).unlink()
            elif edit == 1:
                (ex.path / name).write_bytes(saved[name][: rng.randrange(len(saved[name]))])
            elif name == MODEL_FILE:
                (ex.path / name).write_bytes(fuzzing.mutate_bytes(saved[name], rng))
            else:  # same-size changes to the weights are outside what a load checks (size only)
                (ex.path / name).write_bytes(saved[name][:-1])
            changed = not (ex.path / name).is_file() or (ex.path / name).read_bytes() != saved[name]
            problem = f"{name} changed" if changed else None
        yield fuzzing.classify(lambda: ExportedModel.load(ex.path), problem)
        for name, data in saved.items():
            (ex.path / name).write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000, help="cases per loader (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/fuzz.json")
    args = ap.parse_args()
    setup(args.threads)

    from kvcompile.fuzzing import OUTCOMES

    lm = tiny_lm()
    work = Path(tempfile.mkdtemp(prefix="kvcompile-fuzz-"))
    rows = {}
    try:
        runs = {"PrecisionMap.load": lambda rng: fuzz_maps(args.cases, rng, work, lm.geometry),
                "Calibration.load": lambda rng: fuzz_calibrations(args.cases, rng, work, lm.geometry),
                "ExportedModel.load": lambda rng: fuzz_exports(args.cases, rng, work, lm)}
        for loader, run in runs.items():
            t0 = time.perf_counter()
            counts, examples = Counter(), {}
            for outcome, detail in run(random.Random(args.seed)):
                counts[outcome] += 1
                examples.setdefault(outcome, [])
                if len(examples[outcome]) < 5:
                    examples[outcome].append(detail)
            rows[loader] = {"cases": sum(counts.values()), "outcomes": {o: counts[o] for o in OUTCOMES},
                            "examples": examples, "seconds": time.perf_counter() - t0}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'loader':<20} {'cases':>6} " + " ".join(f"{o:>17}" for o in OUTCOMES))
    for loader, r in rows.items():
        print(f"{loader:<20} {r['cases']:>6} " + " ".join(f"{r['outcomes'][o]:>17}" for o in OUTCOMES))
    for loader, r in rows.items():
        for outcome in OUTCOMES[2:]:
            for detail in r["examples"].get(outcome, []):
                print(f"  {loader} {outcome}: {detail}")
    write_json(args.out, {"benchmark": "fuzz", "environment": environment(args.threads), "seed": args.seed,
                          "cases_per_loader": args.cases, "results": rows})


if __name__ == "__main__":
    main()
