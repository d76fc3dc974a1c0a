"""TensorRT plugins (``IPluginV3``, namespace ``kvcompile``) generated from the op specs.

One plugin class serves every :class:`~kvcompile.ops.spec.OpSpec`: the creator's field names are
the spec's attributes (strings as CHAR, ints as INT32, the types the ONNX parser delivers), output
types and the supported formats are the spec's ports (linear layout, exact dtype), and output
shapes are symbolic expressions of the input shapes (:func:`output_shape_exprs`: the reference's
:class:`~kvcompile.kv.segments.SegmentRule` evaluated on TensorRT dimension expressions).
``enqueue`` wraps TensorRT's device buffers as torch tensors and runs :func:`run_op` — the Triton append kernel where the scheme has one, the torch
reference otherwise — then copies the results into TensorRT's outputs on its stream.

Works with ``tensorrt`` and ``tensorrt_rtx`` alike: the module is passed in, never imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcompile.ops.spec import OpSpec, get_op, op_names
from kvcompile.quant import get_scheme
from kvcompile.quant.base import part_layout

NAMESPACE = "kvcompile"


def attrs_from_fields(spec: OpSpec, fields) -> dict:
    """Plugin fields (as the ONNX parser or a serialized engine delivers them) -> op attributes."""
    attrs = {}
    for f in fields:
        kind = next((a.kind for a in spec.attributes if a.name == f.name), None)
        if kind is None:
            continue
        data = np.asarray(f.data)
        attrs[f.name] = bytes(data.astype(np.uint8)).split(b"\0")[0].decode() if kind == "string" else int(data.ravel()[0])
    return spec.check_attrs(attrs)


def fields_of(trt, spec: OpSpec, attrs: dict | None):
    """PluginFieldCollection of ``attrs`` (or of empty placeholders, for the creator's field names).

    The arrays are kept on the returned collection (``.arrays``): TensorRT reads them later."""
    out, arrays = [], []
    for a in spec.attributes:
        if a.kind == "string":
            value = np.frombuffer((attrs[a.name] if attrs else "").encode() + b"\0", dtype=np.int8) if attrs \
                else np.array([], dtype=np.int8)
            out.append(trt.PluginField(a.name, value, trt.PluginFieldType.CHAR))
        else:
            value = np.array([attrs[a.name]] if attrs else [], dtype=np.int32)
            out.append(trt.PluginField(a.name, value, trt.PluginFieldType.INT32))
        arrays.append(value)
    collection = trt.PluginFieldCollection(out)
    try:
        collection.arrays = arrays
    except AttributeError:  # bindings without a __dict__: keep them on the module instead
        _KEEP_ALIVE.append(arrays)
    return collection


_KEEP_ALIVE: list = []


def output_shape_exprs(trt, spec: OpSpec, attrs: dict, inputs, expr) -> list:
    """Symbolic output dims for ``spec`` given input ``DimsExprs`` (see kvcompile.ops.cache_update)."""
    op = trt.DimensionOperation

    def c(v):
        return expr.constant(int(v))

    def f(kind, a, b):
        return expr.operation(getattr(op, kind), a, b)

    def dims(*values):
        d = trt.DimsExprs(len(values))
        for i, v in enumerate(values):
            d[i] = v
        return d

    ports_out = spec.outputs(attrs)
    if spec.name == "KVQuantize":
        x = inputs[0]
        return [dims(x[0], x[1], x[2] if p.shape[2] == "T" else f("FLOOR_DIV", x[2], c(p.shape[2].split("/")[1])),
                     c(int(p.shape[3]))) for p in ports_out]
    if spec.name == "KVDequantize":
        x = inputs[0]
        return [dims(x[0], x[1], x[2], c(attrs["head_dim"]))]
    if spec.name != "KVCacheUpdate":
        raise NotImplementedError(spec.name)
    from kvcompile.kv.segments import TensorRTDims
    from kvcompile.ops.cache_update import class_scheme, segment_rule, segments

    d = attrs["head_dim"]
    states = inputs[len(inputs) - 1]
    index, past = 0, None
    rows_per: dict[str, list[int]] = {}
    for seg in segments(attrs):
        layout = part_layout(class_scheme(attrs, seg), d)
        rows_per[seg] = [p.rows_per for p in layout]
        t = inputs[index][2]
        past = t if past is None else f("SUM", past, t)
        index += len(layout)
    total = f("SUM", past, states[2])
    length = segment_rule(attrs).lengths(total, TensorRTDims(trt, expr))
    out = []
    i = 0
    for seg in segments(attrs):
        for r in rows_per[seg]:
            p = ports_out[i]
            rows = length[seg] if r == 1 else f("FLOOR_DIV", length[seg], c(r))
            out.append(dims(states[0], states[1], rows, c(int(p.shape[3]))))
            i += 1
    out.append(dims(states[0], states[1], total, c(d)))
    return out


def run_op(spec: OpSpec, attrs: dict, tensors: list) -> tuple:
    """What ``enqueue`` computes, on torch tensors of any device: the op's reference, with the
    Triton append kernel quantizing where it can run (GPU, or CPU under the interpreter)."""
    if spec.name == "KVCacheUpdate":
        from kvcompile.kernels import available, quantize_for_store
        from kvcompile.ops.cache_update import run_cache_update

        kernels = available(tensors[-1].device.type)[0]
        return run_cache_update(attrs, tensors, quantize_for_store if kernels else None)
    return spec.reference(attrs, *tensors)


TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8"}


def make_plugin_classes(trt) -> tuple[type, type]:
    """``(Plugin, Creator)`` classes bound to a TensorRT module (``tensorrt`` or ``tensorrt_rtx``)."""

    def dtype(name: str):
        return getattr(trt.DataType, TRT_DTYPE_NAMES[name])

    class KvcompilePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: OpSpec, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec, self.attrs, self.phase = spec, attrs, phase
            self.plugin_name = spec.name
            self.plugin_namespace = NAMESPACE
            self.plugin_version = str(spec.version)
            self.num_outputs = len(spec.outputs(attrs))
            self.timing_cache_id = ""
            self._in = [p.dtype for p in spec.inputs(attrs)]
            self._out = [p.dtype for p in spec.outputs(attrs)]

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return KvcompilePlugin(self.spec, dict(self.attrs), self.phase)

        def get_output_data_types(self, input_types):
            return [dtype(t) for t in self._out]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return output_shape_exprs(trt, self.spec, self.attrs, inputs, expr_builder)

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            want = (self._in + self._out)[pos]
            return desc.format == trt.TensorFormat.LINEAR and desc.type == dtype(want)

        def configure_plugin(self, inp, out):
            pass

        def on_shape_change(self, inp, out):
            pass

        def get_fields_to_serialize(self):
            # TensorRT keeps pointers into the fields' arrays: they must outlive this call
            self._fields = fields_of(trt, self.spec, self.attrs)
            return self._fields

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            def wrap(ptr, desc, name):
                return _tensor_from_pointer(ptr, tuple(desc.dims), getattr(torch, name))

            ins = [wrap(p, d, n) for p, d, n in zip(inputs, input_desc, self._in)]
            outs = [wrap(p, d, n) for p, d, n in zip(outputs, output_desc, self._out)]
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                results = run_op(self.spec, self.attrs, ins)
                for dst, src in zip(outs, results):
                    if dst.numel():
                        dst.copy_(src.reshape(dst.shape))
            return 0

    class KvcompilePluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, spec: OpSpec):
            trt.IPluginCreatorV3One.__init__(self)
            self.spec = spec
            self.name = spec.name
            self.plugin_namespace = NAMESPACE
            self.plugin_version = str(spec.version)
            self.field_names = fields_of(trt, spec, None)

        def create_plugin(self, name, fields, phase):
            return KvcompilePlugin(self.spec, attrs_from_fields(self.spec, fields), phase)

    return KvcompilePlugin, KvcompilePluginCreator


def _tensor_from_pointer(ptr: int, shape: tuple, dtype) -> Any:
    """A torch CUDA tensor viewing device memory owned by TensorRT (no copy)."""
    import torch

    if int(np.prod(shape)) == 0:
        return torch.empty(shape, dtype=dtype, device="cuda")

    class _Buffer:
        __cuda_array_interface__ = {"shape": shape, "typestr": torch.empty(0, dtype=dtype).numpy().dtype.str,
                                    "data": (int(ptr), False), "version": 3}

    return torch.as_tensor(_Buffer(), device="cuda")


def register_plugins(trt) -> list:
    """Register a creator for every kvcompile op with TensorRT's plugin registry (idempotent)."""
    _, creator_class = make_plugin_classes(trt)
    registry = trt.get_plugin_registry()
    creators = []
    for name in op_names():
        existing = registry.get_creator(name, "1", NAMESPACE) if hasattr(registry, "get_creator") else None
        if existing is not None:
            creators.append(existing)
            continue
        creator = creator_class(get_op(name))
        registry.register_creator(creator, NAMESPACE)
        creators.append(creator)
    return creators
