"""RoPE tables read off a loaded model's own rotary module (so any RoPE scaling it has is kept)."""

from __future__ import annotations

import inspect

import torch

from kvcompile.kv.rope import RopeTable


def rope_tables(model, positions: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer type: (cos, sin)}`` [positions, D] float32 from ``model.model.rotary_emb``; one type
    ``""`` for single-table models (Gemma 3 has one per layer type: local and global bases)."""
    rotary = model.model.rotary_emb
    ids = torch.arange(positions)[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            types = sorted(set(model.config.layer_types))
            return {t: tuple(a[0].float() for a in rotary(x, ids, t)) for t in types}
        return {"": tuple(a[0].float() for a in rotary(x, ids))}


def layer_ropes(model, positions: int) -> list[RopeTable]:
    """One :class:`RopeTable` per decoder layer, covering ``positions`` positions."""
    tables = {kind: RopeTable(cos, sin) for kind, (cos, sin) in rope_tables(model, positions).items()}
    types = getattr(model.config, "layer_types", None)
    return [tables[types[layer]] if "" not in tables else tables[""] for layer in range(model.config.num_hidden_layers)]
