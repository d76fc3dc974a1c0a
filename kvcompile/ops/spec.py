"""One specification per custom op, from which everything else about the op follows.

An :class:`OpSpec` names the op (domain ``kvcompile``, version), its attributes, and — given
concrete attribute values — its inputs and outputs with dtypes and symbolic shapes.  It carries
two implementations of one meaning:

* ``reference(attrs, *tensors)``: plain torch, the oracle in tests;
* ``body(builder, attrs, inputs)``: standard ONNX ops, emitted as a model-local function so a
  stock ONNX Runtime runs the graph.

From the spec follow :meth:`OpSpec.function` (the ``FunctionProto``, one overload per distinct
attribute set), :meth:`OpSpec.emit` (a node calling it) and :meth:`OpSpec.plugin_fields` (the
TensorRT plugin fields: the attributes, typed).  Adding an op = one module defining a spec and
its reference, registered with :func:`register_op`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvcompile.ops.builder import OPSET, Builder

DOMAIN = "kvcompile"


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str  # "string" | "int" | "float"
    doc: str


@dataclass(frozen=True)
class Port:
    """One input or output: name, ONNX element type name, symbolic shape."""

    name: str
    dtype: str  # "float32", "float16", "int8"
    shape: tuple[str, ...]
    doc: str = ""


Attrs = dict[str, Any]


@dataclass(frozen=True)
class OpSpec:
    name: str
    version: int
    doc: str
    attributes: tuple[Attribute, ...]
    inputs: Callable[[Attrs], tuple[Port, ...]]
    outputs: Callable[[Attrs], tuple[Port, ...]]
    reference: Callable[..., tuple]  # (attrs, *torch tensors) -> tuple of torch tensors
    body: Callable[[Builder, Attrs, list[str]], list[str]]  # (builder, attrs, input names) -> output names
    domain: str = DOMAIN

    def check_attrs(self, attrs: Attrs) -> Attrs:
        names = {a.name for a in self.attributes}
        if set(attrs) != names:
            raise ValueError(f"{self.name}: expected attributes {sorted(names)}, got {sorted(attrs)}")
        for a in self.attributes:
            value = attrs[a.name]
            ok = {"string": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, float)}[a.kind]
            if not ok:
                raise ValueError(f"{self.name}: attribute {a.name} must be {a.kind}, got {attrs[a.name]!r}")
        return attrs

    def overload(self, attrs: Attrs) -> str:
        """The function overload that implements this attribute set (attributes are baked into bodies)."""
        return ";".join(f"{a.name}={attrs[a.name]}" for a in self.attributes)

    def function(self, attrs: Attrs) -> tuple[Any, list[tuple["OpSpec", Attrs]]]:
        """``(FunctionProto, ops its body calls)`` for one attribute set."""
        from onnx import helper

        self.check_attrs(attrs)
        ins = [p.name for p in self.inputs(attrs)]
        outs = [p.name for p in self.outputs(attrs)]
        b = Builder(self.name)
        produced = self.body(b, attrs, ins)
        for name, value in zip(outs, produced):
            b.op("Identity", value, outputs=[name])
        opsets = [helper.make_opsetid("", OPSET)]
        if b.calls:
            opsets.append(helper.make_opsetid(DOMAIN, 1))
        proto = helper.make_function(self.domain, self.name, ins, outs, b.nodes, opsets,
                                     doc_string=self.doc, overload=self.overload(attrs))
        return proto, b.calls

    def emit(self, b: Builder, attrs: Attrs, inputs: list[str], outputs: list[str] | None = None) -> list[str]:
        """Append a node calling this op; returns its output names."""
        self.check_attrs(attrs)
        n = len(self.outputs(attrs))
        names = outputs or [b.fresh(f"{self.name}_{p.name}") for p in self.outputs(attrs)]
        assert len(names) == n
        from onnx import helper

        # plugin_namespace / plugin_version: how TensorRT's ONNX parser finds this op's plugin
        # creator; ONNX Runtime and the ONNX checker ignore attributes a function does not declare.
        b.nodes.append(helper.make_node(self.name, inputs, names, name=b.fresh("node_" + self.name), domain=self.domain,
                                        overload=self.overload(attrs), plugin_namespace=self.domain,
                                        plugin_version=str(self.version), **attrs))
        b.calls.append((self, dict(attrs)))
        b.types.update((name, (p.dtype, len(p.shape))) for name, p in zip(names, self.outputs(attrs)))
        return names

    def single_node_model(self, attrs: Attrs) -> Any:
        """A ModelProto with one node of this op (graph I/O named after the ports): for tests and tools."""
        from onnx import helper

        dtypes = {"float32": 1, "float16": 10, "int8": 3}
        ins, outs = self.inputs(attrs), self.outputs(attrs)
        b = Builder("g")
        self.emit(b, attrs, [p.name for p in ins], [p.name for p in outs])

        def info(p: Port):
            return helper.make_tensor_value_info(p.name, dtypes[p.dtype], [f"{p.name}_{i}" for i in range(len(p.shape))])

        graph = helper.make_graph(b.nodes, self.name, [info(p) for p in ins], [info(p) for p in outs])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                                 functions=collect_functions(b.calls), ir_version=10)

    def plugin_fields(self, attrs: Attrs) -> dict[str, Any]:
        """TensorRT plugin fields: the attributes (strings as bytes, ints as int32, floats as float32)."""
        self.check_attrs(attrs)
        return {a.name: attrs[a.name] for a in self.attributes}


_OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def get_op(name: str) -> OpSpec:
    return _OPS[name]


def op_names() -> list[str]:
    return sorted(_OPS)


def collect_functions(calls: list[tuple[OpSpec, Attrs]]) -> list[Any]:
    """Every FunctionProto the given calls need, nested calls included, each overload once."""
    seen: dict[tuple[str, str], Any] = {}
    stack = list(calls)
    while stack:
        spec, attrs = stack.pop()
        key = (spec.name, spec.overload(attrs))
        if key in seen:
            continue
        proto, nested = spec.function(attrs)
        seen[key] = proto
        stack.extend(nested)
    return [seen[k] for k in sorted(seen)]
