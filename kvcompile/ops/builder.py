"""A small helper for writing ONNX function bodies and graphs as straight-line code.

``b = Builder("kv"); y = b.op("Mul", x, b.const(2.0))`` appends a node and returns its output
name.  Names are unique within the builder (prefix + counter), constants become ``Constant``
nodes (so a body is self-contained and can be a model-local function).  ``onnx`` is imported
lazily, which keeps ``import kvcompile`` light.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The standard opset the exported graphs and function bodies use (ONNX Runtime 1.32 runs <= 27;
#: every op used here exists unchanged since opset 21).
OPSET = 21
#: Largest int64, used as "to the end" in Slice.
INT_MAX = np.iinfo(np.int64).max


class Builder:
    """Accumulates nodes; ``op`` returns the output name (or names, with ``outputs=n``)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.calls: list[tuple[Any, dict]] = []  # (OpSpec, attrs) of kvcompile ops emitted
        #: output name -> (dtype, rank) of each kvcompile op emitted: a graph declares them (value_info),
        #: since ONNX Runtime cannot infer a custom kernel's variadic output types
        self.types: dict[str, tuple[str, int]] = {}
        self._count = 0

    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str = "",
           name_hint: str | None = None, **attrs) -> Any:
        from onnx import helper

        if isinstance(outputs, int):
            names = [self.fresh(name_hint or op_type) for _ in range(outputs)]
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh("node_" + op_type),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def value_infos(self, exclude=()) -> list:
        """ValueInfoProtos of the kvcompile ops' outputs (:attr:`types`) not named in ``exclude``."""
        from onnx import helper

        codes = {"float32": 1, "float16": 10, "int8": 3}
        return [helper.make_tensor_value_info(name, codes[dtype], [None] * rank)
                for name, (dtype, rank) in self.types.items() if name not in set(exclude)]

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return self.op("Constant", outputs=[name], value=tensor)

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes, slice bounds)."""
        return self.const(list(values), np.int64, hint="i64")

    def scalar_i64(self, value: int) -> str:
        return self.const(value, np.int64, hint="i64")

    # ------------------------------------------------------------------ shape helpers
    def dim(self, x: str, axis: int) -> str:
        """Dimension ``axis`` of ``x`` as a 1-D int64 tensor of one element."""
        bounds = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
        return self.op("Shape", x, **bounds)

    def slice_axis(self, x: str, start: str, stop: str, axis: int) -> str:
        """``x`` sliced along ``axis`` from 1-D int64 ``start`` to ``stop``."""
        return self.op("Slice", x, start, stop, self.i64(axis))

    def reshape(self, x: str, shape: str) -> str:
        # allowzero: a 0 in a computed shape means an empty axis (an empty cache), not "copy".
        return self.op("Reshape", x, shape, allowzero=1)
