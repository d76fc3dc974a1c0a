"""Llama adapter (also serves Mistral-style configs without sliding windows)."""

from kvcompile.models.adapters import ArchitectureAdapter, register_adapter


class LlamaAdapter(ArchitectureAdapter):
    model_type = "llama"


class MistralAdapter(ArchitectureAdapter):
    model_type = "mistral"


register_adapter(LlamaAdapter())
register_adapter(MistralAdapter())
