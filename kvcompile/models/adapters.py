"""Architecture adapters: what kvcompile needs to know about a decoder family.

An adapter turns a ``transformers`` config into the KV geometry and checks that the model's
attention goes through ``transformers``' attention-function interface with the cache passed as
``past_key_values`` (what the mixed-precision cache and the parallel simulation hook into).

Adding an architecture = one module that defines an adapter and calls :func:`register_adapter`
with the config's ``model_type``, plus one entry in ``tests/unit/test_models.py``.  A new family
needs (1) its K/V geometry from the config; (2) attention layers that call
``past_key_values.update(k, v, layer_idx)`` and an ``ALL_ATTENTION_FUNCTIONS`` implementation with
``module.layer_idx`` set (true of Llama, Mistral, Qwen2/3 in transformers >= 4.48); (3) RoPE
applied before the cache (keys are cached post-rotation); sliding-window or linear-attention
layers are not supported yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcompile.errors import ModelError


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    max_positions: int


class ArchitectureAdapter:
    """Base adapter for Llama-like decoders (GQA attention, RoPE, one KV cache per layer)."""

    model_type: str = ""

    def geometry(self, config: Any) -> KVGeometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return KVGeometry(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            num_q_heads=heads,
            head_dim=head_dim,
            max_positions=getattr(config, "max_position_embeddings", 2048),
        )

    def check(self, config: Any) -> None:
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ModelError(f"{config.model_type}: sliding-window attention is not supported yet")


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> None:
    _ADAPTERS[adapter.model_type] = adapter


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(config: Any) -> ArchitectureAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ModelError(f"unsupported architecture {model_type!r}; expected one of {', '.join(supported_architectures())}")
    adapter = _ADAPTERS[model_type]
    adapter.check(config)
    return adapter
