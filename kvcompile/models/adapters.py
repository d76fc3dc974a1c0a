"""Architecture adapters: what kvcompile needs to know about a decoder family.

An adapter turns a ``transformers`` config into the KV geometry and checks that the model's
attention goes through ``transformers``' attention-function interface with the cache passed as
``past_key_values`` (what the mixed-precision cache and the parallel simulation hook into).

Adding an architecture = one module that defines an adapter and calls :func:`register_adapter`
with the config's ``model_type``, plus one entry in ``tests/unit/test_models.py``.  A new family
needs (1) its K/V geometry from the config; (2) attention layers that call
``past_key_values.update(k, v, layer_idx)`` and an ``ALL_ATTENTION_FUNCTIONS`` implementation with
``module.layer_idx`` set (true of Llama, Mistral, Qwen2/3, Gemma 3 in transformers >= 4.48); (3) RoPE
applied before the cache (keys are cached post-rotation); (4) for the ONNX export, the
:class:`DecoderTraits` of its layer (norms, activation, scales), read by the export's decoder
graph.  Sliding-window layers are supported where the adapter says which layers have a window
(:meth:`ArchitectureAdapter.layer_windows`); linear-attention layers are not.
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
    #: per layer, the sliding attention window W (a query at position i reads keys j with
    #: ``i - W < j <= i``) or 0 for full attention; empty: every layer attends fully
    layer_windows: tuple[int, ...] = ()

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window, 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0


@dataclass(frozen=True)
class DecoderTraits:
    """How one decoder family's layer differs from Llama's, for the export's graph builder.

    Per layer (``x`` the residual stream)::

        h  = o_proj(attention(rope(qnorm(q(n1(x)))), rope(knorm(k(n1(x)))), v(n1(x))))
        x' = x + n2(h)                          (n2 only with ``post_norms``)
        m  = down(act(gate(n3(x'))) * up(n3(x')))
        x''= x' + n4(m)                         (n4 only with ``post_norms``)

    with RMS norms ``x / rms(x) * (offset + w)``.  Llama: no q/k norms, no post norms, offset 0,
    SiLU, embeddings unscaled, one RoPE table.
    """

    norm_weight_offset: float = 0.0  # Gemma: 1.0 (weights stored as w - 1)
    qk_norms: bool = False  # RMS norms over head_dim on queries and keys before RoPE
    post_norms: bool = False  # norms on the attention and MLP outputs before the residual adds
    activation: str = "silu"  # "silu" | "gelu_tanh"
    embedding_scale: float = 1.0  # token embeddings multiplied by this (Gemma: sqrt(hidden))
    #: attribute names of the norms: (before attention, after attention, before MLP, after MLP)
    norm_names: tuple[str, str, str, str] = ("input_layernorm", "", "post_attention_layernorm", "")


class ArchitectureAdapter:
    """Base adapter for Llama-like decoders (GQA attention, RoPE, one KV cache per layer)."""

    model_type: str = ""
    traits = DecoderTraits()

    def geometry(self, config: Any) -> KVGeometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        windows = self.layer_windows(config)
        return KVGeometry(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            num_q_heads=heads,
            head_dim=head_dim,
            max_positions=getattr(config, "max_position_embeddings", 2048),
            layer_windows=windows if any(windows) else (),
        )

    def layer_windows(self, config: Any) -> tuple[int, ...]:
        """Per layer, its sliding window or 0 (full attention).  The base class has none."""
        return (0,) * config.num_hidden_layers

    def decoder_traits(self, config: Any) -> DecoderTraits:
        return self.traits

    def check(self, config: Any) -> None:
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ModelError(f"{config.model_type}: sliding-window attention is not supported for this architecture; "
                             "expected an adapter that names its window layers (as gemma3_text does)")


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
