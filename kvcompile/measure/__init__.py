"""Measurement: how much a precision map costs in model quality, shared by calibrate, plan --refine,
eval and the benches.

* :mod:`kvcompile.measure.simulate` — the exact parallel simulation of decoding through the cache;
* :mod:`kvcompile.measure.quality` — perplexity, KL and top-1 agreement against full precision,
  the paired bootstrap, and :func:`~kvcompile.measure.quality.kl_meter` (KL of a map, for ``--refine``).

It sits above kv and cache and below calibrate and plan: it imports neither of them.
"""
