"""ONNX export: a model and a PrecisionMap -> a graph whose KV cache is stored packed through
``kvcompile`` ops (see :mod:`kvcompile.export.onnx_export`, layout in :mod:`kvcompile.export.layout`)."""

from kvcompile.export.onnx_export import ExportedModel, export_onnx, register_graph_builder

__all__ = ["ExportedModel", "export_onnx", "register_graph_builder"]
