"""``export_onnx``: a loaded model + a PrecisionMap -> an export directory.

Directory contents (written to a temporary sibling and renamed into place, so a failed export
leaves nothing behind):

* ``model.onnx`` + ``model.onnx.data`` (weights as external data): the decoder graph of
  :mod:`kvcompile.export.decoder`, opset 21 plus the ``kvcompile`` domain, whose ops are
  model-local functions (so a stock ONNX Runtime runs it) carrying the map's schemes as
  attributes; ``metadata_props`` hold the whole map, its hash, the calibration hash and the
  kvcompile version.  ``onnx.checker`` with ``full_check`` passes before anything is renamed.
* ``kvcompile_export.json``: the manifest (artifact ``onnx_export``, ``format_version`` 2): model
  spec and geometry, the map, the cache layout (graph I/O per head group), max context, the
  graph's files, and ``targets``: one section per target that built something from the graph
  (``onnx``: the Triton config; ``trt``: the engine), each added by :func:`add_target_section`
  and listing its files with their sizes.
* ``config.pbtxt``: a Triton Inference Server config for the ONNX Runtime backend.
* ``tokenizer/``: the model's tokenizer, when it can be saved.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvcompile.artifacts import load_json_artifact, save_json_artifact, staged_directory
from kvcompile.errors import ArtifactError, ExportError, KvcompileError
from kvcompile.export.layout import HeadGroup, cache_layout, layout_to_json
from kvcompile.ops.builder import OPSET
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.version import __version__

FORMAT_VERSION = 2  # 2: per-target sections under "targets"
MANIFEST = "kvcompile_export.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TRITON_CONFIG = "config.pbtxt"
ONNX_DTYPES = {"float32": 1, "float16": 10, "int8": 3}
#: The manifest's geometry: each an integer from 1 to this bound.
GEOMETRY_LIMITS = {"num_layers": 4096, "num_kv_heads": 1024, "num_q_heads": 65536, "head_dim": 4096,
                   "max_positions": 1 << 24}

GraphBuilder = Callable[..., Any]
_GRAPH_BUILDERS: dict[str, GraphBuilder] = {}


def register_graph_builder(model_type: str, build: GraphBuilder) -> None:
    """An architecture whose graph the generic decoder builder cannot describe:
    ``build(model, pmap, groups, max_context, fused=True, window_op=True) -> (Builder, Weights, cache output
    names)``."""
    _GRAPH_BUILDERS[model_type] = build


def _builder_for(config) -> GraphBuilder:
    """The registered builder for the config's architecture, else the generic decoder graph with
    the adapter's :class:`~kvcompile.models.adapters.DecoderTraits` (every adapter has them)."""
    import functools

    from kvcompile.export.decoder import build_decoder_graph
    from kvcompile.models.adapters import adapter_for

    if config.model_type in _GRAPH_BUILDERS:
        return _GRAPH_BUILDERS[config.model_type]
    try:
        adapter = adapter_for(config)
    except KvcompileError as e:
        raise ExportError(f"the onnx target cannot export: {e}") from None
    return functools.partial(build_decoder_graph, traits=adapter.decoder_traits(config))


@dataclass(frozen=True)
class ExportedModel:
    """A loaded export manifest."""

    path: Path
    model: str
    model_type: str
    geometry: dict
    max_context: int
    pmap: PrecisionMap
    groups: list[HeadGroup]
    vocab_size: int
    kvcompile_version: str
    targets: dict  # target name -> its manifest section (see add_target_section)

    @property
    def trt(self) -> dict | None:
        """The ``trt`` target's section (engine file, TensorRT flavour, max batch), if it built one."""
        return self.targets.get("trt")

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer"
        return p if p.is_dir() else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExportedModel":
        """Load and cross-check an export: manifest fields, map, cache layout, graph I/O and files.

        Any inconsistency is one :class:`ExportError` / :class:`ArtifactError` line naming what was
        expected, before a runtime sees the graph.
        """
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise ExportError(f"{path} is not a kvcompile export directory (no {MANIFEST}); create one with "
                              "`kvcompile export`")
        manifest = path / MANIFEST
        doc = load_json_artifact(manifest, "onnx_export", FORMAT_VERSION)
        fields = {"model": str, "model_type": str, "geometry": dict, "max_context": int, "vocab_size": int,
                  "kvcompile_version": str, "precision_map": dict, "precision_map_hash": str, "cache_layout": list}
        for name, kind in fields.items():
            if type(doc.get(name)) is not kind:
                raise ArtifactError(f"{manifest}: field {name!r} must be a {kind.__name__}, got {str(doc.get(name))[:40]!r}")
        if not 1 <= doc["max_context"] <= 1 << 20 or not 1 <= doc["vocab_size"] <= 1 << 24:
            raise ArtifactError(f"{manifest}: max_context and vocab_size must be positive and sensible, got "
                                f"{doc['max_context']} and {doc['vocab_size']}")
        pmap = PrecisionMap.from_json_body(doc["precision_map"], str(manifest))
        geometry = doc["geometry"]
        if not isinstance(geometry, dict) or set(geometry) - {"layer_windows"} != set(GEOMETRY_LIMITS) or not all(
                type(geometry[k]) is int and 1 <= geometry[k] <= hi for k, hi in GEOMETRY_LIMITS.items()):
            raise ArtifactError(f"{manifest}: geometry must hold exactly {', '.join(GEOMETRY_LIMITS)} as positive integers "
                                "(and layer_windows for a model with sliding windows)")
        windows = geometry.get("layer_windows", [])
        if not isinstance(windows, list) or any(type(x) is not int or x < 0 for x in windows):
            raise ArtifactError(f"{manifest}: geometry.layer_windows must list a window (or 0) per layer")
        pmap.check_model(geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"], tuple(windows))
        if doc["max_context"] > geometry["max_positions"]:
            raise ArtifactError(f"{manifest}: max_context {doc['max_context']} exceeds the model's "
                                f"{geometry['max_positions']} positions")
        if pmap.content_hash() != doc["precision_map_hash"]:
            raise ArtifactError(f"{manifest}: precision_map does not match its precision_map_hash; the manifest was edited")
        groups = cache_layout(pmap)
        if json.loads(json.dumps(layout_to_json(groups))) != doc["cache_layout"]:  # tuples as JSON lists
            raise ArtifactError(f"{manifest}: cache_layout is not the layout of its precision map; re-run `kvcompile export`")
        targets = _check_targets(path, doc.get("targets"), manifest)
        _check_files(path, doc.get("files"))
        _check_graph(path / MODEL_FILE, groups, doc)
        if pmap.predictors is not None:
            _register_predictors(path, pmap, manifest)
        return cls(path, doc["model"], doc["model_type"], geometry, doc["max_context"], pmap, groups,
                   doc["vocab_size"], doc["kvcompile_version"], targets)


def _register_predictors(path: Path, pmap: PrecisionMap, manifest: Path) -> None:
    """Make the export's copy of the map's predictors the one this process resolves (the map names
    the calibration's path, which a deployment machine need not have)."""
    from kvcompile.kv.predict import FILE_NAME, CrossLayerPredictors, register

    file = path / FILE_NAME
    if not file.is_file():
        raise ArtifactError(f"{manifest}: the map predicts across layers but {FILE_NAME} is missing; re-run "
                            "`kvcompile export`")
    predictors = CrossLayerPredictors.from_bytes(file.read_bytes(), str(file))
    if predictors.sha256 != pmap.predictors["sha256"]:
        raise ArtifactError(f"{file}: content sha256 differs from the {pmap.predictors['sha256'][:12]}… the map names; "
                            "re-run `kvcompile export`")
    register(predictors)


def _check_targets(path: Path, targets, manifest: Path) -> dict:
    """Each target section is a JSON object whose ``files`` (relative path -> bytes) lie in the
    export directory at those sizes; what else a section holds is its target's business."""
    if not isinstance(targets, dict) or "onnx" not in targets:
        raise ArtifactError(f"{manifest}: 'targets' must be an object with at least the 'onnx' section; "
                            "re-run `kvcompile export`")
    for name, section in targets.items():
        files = section.get("files") if isinstance(section, dict) else None
        if not isinstance(files, dict):
            raise ArtifactError(f"{manifest}: targets.{name} must be an object with a 'files' object (name -> bytes)")
        for file, size in files.items():
            if not isinstance(file, str) or not file or type(size) is not int \
                    or any(not part or part.startswith(".") or "\\" in part for part in file.split("/")):
                raise ArtifactError(f"{manifest}: targets.{name}.files must map relative file paths inside the export "
                                    f"to byte counts, got {str(file)[:40]!r}")
            if not (path / file).is_file():
                raise ArtifactError(f"{manifest}: {file} of target {name!r} is missing; re-run `kvcompile export "
                                    f"--target {name}`")
            if (path / file).stat().st_size != size:
                raise ArtifactError(f"{manifest}: {file} has {(path / file).stat().st_size} bytes, the {name} target "
                                    f"recorded {size}; re-run `kvcompile export --target {name}`")
    return targets


def add_target_section(export_dir: str | os.PathLike, name: str, section: dict, files: list[str]) -> None:
    """Record target ``name``'s ``section`` and its ``files`` (written beside the manifest) in the
    manifest of the export in ``export_dir`` (replaced atomically).  Targets call this on the
    staged directory, before it is renamed into place."""
    export_dir = Path(export_dir)
    doc = load_json_artifact(export_dir / MANIFEST, "onnx_export", FORMAT_VERSION)
    body = {k: v for k, v in doc.items() if k not in ("artifact", "format_version", "kvcompile_version")}
    body["targets"] = {**body.get("targets", {}),
                       name: {**section, "files": {f: (export_dir / f).stat().st_size for f in files}}}
    save_json_artifact(export_dir / MANIFEST, "onnx_export", FORMAT_VERSION, body)


def _file_record(path: Path) -> dict:
    """What the manifest records of the exported files: sizes, and the graph's sha256 (the weights,
    up to gigabytes, are checked by size only)."""
    return {"model": MODEL_FILE, "weights": DATA_FILE,
            "sizes": {name: (path / name).stat().st_size for name in (MODEL_FILE, DATA_FILE)},
            "model_sha256": hashlib.sha256((path / MODEL_FILE).read_bytes()).hexdigest()}


def _check_files(path: Path, record) -> None:
    """The model file and its weights exist, with the sizes (and graph hash) recorded at export."""
    for name in (MODEL_FILE, DATA_FILE):
        if not (path / name).is_file():
            raise ExportError(f"{path}: {name} is missing; re-run `kvcompile export`")
    if not isinstance(record, dict) or record.get("model") != MODEL_FILE or record.get("weights") != DATA_FILE \
            or not isinstance(record.get("sizes"), dict) or set(record["sizes"]) != {MODEL_FILE, DATA_FILE}:
        raise ArtifactError(f"{path / MANIFEST}: 'files' must record {MODEL_FILE} and {DATA_FILE} with their sizes; "
                            "re-run `kvcompile export`")
    for name, size in record["sizes"].items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ExportError(f"{path}: {name} has {actual} bytes, the export recorded {str(size)[:20]}; the file is "
                              "truncated or was replaced: re-run `kvcompile export`")
    if hashlib.sha256((path / MODEL_FILE).read_bytes()).hexdigest() != record.get("model_sha256"):
        raise ExportError(f"{path}: {MODEL_FILE} is not the graph the export wrote (sha256 differs); re-run `kvcompile export`")


def _check_graph(model_path: Path, groups: list[HeadGroup], doc: dict) -> None:
    """The graph's cache inputs and outputs are the layout's ports, its logits the vocabulary, and it
    carries the manifest's map and context."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # a protobuf DecodeError or an OSError: the file is not a readable ONNX model
        raise ExportError(f"{model_path}: not a readable ONNX model ({type(e).__name__}); re-run `kvcompile export`") from None
    types = {v: k for k, v in ONNX_DTYPES.items()}
    ins = [(i.name, types.get(i.type.tensor_type.elem_type)) for i in model.graph.input[1:]]
    outs = [(o.name, types.get(o.type.tensor_type.elem_type)) for o in model.graph.output[1:]]
    if ins != [(p.past, p.dtype) for g in groups for p in g.ports] or \
            outs != [(p.present, p.dtype) for g in groups for p in g.ports]:
        raise ExportError(f"{model_path}: the graph's cache inputs/outputs do not match the manifest's cache_layout; "
                          "re-run `kvcompile export`")
    vocab = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    meta = {p.key: p.value for p in model.metadata_props}
    if (meta.get("kvcompile.precision_map_hash"), meta.get("kvcompile.max_context"), vocab) != \
            (doc["precision_map_hash"], str(doc["max_context"]), doc["vocab_size"]):
        raise ExportError(f"{model_path}: the graph was built for another map, context or vocabulary than the manifest "
                          "says; re-run `kvcompile export`")


def _check_exportable(pmap: PrecisionMap, head_dim: int) -> None:
    from kvcompile.ops.lowering import check_lowerable

    if pmap.predictors is not None:
        from kvcompile.kv.predict import resolve

        p = resolve(pmap.predictors)  # found and checked, or one line
        if (p.num_layers, p.num_kv_heads, p.head_dim) != (pmap.num_layers, pmap.num_kv_heads, pmap.head_dim):
            raise ExportError(f"the map's predictors are for {p.num_layers} layers x {p.num_kv_heads} kv heads x "
                              f"{p.head_dim}; expected the map's geometry")
    for layer, head, stream in pmap.sites():
        for scheme in pmap.class_schemes(layer, head, stream):
            check_lowerable(scheme, head_dim)


def build_onnx_model(lm, pmap: PrecisionMap, max_context: int, fused_attention: bool = True,
                     window_attention: bool = True):
    """The ModelProto (weights inline) and the cache layout; raises ExportError for what it cannot emit.

    ``fused_attention``: attention through ``KVAttention`` nodes (default); else a ``KVCacheUpdate``
    node per stream and standard attention over the de-quantized cache (the Python plugins' form).
    ``window_attention``: sliding-window layers' packed groups through ``KVWindowAttention`` nodes
    (with ``fused_attention``; default); else in standard ops (the inlined quantizer bodies)."""
    from onnx import helper, numpy_helper

    from kvcompile.ops.spec import DOMAIN, collect_functions

    g = lm.geometry
    pmap.check_model(g.num_layers, g.num_kv_heads, g.head_dim, g.layer_windows)
    _check_exportable(pmap, g.head_dim)
    build = _builder_for(lm.model.config)
    groups = cache_layout(pmap)
    b, weights, cache_outputs = build(lm.model, pmap, groups, max_context, fused=fused_attention,
                                      window_op=window_attention)
    _notice_portable(b.calls)

    def rows(grp, p, prefix):
        if grp.window:  # a window layer holds its own row count (at most W - 1 between steps)
            return f"{prefix}_window_sequence"
        return f"{prefix}_sequence" if p.rows_per == 1 else f"{prefix}_sequence_div_{p.rows_per}"

    inputs = [helper.make_tensor_value_info("input_ids", 7, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", 1, ["batch", "sequence", lm.model.config.vocab_size])]
    for grp in groups:
        for p in grp.ports:
            inputs.append(helper.make_tensor_value_info(p.past, ONNX_DTYPES[p.dtype],
                                                        ["batch", len(grp.heads), rows(grp, p, "past"), p.width]))
            outputs.append(helper.make_tensor_value_info(p.present, ONNX_DTYPES[p.dtype],
                                                         ["batch", len(grp.heads), rows(grp, p, "total"), p.width]))
    assert [o.name for o in outputs[1:]] == cache_outputs
    initializers = [numpy_helper.from_array(a, name) for name, a in weights.arrays.items()]
    graph = helper.make_graph(b.nodes, f"kvcompile_{lm.model.config.model_type}", inputs, outputs, initializers,
                              value_info=b.value_infos(exclude=[o.name for o in outputs]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=collect_functions(b.calls), ir_version=10,
                              producer_name="kvcompile", producer_version=__version__)
    meta = {"kvcompile.version": __version__, "kvcompile.model": lm.name,
            "kvcompile.precision_map": json.dumps(pmap.to_json_body(), sort_keys=True),
            "kvcompile.precision_map_hash": pmap.content_hash(),
            "kvcompile.calibration_hash": pmap.calibration_hash or "", "kvcompile.max_context": str(max_context)}
    helper.set_model_props(model, meta)
    return model, groups


def _notice_portable(calls) -> None:
    """One notice line if some head groups run KVAttention's function body (no native kernel)."""
    from kvcompile.quant import get_scheme
    from kvcompile.quant.base import native_readable

    portable = [attrs for spec, attrs in calls if spec.name == "KVAttentionPortable"]
    if portable:
        import logging

        from kvcompile.ops.cache_update import parse_age_tiers

        names = {attrs[f"{s}_{c}_scheme"] for attrs in portable for s in ("key", "value") for c in ("sink", "recent", "bulk")}
        names |= {n for attrs in portable for s in ("key", "value") for n, _ in parse_age_tiers(attrs[f"{s}_age_tiers"])}
        lacking = sorted(n for n in names if not native_readable(get_scheme(n)))
        logging.getLogger("kvcompile").warning(
            f"kvcompile: notice: {len(portable)} head group(s) use formats the native library cannot read "
            f"({', '.join(lacking)}); they run KVAttention's ONNX function body")


TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8"}


def triton_model_name(model: str) -> str:
    """A model name as Triton wants it (letters, digits, ``-`` and ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in model.split("/")[-1]) or "kvcompile"


TRITON_PLATFORMS = {"onnxruntime_onnx": "model.onnx and model.onnx.data", "tensorrt_plan": "model.plan (model.engine)"}


def triton_config(model: str, groups: list[HeadGroup], vocab_size: int, platform: str = "onnxruntime_onnx") -> str:
    """``config.pbtxt`` for Triton Inference Server serving the export: its ONNX Runtime backend
    (``model.onnx``) or its TensorRT backend (``platform="tensorrt_plan"``: ``model.engine``).

    The cache travels with each request (past inputs -> present outputs), as in ONNX Runtime GenAI;
    dims are ``[batch, heads, positions, width]`` with -1 for the variable ones.
    """
    def tensor(name: str, dtype: str, dims: list[int]) -> str:
        return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'

    inputs = [tensor("input_ids", "TYPE_INT64", [-1, -1])]
    outputs = [tensor("logits", "TYPE_FP32", [-1, -1, vocab_size])]
    for g in groups:
        for p in g.ports:
            inputs.append(tensor(p.past, TRITON_DTYPES[p.dtype], [-1, len(g.heads), -1, p.width]))
            outputs.append(tensor(p.present, TRITON_DTYPES[p.dtype], [-1, len(g.heads), -1, p.width]))
    name = triton_model_name(model)
    return (f'# written by kvcompile {__version__}: put {TRITON_PLATFORMS[platform]} in <repository>/{name}/1/\n'
            f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n")


def check_output_directory(out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """``out_dir`` as a Path, if an export may be written there: new, empty, or an earlier export
    (replaced only with ``overwrite``); anything else is one :class:`ExportError` line."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ExportError(f"{out} exists and is not a kvcompile export directory; expected a new or export directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (--force) to replace it")
    return out


def resolve_max_context(lm, max_context: int | None) -> int:
    """The export's context limit: ``max_context`` capped at the model's positions (default: those)."""
    limit = lm.geometry.max_positions
    max_context = min(max_context or limit, limit)
    if max_context < 1:
        raise ExportError(f"max_context must be >= 1, got {max_context}")
    return max_context


def export_onnx(lm, pmap: PrecisionMap, out_dir: str | os.PathLike, *, max_context: int | None = None,
                overwrite: bool = True, fused_attention: bool = True, window_attention: bool = True) -> ExportedModel:
    """Export ``lm`` (a :class:`~kvcompile.models.LoadedModel`) with ``pmap`` to ``out_dir``.

    ``max_context`` (default: the model's limit) bounds prefill + generated positions; it sizes
    the RoPE tables, and runtimes refuse longer contexts.  An existing export directory is
    replaced; any other non-empty directory is refused.  ``fused_attention``, ``window_attention``:
    see :func:`build_onnx_model`.
    """
    _check_exportable(pmap, lm.geometry.head_dim)  # before anything is written
    out = check_output_directory(out_dir, overwrite)
    max_context = resolve_max_context(lm, max_context)
    with staged_directory(out, what="export") as tmp:
        write_onnx_export(lm, pmap, tmp, max_context=max_context, fused_attention=fused_attention,
                          window_attention=window_attention)
    return ExportedModel.load(out)


def write_onnx_export(lm, pmap: PrecisionMap, directory: Path, *, max_context: int,
                      fused_attention: bool = True, window_attention: bool = True) -> None:
    """Write the ONNX export into the empty (staged) ``directory``: graph, weights, tokenizer,
    Triton config and the manifest with its ``onnx`` target section.  Targets that build on the
    graph (``trt``) call this on their own staged directory, then :func:`add_target_section`."""
    import onnx

    model, groups = build_onnx_model(lm, pmap, max_context, fused_attention, window_attention)
    nodes = collections.Counter(n.op_type for n in model.graph.node if n.domain == "kvcompile")
    windows_fused = nodes["KVWindowAttention"] > 0
    tmp = Path(directory)
    onnx.save_model(model, tmp / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del model
    onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
    if hasattr(lm.tokenizer, "save_pretrained"):
        lm.tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / TRITON_CONFIG).write_text(triton_config(lm.name, groups, lm.model.config.vocab_size))
    onnx_files = [TRITON_CONFIG]
    if pmap.predictors is not None:  # the graph holds them as weights; the torch reference and validate read the file
        from kvcompile.kv.predict import FILE_NAME, resolve

        (tmp / FILE_NAME).write_bytes(resolve(pmap.predictors).to_bytes())
        onnx_files.append(FILE_NAME)
    g = lm.geometry
    save_json_artifact(tmp / MANIFEST, "onnx_export", FORMAT_VERSION, {
        "model": lm.name, "model_type": lm.model.config.model_type,
        "geometry": {"num_layers": g.num_layers, "num_kv_heads": g.num_kv_heads, "num_q_heads": g.num_q_heads,
                     "head_dim": g.head_dim, "max_positions": g.max_positions,
                     **({"layer_windows": list(g.layer_windows)} if g.layer_windows else {})},
        "vocab_size": lm.model.config.vocab_size, "max_context": max_context, "opset": OPSET,
        "precision_map": pmap.to_json_body(), "precision_map_hash": pmap.content_hash(),
        "cache_layout": layout_to_json(groups),
        "files": _file_record(tmp),
        "targets": {"onnx": {"runtime": "onnxruntime", "triton_config": TRITON_CONFIG,
                             "attention": "standard ops, cross-layer predicted" if pmap.predictors is not None
                             else "fused" if fused_attention else "unfused",
                             "kvcompile_nodes": dict(sorted(nodes.items())),
                             **({"window_attention": "fused" if windows_fused else "standard ops"}
                                if any(g.window and not g.plain for g in groups) else {}),
                             "files": {f: (tmp / f).stat().st_size for f in onnx_files}}},
    })
