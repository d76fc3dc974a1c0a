"""PrecisionMap: the storage scheme of every (layer, kv head, K|V, position class).

Position classes, for a sequence of L cached positions:

* ``sink``   positions ``[0, n)`` with ``n = min(sink_tokens, L)`` (attention sinks);
* ``bulk``   positions ``[n, e)``;
* ``recent`` positions ``[e, L)``, the last ``recent_window`` positions *and* any positions that
  still wait for a complete block of the bulk scheme.

The bulk end is ``e = n + G * floor(max(L - w - n, 0) / G)`` where ``w = recent_window`` and
``G = token_group`` of the bulk scheme (1 for per-token formats, the group size for per-channel
formats, which quantize G positions together); :mod:`kvcompile.kv.segments` holds this algebra.
Positions enter the cache at their class's precision and are re-quantized from their
recent-window form into the bulk scheme when they age past the window.  Sink and recent schemes
must store single positions (``token_group == 1``).

Recency tiers: between ``recent`` and ``bulk`` a map may have age tiers ``age1 .. ageK`` of
``age_windows[i]`` positions each; a position moves ``recent -> age1 -> ... -> bulk`` as it ages,
re-quantized from tier to tier (:mod:`kvcompile.kv.segments` gives the positions per tier).

Cross-layer prediction (``predictors``, :mod:`kvcompile.kv.predict`): every layer after the first
stores the residual of a linear prediction from the layer before's stored K/V; such a map holds
per-token schemes stored after RoPE only (so every site moves a position between tiers at the same
step) and no sliding-window layers.

Sliding-window layers (``layer_windows``, one entry per layer: the window W, or 0 for full
attention): such a layer keeps only the positions a later query can read, the last W, so it has
no sinks, window or bulk: every class of each (kv head, stream) holds the same per-token scheme,
each position is quantized once and dropped when it leaves the window.  :meth:`PrecisionMap.windowed`
turns any map into one for a model with such layers (each window layer takes its bulk scheme if
that is per-token, else its recent scheme).  A window layer stores ``min(N, W)`` positions at a
context of N, and bits per element count only the positions stored.

File format (JSON, ``format_version`` 2; version 1 files, which have no ``age_windows``, load as
maps without age tiers)::

    {"artifact": "precision_map", "format_version": 2, "kvcompile_version": "...",
     "model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
     "sink_tokens": 4, "recent_window": 32, "age_windows": [96, 384], "calibration_hash": null,
     "layer_windows": [512, 512, 0, ...]   (only in maps of models with sliding-window layers)
     "predictors": {"path": "...", "sha256": "..."}   (only in maps with cross-layer predictors)
     "description": "...",
     "schemes": {"key":   {"sink": [[...] * heads] * layers, "recent": ..., "age1": ..., "age2": ...,
                           "bulk": ...},
                 "value": {...}}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from kvcompile.artifacts import load_json_artifact, save_json_artifact
from kvcompile.errors import ArtifactError, KvcompileError
from kvcompile.quant import StorageScheme, get_scheme
from kvcompile.quant.base import storable_scheme
from kvcompile.kv.rope import stores_pre_rope
from kvcompile.kv.segments import (CLASSES, MAX_AGE_TIERS, MEMORY_ACCOUNTING, SegmentRule, bulk_end,  # noqa: F401
                                   class_lengths, class_names)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STREAMS = ("key", "value")

Grid = tuple[tuple[str, ...], ...]  # [layer][kv head] -> scheme name


#: (field, least, most) of the map's integers: generous bounds that still reject typos and overflow.
LIMITS = (("num_layers", 1, 4096), ("num_kv_heads", 1, 1024), ("head_dim", 1, 4096),
          ("sink_tokens", 0, 1 << 20), ("recent_window", 0, 1 << 20))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _storable(name: str, head_dim: int, where: str) -> StorageScheme:
    try:
        return storable_scheme(name, head_dim)
    except KvcompileError as e:
        raise ArtifactError(f"precision map: {where}: {e}") from None


@dataclass(frozen=True)
class PrecisionMap:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sink_tokens: int
    recent_window: int
    schemes: dict[str, dict[str, Grid]]
    model: str = ""
    calibration_hash: str | None = None
    description: str = ""
    #: how the map was made (planner inputs and predictions); free-form JSON object
    provenance: dict = field(default_factory=dict)
    #: windows of the age tiers age1 .. ageK between recent and bulk (empty: sink / recent / bulk)
    age_windows: tuple[int, ...] = ()
    #: per layer, the sliding window of a window layer or 0 (empty: no window layers)
    layer_windows: tuple[int, ...] = ()
    #: cross-layer predictors (:mod:`kvcompile.kv.predict`) as ``{"path": ..., "sha256": ...}``, or None:
    #: every layer after the first then stores the residual of its prediction
    predictors: dict | None = None
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        key: str,
        value: str | None = None,
        *,
        sink_tokens: int = 0,
        recent_window: int = 0,
        sink: str = "fp16",
        recent: str = "fp16",
        ages: tuple[tuple[int, str], ...] = (),
        model: str = "",
        description: str = "",
    ) -> "PrecisionMap":
        """Same bulk scheme everywhere (``key`` for K, ``value`` for V, default = ``key``);
        ``ages``: ``((window, scheme), ...)`` of the age tiers, newest first, for K and V alike."""
        def grid(name: str) -> Grid:
            return tuple(tuple(name for _ in range(num_kv_heads)) for _ in range(num_layers))

        schemes = {
            stream: {"sink": grid(sink), "recent": grid(recent),
                     **{f"age{i}": grid(name) for i, (_, name) in enumerate(ages, 1)}, "bulk": grid(bulk)}
            for stream, bulk in (("key", key), ("value", value or key))
        }
        return cls(num_layers, num_kv_heads, head_dim, sink_tokens, recent_window, schemes, model, None, description,
                   age_windows=tuple(w for w, _ in ages))

    def with_bulk(self, bulk: dict[str, Grid], **changes) -> "PrecisionMap":
        """A copy with new bulk grids (``{"key": grid, "value": grid}``) and other fields changed."""
        from dataclasses import replace

        schemes = {s: {**self.schemes[s], "bulk": bulk[s]} for s in STREAMS}
        return replace(self, schemes=schemes, _resolved={}, **changes)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every field strictly; any problem is one :class:`ArtifactError` line naming the field."""
        for name, lo, hi in LIMITS:
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:  # type(): a JSON true is not 1
                raise ArtifactError(f"precision map: {name} must be an integer from {lo} to {hi}, got {_short(value)}")
        for name in ("model", "description"):
            if not isinstance(getattr(self, name), str) or len(getattr(self, name)) > 4096:
                raise ArtifactError(f"precision map: {name} must be a string of at most 4096 characters")
        if self.calibration_hash is not None and not (isinstance(self.calibration_hash, str)
                                                      and len(self.calibration_hash) <= 128):
            raise ArtifactError(f"precision map: calibration_hash must be null or a hash string, got {_short(self.calibration_hash)}")
        windows = self.age_windows
        if not isinstance(windows, (list, tuple)) or len(windows) > MAX_AGE_TIERS or \
                any(type(w) is not int or not 1 <= w <= 1 << 20 for w in windows):
            raise ArtifactError(f"precision map: age_windows must list at most {MAX_AGE_TIERS} integers from 1 to "
                                f"{1 << 20}, got {_short(windows)}")
        lw = self.layer_windows
        if not isinstance(lw, (list, tuple)) or (lw and len(lw) != self.num_layers) or \
                any(type(w) is not int or not (w == 0 or 2 <= w <= 1 << 20) for w in lw):
            raise ArtifactError(f"precision map: layer_windows must be empty or list {self.num_layers} integers, each 0 "
                                f"(full attention) or a window from 2 to {1 << 20}, got {_short(lw)}")
        if not isinstance(self.provenance, dict):
            raise ArtifactError(f"precision map: provenance must be a JSON object, got {_short(self.provenance)}")
        if not isinstance(self.schemes, dict) or set(self.schemes) != set(STREAMS):
            raise ArtifactError(f"precision map: 'schemes' must have exactly the keys {list(STREAMS)}")
        for stream in STREAMS:
            classes = self.schemes[stream]
            if not isinstance(classes, dict) or set(classes) != set(self.classes):
                raise ArtifactError(f"precision map: schemes.{stream} must have exactly the keys {list(self.classes)}")
            for cls_name in self.classes:
                grid = classes[cls_name]
                where = f"schemes.{stream}.{cls_name}"
                if not isinstance(grid, (list, tuple)) or len(grid) != self.num_layers:
                    raise ArtifactError(f"precision map: {where} must list {self.num_layers} layers, got "
                                        f"{len(grid) if isinstance(grid, (list, tuple)) else type(grid).__name__}")
                for layer, row in enumerate(grid):
                    if not isinstance(row, (list, tuple)) or len(row) != self.num_kv_heads:
                        raise ArtifactError(f"precision map: {where}[{layer}] must list {self.num_kv_heads} kv heads")
                    for head, name in enumerate(row):
                        if not isinstance(name, str):
                            raise ArtifactError(f"precision map: {where}[{layer}][{head}] must be a scheme name, got "
                                                f"{_short(name)}")
                        scheme = _storable(name, self.head_dim, f"{where}[{layer}][{head}]")
                        if stream == "value" and stores_pre_rope(scheme):
                            raise ArtifactError(f"precision map: {where}[{layer}][{head}] = {name!r} stores keys before "
                                                f"RoPE; values have no RoPE: use {scheme.base.name!r}")
                        if cls_name in ("sink", "recent") and scheme.token_group != 1:
                            raise ArtifactError(f"precision map: {where}[{layer}][{head}] = {name!r} groups positions "
                                                f"(-ch); the {cls_name} class needs a per-token scheme")
        for layer in range(self.num_layers):
            if not self.window(layer):
                continue
            for stream in STREAMS:
                for head in range(self.num_kv_heads):
                    names = {self.schemes[stream][c][layer][head] for c in self.classes}
                    if len(names) != 1 or get_scheme(next(iter(names))).token_group != 1:
                        raise ArtifactError(f"precision map: layer {layer} is a sliding-window layer; its {stream} head "
                                            f"{head} needs one per-token scheme in every class, got {sorted(names)}")

        if self.predictors is not None:
            self._validate_predictors()

    def _validate_predictors(self) -> None:
        ref = self.predictors
        if not (isinstance(ref, dict) and set(ref) == {"path", "sha256"} and isinstance(ref["path"], str)
                and len(ref["path"]) <= 4096 and isinstance(ref["sha256"], str) and len(ref["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in ref["sha256"])):
            raise ArtifactError(f"precision map: predictors must be null or {{\"path\": file, \"sha256\": 64 hex digits}}, "
                                f"got {_short(ref)}")
        if any(self.layer_windows):
            raise ArtifactError("precision map: cross-layer predictors need full-attention layers; this map has "
                                "sliding-window layers")
        for layer, head, stream in self.sites():
            for cls_name, scheme in zip(self.classes, self.class_schemes(layer, head, stream)):
                if scheme.token_group != 1 or stores_pre_rope(scheme):
                    raise ArtifactError(f"precision map: schemes.{stream}.{cls_name}[{layer}][{head}] = {scheme.name!r}; "
                                        "a map with cross-layer predictors needs per-token schemes stored after RoPE "
                                        "(every site then moves a position between tiers at the same step)")

    def windowed(self, layer_windows) -> "PrecisionMap":
        """This map for a model whose layers have sliding windows ``layer_windows`` (0: full
        attention): each window layer's (head, stream) takes its bulk scheme in every class if that
        scheme is per-token, else its recent scheme.  Empty or all-zero windows: the map unchanged."""
        from dataclasses import replace

        windows = tuple(layer_windows)
        if not any(windows):
            return self if not self.layer_windows else replace(self, layer_windows=(), _resolved={})
        if len(windows) != self.num_layers:
            raise ArtifactError(f"precision map: {len(windows)} layer windows for a map of {self.num_layers} layers")
        schemes = {st: {c: [list(row) for row in grid] for c, grid in self.schemes[st].items()} for st in STREAMS}
        for layer, w in enumerate(windows):
            if not w:
                continue
            for st in STREAMS:
                for head in range(self.num_kv_heads):
                    bulk = schemes[st]["bulk"][layer][head]
                    name = bulk if get_scheme(bulk).token_group == 1 else schemes[st]["recent"][layer][head]
                    for c in self.classes:
                        schemes[st][c][layer][head] = name
        frozen = {st: {c: tuple(tuple(row) for row in grid) for c, grid in v.items()} for st, v in schemes.items()}
        return replace(self, schemes=frozen, layer_windows=windows, _resolved={})

    # ---------------------------------------------------------------- queries
    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (0: full attention, the sink / recent / bulk model)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def stored_positions(self, layer: int, seq_len: int) -> int:
        """Positions layer ``layer`` stores at a context of ``seq_len``: ``min(seq_len, W)`` for a window layer."""
        w = self.window(layer)
        return min(seq_len, w) if w else seq_len

    @property
    def classes(self) -> tuple[str, ...]:
        """Position classes: ``("sink", "recent", "age1", ..., "bulk")``."""
        return class_names(len(self.age_windows))

    def keys_pre_rope(self, layer: int | None = None) -> bool:
        """Whether any key of ``layer`` (of any layer: None) is stored before RoPE (a ``-pr`` scheme)."""
        layers = range(self.num_layers) if layer is None else (layer,)
        return any(stores_pre_rope(s) for lay in layers for h in range(self.num_kv_heads)
                   for s in self.class_schemes(lay, h, "key"))

    def class_schemes(self, layer: int, head: int, stream: str) -> tuple[StorageScheme, ...]:
        """The schemes of every class of one stream, in :attr:`classes` order."""
        return tuple(self.scheme(layer, head, stream, c) for c in self.classes)

    def scheme(self, layer: int, head: int, stream: str, cls_name: str) -> StorageScheme:
        key = (layer, head, stream, cls_name)
        if key not in self._resolved:
            self._resolved[key] = get_scheme(self.schemes[stream][cls_name][layer][head])
        return self._resolved[key]

    def triple(self, layer: int, head: int, stream: str) -> tuple[StorageScheme, StorageScheme, StorageScheme]:
        """(sink, recent, bulk) schemes of one stream."""
        return tuple(self.scheme(layer, head, stream, c) for c in ("sink", "recent", "bulk"))  # type: ignore[return-value]

    def sites(self) -> Iterator[tuple[int, int, str]]:
        for layer in range(self.num_layers):
            for head in range(self.num_kv_heads):
                for stream in STREAMS:
                    yield layer, head, stream

    def segment_rule(self, layer: int, head: int, stream: str) -> SegmentRule:
        """Where this stream stores each position (:class:`~kvcompile.kv.segments.SegmentRule`)."""
        ages = tuple((w, self.scheme(layer, head, stream, f"age{i}").token_group)
                     for i, w in enumerate(self.age_windows, 1))
        return SegmentRule(self.sink_tokens, self.recent_window, self.scheme(layer, head, stream, "bulk").token_group, ages)

    def segment_lengths(self, layer: int, head: int, stream: str, seq_len: int, memory: str = "final") -> dict[str, int]:
        """Positions per class for a sequence of ``seq_len`` positions (``memory``: see :data:`MEMORY_ACCOUNTING`)."""
        return self.segment_rule(layer, head, stream).counted(seq_len, memory)

    def kv_bits(self, seq_len: int, memory: str = "final") -> float:
        """Exact stored bits of one sequence of ``seq_len`` positions, all layers, heads, K and V.

        ``memory="allocated"``: the bits of buffers that hold any length up to ``seq_len``."""
        total = 0.0
        for layer, head, stream in self.sites():
            if self.window(layer):  # one per-token scheme over the positions in the window
                total += self.stored_positions(layer, seq_len) * self.head_dim * \
                    self.scheme(layer, head, stream, "bulk").bits_per_element(self.head_dim)
                continue
            for cls_name, count in self.segment_lengths(layer, head, stream, seq_len, memory).items():
                total += count * self.head_dim * self.scheme(layer, head, stream, cls_name).bits_per_element(self.head_dim)
        return total

    def stored_elements(self, seq_len: int) -> int:
        """K/V elements a full-precision cache with the same windows stores at ``seq_len`` positions."""
        return 2 * self.num_kv_heads * self.head_dim * sum(self.stored_positions(l, seq_len) for l in range(self.num_layers))

    def bits_per_element(self, seq_len: int, memory: str = "final") -> float:
        """Average stored bits per stored K/V element over a context of ``seq_len`` positions
        (window layers count the positions of their window only, so fp16 everywhere is 16)."""
        return self.kv_bits(seq_len, memory) / self.stored_elements(seq_len)

    def kv_bytes(self, seq_len: int, batch: int = 1, memory: str = "final") -> float:
        return self.kv_bits(seq_len, memory) * batch / 8

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int, layer_windows=()) -> None:
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        if got != (num_layers, num_kv_heads, head_dim):
            raise ArtifactError(
                f"precision map is for layers x kv heads x head dim = {got}, the model has "
                f"{(num_layers, num_kv_heads, head_dim)}"
            )
        if tuple(layer_windows or ()) != tuple(self.layer_windows):
            raise ArtifactError(f"precision map has sliding windows {list(self.layer_windows) or 'none'}, the model "
                                f"{list(layer_windows) or 'none'}; make the map for this model (kvcompile plan, or "
                                "PrecisionMap.windowed)")

    def summary(self) -> str:
        """Short human description: distinct bulk schemes of K and V and the window sizes."""
        def distinct(stream: str) -> str:
            names = sorted({n for row in self.schemes[stream]["bulk"] for n in row})
            return "/".join(names) if len(names) <= 3 else f"{len(names)} schemes"
        ages = f", age tiers {list(self.age_windows)}" if self.age_windows else ""
        slide = sum(1 for w in self.layer_windows if w)
        slide = f", {slide} sliding-window layers" if slide else ""
        predicted = ", cross-layer predicted" if self.predictors else ""
        return (f"K {distinct('key')}, V {distinct('value')}, sinks {self.sink_tokens}, window {self.recent_window}"
                f"{ages}{slide}{predicted}")

    # ---------------------------------------------------------------- I/O
    def to_json_body(self) -> dict[str, Any]:
        windows = {"layer_windows": list(self.layer_windows)} if self.layer_windows else {}  # old maps hash the same
        if self.predictors is not None:
            windows["predictors"] = dict(self.predictors)
        return {**windows,
            "model": self.model,
            "description": self.description,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "sink_tokens": self.sink_tokens,
            "recent_window": self.recent_window,
            "age_windows": list(self.age_windows),
            "calibration_hash": self.calibration_hash,
            "provenance": self.provenance,
            "schemes": {s: {c: [list(row) for row in self.schemes[s][c]] for c in self.classes} for s in STREAMS},
        }

    def content_hash(self) -> str:
        """sha256 of the map's content (not of its version headers)."""
        return hashlib.sha256(json.dumps(self.to_json_body(), sort_keys=True).encode()).hexdigest()

    def save(self, path) -> None:
        save_json_artifact(path, "precision_map", FORMAT_VERSION, self.to_json_body())

    @classmethod
    def load(cls, path) -> "PrecisionMap":
        return cls.from_json_body(load_json_artifact(path, "precision_map", READABLE_VERSIONS), str(path))

    @classmethod
    def from_json_body(cls, doc: dict, source: str = "precision map") -> "PrecisionMap":
        """Build and validate a map from its JSON body (a map file, or one embedded in an export)."""
        path = source

        def as_tuples(v):  # JSON lists -> tuples; validate() reports anything malformed
            return tuple(as_tuples(x) for x in v) if isinstance(v, list) else v

        raw = doc.get("schemes")
        schemes = ({s: ({c: as_tuples(g) for c, g in v.items()} if isinstance(v, dict) else v) for s, v in raw.items()}
                   if isinstance(raw, dict) else raw)
        try:
            return cls(
                num_layers=doc["num_layers"], num_kv_heads=doc["num_kv_heads"], head_dim=doc["head_dim"],
                sink_tokens=doc["sink_tokens"], recent_window=doc["recent_window"], schemes=schemes,
                model=doc.get("model", ""), calibration_hash=doc.get("calibration_hash"),
                description=doc.get("description", ""), provenance=doc.get("provenance", {}),
                age_windows=as_tuples(doc.get("age_windows", [])),
                layer_windows=as_tuples(doc.get("layer_windows", [])),
                predictors=doc.get("predictors"),
            )
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: precision map is missing or mistypes field {e}; expected format_version "
                                f"{FORMAT_VERSION} with schemes.key/value.sink/recent/bulk grids (and age1.. for age_windows)") from None
