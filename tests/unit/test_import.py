"""`import kvcompile` stays light: no torch, onnxruntime or TensorRT until a stage is used."""

import subprocess
import sys


def test_import_is_lazy():
    code = ("import sys, kvcompile; heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'transformers') "
            "if m in sys.modules]; print(heavy); assert not heavy, heavy; print(kvcompile.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_lazy_attributes_resolve():
    import kvcompile

    assert kvcompile.get_scheme("int4").bits == 4
    assert callable(kvcompile.evaluate)


def test_cli_help_is_light():
    code = ("import sys; from kvcompile.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
