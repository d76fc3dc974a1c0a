"""Generation over an export directory with interchangeable backends.

A *decoder* (:class:`kvcompile.runtime.base.Decoder`) has ``activate`` / ``deactivate``,
``start(batch) -> state`` and ``step(ids [B, S] int64, state) -> (logits [B, S, V] float32 numpy,
state)``; :func:`open_decoder` returns one activated, and :func:`generate` runs greedy decoding on
any of them.
Backends register by name (``ort``: ONNX Runtime on the exported graph; ``torch``: the source
model with :class:`~kvcompile.cache.MixedPrecisionCache` and the export's map; ``trt``: the
TensorRT engine of a ``--target trt`` export, where a suitable GPU exists).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kvcompile.errors import RuntimeBackendError

_BACKENDS: dict[str, Callable[..., Any]] = {}


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def _load_builtin() -> None:
    if not _BACKENDS:
        from kvcompile.runtime import ort_backend, torch_backend, trt_backend  # noqa: F401  (register themselves)


def open_decoder(export, backend: str = "ort", **options):
    """An activated decoder for an :class:`~kvcompile.export.ExportedModel` on ``backend``
    (``with open_decoder(...) as d:`` deactivates it at the end)."""
    _load_builtin()
    if backend not in _BACKENDS:
        raise RuntimeBackendError(f"unknown backend {backend!r}; expected one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[backend](export, **options).activate()


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(decoder, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding: prefill the prompt, then one token per step."""
    if not prompt_ids:
        raise RuntimeBackendError("the prompt is empty; expected at least one token")
    out = Generation(len(prompt_ids))
    state = decoder.start(1)
    t0 = time.perf_counter()
    logits, state = decoder.step(np.asarray([prompt_ids], dtype=np.int64), state)
    out.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.tokens.append(token)
        if on_token:
            on_token(token)
        if token == eos_token_id or i == max_new_tokens - 1:
            break
        logits, state = decoder.step(np.asarray([[token]], dtype=np.int64), state)
    out.decode_seconds = time.perf_counter() - t0
    out.cache_bytes = decoder.cache_bytes(state)
    return out
