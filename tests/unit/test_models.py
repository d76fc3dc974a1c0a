"""Model loading and the architecture registry."""

from __future__ import annotations

import json

import pytest

from kvcompile.errors import ModelError
from kvcompile.models import load_model, resolve_model_path, supported_architectures
from kvcompile.models.adapters import adapter_for

# Every registered architecture appears here with a minimal config (a new adapter adds a row).
ARCH_CONFIGS = {
    "llama": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=32),
    "mistral": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=32,
                    sliding_window=None),
    "gemma3_text": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=32,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
}
#: the sliding windows each test config must give (0: full attention)
ARCH_WINDOWS = {"gemma3_text": (16, 0)}


def test_every_registered_architecture_has_a_test_config():
    assert set(supported_architectures()) == set(ARCH_CONFIGS)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_geometry_from_config(arch):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, **ARCH_CONFIGS[arch])
    g = adapter_for(config).geometry(config)
    assert (g.num_layers, g.num_kv_heads, g.num_q_heads, g.head_dim) == (2, 2, 4, 32)
    assert g.layer_windows == ARCH_WINDOWS.get(arch, ())


def test_sliding_windows_need_an_adapter_that_names_them():
    from transformers import AutoConfig

    config = AutoConfig.for_model("mistral", **{**ARCH_CONFIGS["mistral"], "sliding_window": 64})
    with pytest.raises(ModelError, match="sliding-window attention is not supported for this architecture"):
        adapter_for(config)
    gemma = AutoConfig.for_model("gemma3_text", **{**ARCH_CONFIGS["gemma3_text"], "final_logit_softcapping": 30.0})
    with pytest.raises(ModelError, match="final_logit_softcapping is not supported"):
        adapter_for(gemma)


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64}))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'; expected one of gemma3_text, llama"):
        load_model(str(tmp_path))


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_builtin_model_resolves_to_the_packaged_gguf():
    path = resolve_model_path("smollm2-135m")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.model
def test_default_model_geometry(smollm):
    g = smollm.geometry
    assert (g.num_layers, g.num_kv_heads, g.num_q_heads, g.head_dim) == (30, 3, 9, 64)
