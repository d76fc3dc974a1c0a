"""Shared fixtures.  Threads are pinned: two torch processes fighting over 2 cores run >10x slower."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through Triton's interpreter in tests; the flag is read when
# triton is first imported, which torch / transformers may do long before a kernel test.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def make_tiny_llama(dtype=torch.float32, seed: int = 0, layers: int = 2):
    """A random 2-layer Llama with GQA (4 query heads, 2 kv heads, head_dim 32): fast and exact to test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def make_tiny_gemma3(dtype=torch.float32, seed: int = 0, window: int = 8):
    """A random 3-layer Gemma 3 (sliding, full, sliding; window ``window``), 4 query heads, 2 kv
    heads, head_dim 32, q/k norms and post norms: the second architecture, small enough to decode exactly."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                              sliding_window=window, query_pre_attn_scalar=32,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # random norm weights (Gemma initializes them at 0, i.e. scale 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def adversarial(t: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    """[2, 3, t, d]: normal data, an outlier channel, a constant head, zeros, tiny and large values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, t, d, generator=g) * 2 + torch.randn(d, generator=g) * 3
    x[0, 0, :, 5] *= 40  # outlier channel
    x[0, 1] = 0.75  # constant groups (zero span)
    x[1, 0, :, :16] = 0.0
    x[1, 1] *= 1e-5  # float16 subnormal-range scales
    x[1, 2] *= 300
    return x


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_geometry(tiny_llama):
    from kvcompile.models.adapters import adapter_for

    return adapter_for(tiny_llama.config).geometry(tiny_llama.config)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M), loaded once per session (first use converts the GGUF, ~30 s)."""
    from kvcompile.models import load_model

    return load_model()


class CharTokenizer:
    """A byte-level tokenizer for the tiny model (ids = bytes mod vocab)."""

    def __init__(self, vocab: int = 97):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, **kwargs):
        ids = torch.tensor([[b % self.vocab for b in text.encode()]])

        class _Out:
            input_ids = ids if return_tensors == "pt" else ids.tolist()

        return _Out()


@pytest.fixture(scope="session")
def tiny_lm(tiny_llama, tiny_geometry):
    from kvcompile.models import LoadedModel
    from kvcompile.models.adapters import adapter_for

    return LoadedModel(tiny_llama, CharTokenizer(), tiny_geometry, adapter_for(tiny_llama.config), "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma_lm():
    """The random 3-layer Gemma 3 (window 8) as a LoadedModel."""
    from kvcompile.models import LoadedModel
    from kvcompile.models.adapters import adapter_for

    model = make_tiny_gemma3(seed=1, window=8)
    adapter = adapter_for(model.config)
    return LoadedModel(model, CharTokenizer(), adapter.geometry(model.config), adapter, "tiny-gemma3")


def pytest_sessionstart(session):
    """Under CI, a promised dependency that is missing fails the run instead of skipping its tests."""
    if os.environ.get("CI"):
        from kvcompile.environment import missing_dependencies

        missing = missing_dependencies()
        if missing:
            pytest.exit(f"CI: promised dependencies missing: {'; '.join(missing)} (run ./install.sh)", returncode=1)
