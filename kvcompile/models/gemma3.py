"""Gemma 3 adapter (``gemma3_text``): MQA, head_dim 256, RMS norms on queries and keys, four norms
per layer, GELU-tanh MLP, scaled embeddings, and sliding-window layers.

Which layers slide comes from the config's ``layer_types`` (Gemma-3-270M: five
``sliding_attention`` layers of window 512 per ``full_attention`` layer).  The two RoPE bases
(10k local, 1M global) need nothing here: the export reads each layer type's tables from the
model's own rotary module.
"""

from __future__ import annotations

import math
from typing import Any

from kvcompile.errors import ModelError
from kvcompile.models.adapters import ArchitectureAdapter, DecoderTraits, register_adapter


class Gemma3TextAdapter(ArchitectureAdapter):
    model_type = "gemma3_text"

    def layer_windows(self, config: Any) -> tuple[int, ...]:
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        return tuple(int(config.sliding_window) if t == "sliding_attention" else 0 for t in types)

    def decoder_traits(self, config: Any) -> DecoderTraits:
        return DecoderTraits(norm_weight_offset=1.0, qk_norms=True, post_norms=True, activation="gelu_tanh",
                             embedding_scale=math.sqrt(config.hidden_size),
                             norm_names=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                         "post_feedforward_layernorm"))

    def check(self, config: Any) -> None:
        unknown = sorted(set(getattr(config, "layer_types", None) or []) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ModelError(f"gemma3_text: layer types {unknown} are not supported; expected sliding_attention or "
                             "full_attention")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None):
                raise ModelError(f"gemma3_text: {name} is not supported; expected it unset (as in Gemma 3)")
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelError("gemma3_text: bidirectional attention is not supported; expected a causal decoder")


register_adapter(Gemma3TextAdapter())
