"""The Calibration artifact: predicted quality cost of every candidate format at every KV site.

Files (a directory):

* ``calibration.json`` — ``{"artifact": "calibration", "format_version": 1, "kvcompile_version",
  "model", "geometry": {...}, "text", "windows", "window", "estimator", "cost_unit", "schemes": [...],
  "sink_options": [...], "window_options": [...], "seconds", "tensors_sha256"}``
* ``calibration.safetensors`` — float64 tensors:

  - ``cost`` ``[layers, kv_heads, 2 (K, V), schemes, window_options, sink_options]``: predicted mean
    KL per scored position (nats; or attention-output squared error for the ``attention``
    estimator) when *only* that site's bulk positions are stored in that scheme, with that many fp16
    sinks and that fp16 recent window;
  - ``curvature`` ``[layers, kv_heads, 2, window_options]``: mean Fisher (or attention sensitivity)
    per stored element, the kappa of the precision bound;
  - ``diameter`` ``[layers, kv_heads, 2]``: mean range (max - min) of a 32-value per-token group, the D
    of the bound;
  - ``correction`` ``[schemes]``: measured / predicted KL of each scheme applied to every site (the
    data-calibrated constant c; 1 where not measured).

* ``predictors.safetensors`` — only in a calibration made with cross-layer predictors
  (``kvcompile calibrate --predict``, :mod:`kvcompile.kv.predict`): its costs are those of storing
  each site's prediction residual; ``calibration.json`` then records ``predictors_sha256``.

Everything the planner needs is here, so planning never reruns the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcompile.artifacts import atomic_write_bytes, staged_directory, load_json_artifact, save_json_artifact
from kvcompile.errors import ArtifactError, KvcompileError
from kvcompile.models.adapters import KVGeometry

FORMAT_VERSION = 1
JSON_NAME = "calibration.json"
TENSORS_NAME = "calibration.safetensors"


def _geometry(doc: dict) -> KVGeometry:
    """The geometry of a calibration file (``layer_windows`` as a tuple; absent in older files)."""
    if not isinstance(doc, dict):
        raise TypeError("geometry")
    windows = doc.get("layer_windows", [])
    return KVGeometry(**{**doc, "layer_windows": tuple(windows) if isinstance(windows, list) else windows})


@dataclass
class Calibration:
    model: str
    geometry: KVGeometry
    text: str
    windows: int
    window: int
    estimator: str
    cost_unit: str
    schemes: list[str]
    sink_options: list[int]
    window_options: list[int]
    cost: torch.Tensor
    curvature: torch.Tensor
    diameter: torch.Tensor
    #: [schemes] measured / predicted KL of each scheme as a uniform map (1 where not measured)
    correction: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    #: cross-layer predictors (:class:`kvcompile.kv.predict.CrossLayerPredictors`) the costs were measured
    #: with (residual storage), or None; saved beside the tensors as ``predictors.safetensors``
    predictors: object = None  # part of content_hash() through their sha256
    #: where the calibration was loaded from or saved to (None: only in memory)
    directory: Path | None = field(default=None, compare=False)

    def predictors_reference(self) -> dict | None:
        """``{"path", "sha256"}`` of the predictors, as a precision map names them (None without)."""
        if self.predictors is None:
            return None
        from kvcompile.kv.predict import FILE_NAME, register

        path = str(self.directory / FILE_NAME) if self.directory is not None else ""
        return {"path": path, "sha256": register(self.predictors)}

    def __post_init__(self) -> None:
        """Check every field strictly: a malformed calibration is one ArtifactError line naming the field,
        never a crash in the planner (NaN costs, a window of 0, a short correction, ...)."""
        from kvcompile.calibrate.defaults import ESTIMATORS
        from kvcompile.quant.base import storable_scheme

        def integer(name, value, lo, hi):
            if type(value) is not int or not lo <= value <= hi:
                raise ArtifactError(f"calibration: {name} must be an integer from {lo} to {hi}, got {str(value)[:40]!r}")

        if not isinstance(self.geometry, KVGeometry):
            raise ArtifactError("calibration: geometry must hold num_layers, num_kv_heads, num_q_heads, head_dim, max_positions")
        g = self.geometry
        for name, hi in (("num_layers", 4096), ("num_kv_heads", 1024), ("num_q_heads", 65536), ("head_dim", 4096),
                         ("max_positions", 1 << 24)):
            integer(f"geometry.{name}", getattr(g, name), 1, hi)
        if not isinstance(g.layer_windows, tuple) or (g.layer_windows and len(g.layer_windows) != g.num_layers):
            raise ArtifactError(f"calibration: geometry.layer_windows must be empty or list {g.num_layers} windows")
        for w in g.layer_windows:
            integer("geometry.layer_windows[]", w, 0, 1 << 20)
        integer("windows", self.windows, 1, 1 << 16)
        integer("window", self.window, 2, 1 << 20)
        for name in ("model", "text", "cost_unit"):
            if not isinstance(getattr(self, name), str) or len(getattr(self, name)) > 4096:
                raise ArtifactError(f"calibration: {name} must be a string")
        if self.estimator not in ESTIMATORS:
            raise ArtifactError(f"calibration: unknown estimator {str(self.estimator)[:40]!r}; expected one of {', '.join(ESTIMATORS)}")
        if not isinstance(self.schemes, list) or not self.schemes or not all(isinstance(n, str) for n in self.schemes):
            raise ArtifactError("calibration: schemes must be a non-empty list of scheme names")
        if len(set(self.schemes)) != len(self.schemes):
            raise ArtifactError("calibration: schemes lists a scheme twice")
        for name in self.schemes:
            try:
                storable_scheme(name, g.head_dim)
            except KvcompileError as e:  # unknown, non-canonical, or cannot store head_dim
                raise ArtifactError(f"calibration: scheme {name[:40]!r}: {e}") from None
        for name, lo in (("sink_options", 0), ("window_options", 0)):
            values = getattr(self, name)
            if not isinstance(values, list) or not values:
                raise ArtifactError(f"calibration: {name} must be a non-empty list of integers")
            for v in values:
                integer(f"{name} entry", v, lo, 1 << 20)
            if len(set(values)) != len(values):
                raise ArtifactError(f"calibration: {name} lists a value twice")
        expected = {"cost": (g.num_layers, g.num_kv_heads, 2, len(self.schemes), len(self.window_options), len(self.sink_options)),
                    "curvature": (g.num_layers, g.num_kv_heads, 2, len(self.window_options)),
                    "diameter": (g.num_layers, g.num_kv_heads, 2)}
        if self.correction is None:
            self.correction = torch.ones(len(self.schemes), dtype=torch.float64)
        expected["correction"] = (len(self.schemes),)
        for name, shape in expected.items():
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.dtype not in (torch.float64, torch.float32):
                raise ArtifactError(f"calibration: {name} must be a float64 tensor of shape {shape}")
            if tuple(t.shape) != shape:
                raise ArtifactError(f"calibration {name} has shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all() or (t < 0).any():
                raise ArtifactError(f"calibration: {name} has NaN, infinite or negative values; expected finite values >= 0")
        if not isinstance(self.seconds, (int, float)) or isinstance(self.seconds, bool) or not 0 <= self.seconds < 1e9:
            raise ArtifactError(f"calibration: seconds must be a finite number >= 0, got {str(self.seconds)[:40]!r}")
        if not isinstance(self.extra, dict):
            raise ArtifactError("calibration: extra must be a JSON object")

    def corrected_cost(self) -> torch.Tensor:
        """``cost`` with each scheme scaled by its data-calibrated correction factor."""
        return self.cost * self.correction.view(1, 1, 1, -1, 1, 1)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for name in ("cost", "curvature", "diameter", "correction"):
            h.update(getattr(self, name).contiguous().numpy().tobytes())
        h.update(json.dumps([self.model, self.schemes, self.sink_options, self.window_options, self.estimator]).encode())
        if self.predictors is not None:  # calibrations without predictors hash as before
            h.update(self.predictors.sha256.encode())
        return h.hexdigest()

    def save(self, directory) -> Path:
        from safetensors.torch import save

        directory = Path(directory)
        blob = save({"cost": self.cost.contiguous(), "curvature": self.curvature.contiguous(),
                     "diameter": self.diameter.contiguous(), "correction": self.correction.contiguous()})
        body = {
            "model": self.model, "geometry": vars(self.geometry), "text": self.text, "windows": self.windows,
            "window": self.window, "estimator": self.estimator, "cost_unit": self.cost_unit, "schemes": self.schemes,
            "sink_options": self.sink_options, "window_options": self.window_options, "seconds": self.seconds,
            "extra": self.extra, "tensors_sha256": hashlib.sha256(blob).hexdigest(), "content_hash": self.content_hash(),
        }
        if self.predictors is not None:
            body["predictors_sha256"] = self.predictors.sha256
        # Both files are swapped in together: an interruption leaves the previous calibration whole.
        with staged_directory(directory, is_ours=lambda d: not any(d.iterdir()) or (d / JSON_NAME).is_file(),
                              what="calibration") as staging:
            atomic_write_bytes(staging / TENSORS_NAME, blob)
            if self.predictors is not None:
                from kvcompile.kv.predict import FILE_NAME

                self.predictors.save(staging / FILE_NAME)
            save_json_artifact(staging / JSON_NAME, "calibration", FORMAT_VERSION, body)
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory) -> "Calibration":
        from safetensors.torch import load

        directory = Path(directory)
        if directory.is_file():
            if directory.name != JSON_NAME:
                raise ArtifactError(f"{directory} is a file; expected a calibration directory (from `kvcompile calibrate`) "
                                    f"or its {JSON_NAME}")
            directory = directory.parent
        elif not directory.is_dir():
            raise ArtifactError(f"calibration directory not found: {directory}; expected the output of `kvcompile calibrate`")
        doc = load_json_artifact(directory / JSON_NAME, "calibration", FORMAT_VERSION)
        tensors_path = directory / TENSORS_NAME
        if not tensors_path.is_file():
            raise ArtifactError(f"{tensors_path} is missing; a calibration is {JSON_NAME} + {TENSORS_NAME}")
        blob = tensors_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
            raise ArtifactError(f"{tensors_path} does not match the sha256 recorded in {JSON_NAME}")
        try:
            tensors = load(blob)
        except Exception as e:  # safetensors raises its own SafetensorError on a malformed file
            raise ArtifactError(f"{tensors_path}: not a readable safetensors file ({str(e)[:120]})") from None
        predictors = None
        if doc.get("predictors_sha256") is not None:
            from kvcompile.kv.predict import FILE_NAME, resolve

            predictors = resolve({"path": str(directory / FILE_NAME), "sha256": str(doc["predictors_sha256"])},
                                 f"calibration {directory}")
        try:
            return cls(
                model=doc["model"], geometry=_geometry(doc["geometry"]), text=doc["text"], windows=doc["windows"],
                window=doc["window"], estimator=doc["estimator"], cost_unit=doc["cost_unit"], schemes=list(doc["schemes"]),
                sink_options=list(doc["sink_options"]), window_options=list(doc["window_options"]),
                cost=tensors["cost"], curvature=tensors["curvature"], diameter=tensors["diameter"],
                correction=tensors.get("correction"),
                seconds=doc.get("seconds", 0.0), extra=doc.get("extra", {}), predictors=predictors,
                directory=directory,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{directory / JSON_NAME}: calibration is missing or mistypes field {str(e)[:80]}") from None
