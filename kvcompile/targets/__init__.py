"""Export targets by name: ``target(lm, pmap, out_dir, **options) -> ExportedModel``.

``onnx`` and ``trt`` (ONNX export + TensorRT engine with the kvcompile plugins) are built in;
another target registers itself with :func:`register_target`.
"""

from __future__ import annotations

from typing import Any, Callable

from kvcompile.errors import ExportError

_TARGETS: dict[str, Callable[..., Any]] = {}


def register_target(name: str, export: Callable[..., Any]) -> None:
    _TARGETS[name] = export


def target_names() -> list[str]:
    _load_builtin()
    return sorted(_TARGETS)


def _load_builtin() -> None:
    if "onnx" not in _TARGETS:
        from kvcompile.export import export_onnx
        from kvcompile.targets.trt.build import export_trt

        register_target("onnx", export_onnx)
        register_target("trt", export_trt)


def export(target: str, lm, pmap, out_dir, **options):
    _load_builtin()
    if target not in _TARGETS:
        raise ExportError(f"unknown export target {target!r}; expected one of {', '.join(sorted(_TARGETS))}")
    return _TARGETS[target](lm, pmap, out_dir, **options)
