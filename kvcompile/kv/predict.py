"""Cross-layer prediction: store each layer's K/V as the residual of a linear prediction from the layer before.

Keys and values of neighbouring layers are strongly correlated (AQUA-KV, Shutova et al., arXiv
2501.19392).  With ``X_l = [K_l, V_l]`` the cache of layer ``l`` at one position p (all kv heads,
``[H*D]`` each; keys after RoPE, as the cache stores them), ``X̂`` its stored (de-quantized) form
and ``R(p)`` RoPE at p (:mod:`kvcompile.kv.rope`)::

    P_K = R(p) F_K(R(-p) K̂_{l-1}, V̂_{l-1}),   K̂_l = P_K + Q(K_l - P_K)
    P_V =      F_V(R(-p) K̂_l,     V̂_{l-1}),   V̂_l = P_V + Q(V_l - P_V)

with ``F(a, b) = [a, b] W + c`` (``W`` ``[2 H D, H D]``, ``c`` ``[H D]``) fitted by ridge regression on
calibration text, and ``Q`` the site's storage scheme.  The linear maps see keys *before* RoPE: a
map between rotated keys would hold only for the rotation angles of the positions it was fitted on
(fitted on 512 positions, it predicted keys far beyond them worse than their mean).  Layer 0 has
no predictor (``P = 0``).  The reconstruction error is the residual's quantization error
``r - Q(r)``, so a residual with less spread than ``K_l`` costs less at equal bits (about
``1/2 log2(var x / var r)`` bits per element at high rate).  Prediction always reads the *stored* forms of the layer before, so the writer and the
reader compute the same ``P`` and quantization errors do not accumulate through layers.

A position's form can change as it ages (recent window -> age tiers -> bulk).  Residuals stay
consistent because every site of a prediction map stores single positions (per-token schemes,
:attr:`~kvcompile.quant.base.StorageScheme.token_group` 1), so every site moves a position to its
next tier at the same step; the writer processes layers in order and re-encodes each layer's
position against the prediction from the layer before *in the same tier*
(:func:`kvcompile.measure.simulate.stored_forms` builds the same forms, and
:class:`kvcompile.cache.MixedPrecisionCache` writes them).

The predictors are a per-model constant, like the weights (``2 (L - 1) (2 H D + 1) H D``
parameters), and are not counted in bits per element of the cache.  File: ``predictors.safetensors``
(float32 tensors ``key.<l>.weight``, ``key.<l>.bias``, ``value.<l>.weight``, ``value.<l>.bias`` for
l >= 1; metadata ``artifact``, ``format_version``, ``model``, ``num_layers``, ``num_kv_heads``,
``head_dim``, ``fit``).  A precision map names it by path and content sha256 (``predictors`` field).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from kvcompile.artifacts import atomic_write_bytes
from kvcompile.errors import ArtifactError

FORMAT_VERSION = 1
FILE_NAME = "predictors.safetensors"
STREAMS = ("key", "value")


@dataclass(eq=False)
class CrossLayerPredictors:
    """Per layer ``l >= 1`` and stream: ``weight`` ``[2 H D, H D]`` and ``bias`` ``[H D]`` (float32).

    Two predictors are the same when their :attr:`sha256` is (``==`` on tensors has no single answer)."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    #: ``{"key": {l: (weight, bias)}, "value": {...}}`` for l in 1 .. num_layers - 1
    maps: dict
    fit: dict = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False, compare=False)

    def __eq__(self, other) -> bool:
        return isinstance(other, CrossLayerPredictors) and other.sha256 == self.sha256

    __hash__ = None  # mutable: not a dict key

    def __post_init__(self) -> None:
        width = self.num_kv_heads * self.head_dim
        for stream in STREAMS:
            layers = self.maps.get(stream, {})
            if sorted(layers) != list(range(1, self.num_layers)):
                raise ArtifactError(f"predictors: {stream} needs layers 1..{self.num_layers - 1}, got {sorted(layers)[:8]}")
            for layer, (w, b) in layers.items():
                if tuple(w.shape) != (2 * width, width) or tuple(b.shape) != (width,):
                    raise ArtifactError(f"predictors: {stream} layer {layer} has weight {tuple(w.shape)} and bias "
                                        f"{tuple(b.shape)}; expected {(2 * width, width)} and {(width,)}")
                if not (w.isfinite().all() and b.isfinite().all()):
                    raise ArtifactError(f"predictors: {stream} layer {layer} holds NaN or infinity")

    @property
    def parameters(self) -> int:
        return sum(w.numel() + b.numel() for s in STREAMS for w, b in self.maps[s].values())

    def predict(self, stream: str, layer: int, first, second, rope, start: int = 0):
        """The prediction ``[B, H, T, D]`` (float32; keys after RoPE) of layer ``layer`` >= 1 at positions
        ``start .. start+T-1``: ``first``/``second`` ``[B, H, T, D]`` are ``K̂_{l-1}, V̂_{l-1}`` (keys) or
        ``K̂_l, V̂_{l-1}`` (values), keys after RoPE; ``rope`` the model's
        :class:`~kvcompile.kv.rope.RopeTable` (one for every layer: models with several are refused).

        The product runs in float64 and is rounded once, so a position's prediction does not depend on
        which other rows share it (the cache predicts a few rows, the simulation all at once)."""
        import torch

        first = rope.unrotate(first.float(), start)
        w, b = self.maps[stream][layer]
        bsz, h, t, d = first.shape
        flat = torch.cat([first.double().permute(0, 2, 1, 3).reshape(bsz, t, h * d),
                          second.double().permute(0, 2, 1, 3).reshape(bsz, t, h * d)], -1)
        out = (flat @ w.double() + b.double()).float().reshape(bsz, t, h, d).permute(0, 2, 1, 3)
        return rope.rotate(out.contiguous(), start) if stream == "key" else out

    # ---------------------------------------------------------------- I/O
    def _content(self) -> tuple[dict, dict]:
        tensors = {f"{s}.{l}.{part}": t.float().contiguous() for s in STREAMS for l, pair in self.maps[s].items()
                   for part, t in zip(("weight", "bias"), pair)}
        meta = {"artifact": "predictors", "format_version": str(FORMAT_VERSION), "model": self.model,
                "num_layers": str(self.num_layers), "num_kv_heads": str(self.num_kv_heads),
                "head_dim": str(self.head_dim), "fit": json.dumps(self.fit, sort_keys=True)}
        return dict(sorted(tensors.items())), meta

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(*self._content())

    @property
    def sha256(self) -> str:
        """sha256 of the content (metadata as sorted JSON, then each tensor's name and float32 bytes in name
        order); the file's bytes can differ between writes (safetensors orders metadata freely)."""
        if self._digest is None:
            tensors, meta = self._content()
            h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
            for name, t in tensors.items():
                h.update(name.encode())
                h.update(t.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def save(self, path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        register(self)
        return path

    @classmethod
    def from_bytes(cls, blob: bytes, source: str = "predictors") -> "CrossLayerPredictors":
        from safetensors.torch import load

        try:
            tensors = load(blob)
            meta = _metadata(blob)
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error type on a malformed file
            raise ArtifactError(f"{source}: not a readable safetensors file ({str(e)[:120]})") from None
        if meta.get("artifact") != "predictors" or meta.get("format_version") != str(FORMAT_VERSION):
            raise ArtifactError(f"{source}: expected a predictors artifact of format_version {FORMAT_VERSION}, got "
                                f"{meta.get('artifact')!r} version {meta.get('format_version')!r}")
        try:
            layers = int(meta["num_layers"])
            maps = {s: {l: (tensors[f"{s}.{l}.weight"], tensors[f"{s}.{l}.bias"]) for l in range(1, layers)}
                    for s in STREAMS}
            out = cls(meta["model"], layers, int(meta["num_kv_heads"]), int(meta["head_dim"]), maps,
                      json.loads(meta.get("fit", "{}")))
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{source}: predictors file is missing or mistypes {str(e)[:80]}") from None
        return out


def _metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON header)."""
    if len(blob) < 8:
        raise ArtifactError("predictors: file is shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    try:
        return json.loads(blob[8 : 8 + n]).get("__metadata__", {}) or {}
    except (ValueError, AttributeError):
        raise ArtifactError("predictors: unreadable safetensors header") from None


#: predictors by sha256: made or loaded in this process (a calibration made in memory plans and scores
#: maps that name its predictors before anything is written)
_KNOWN: dict[str, CrossLayerPredictors] = {}


def register(predictors: CrossLayerPredictors) -> str:
    _KNOWN[predictors.sha256] = predictors
    return predictors.sha256


def resolve(reference: dict, what: str = "precision map") -> CrossLayerPredictors:
    """The predictors a precision map names (``{"path": ..., "sha256": ...}``): by digest if this process
    has them, else read from ``path`` (relative paths from the working directory) and checked."""
    digest, path = reference["sha256"], reference["path"]
    if digest in _KNOWN:
        return _KNOWN[digest]
    p = Path(path)
    if not path or not p.is_file():
        raise ArtifactError(f"{what} needs its cross-layer predictors {path or '(no path)'} (sha256 {digest[:12]}…): "
                            f"file not found; expected the {FILE_NAME} its calibration wrote")
    predictors = CrossLayerPredictors.from_bytes(p.read_bytes(), str(p))
    if predictors.sha256 != digest:
        raise ArtifactError(f"{p}: content sha256 differs from the {digest[:12]}… the {what} names; expected the "
                            f"{FILE_NAME} its calibration wrote")
    return _KNOWN.setdefault(digest, predictors)
