"""Imports point down only: every subpackage imports those below it in LAYERS, never one above.

Lazy imports inside functions count too: a stage that reaches up at call time is as tangled as one
that does so at import time."""

import ast
import pathlib
import subprocess
import sys

import kvcompile

#: bottom to top; a module may import its own subpackage and any listed before it
LAYERS = ("version", "errors", "environment", "artifacts", "data", "fuzzing", "quant", "kv", "kernels", "models",
          "cache", "ops", "measure", "calibrate", "plan", "export", "targets", "runtime", "validate", "report", "cli")

ROOT = pathlib.Path(kvcompile.__file__).parent


def imported_subpackages(source: str):
    """``(line, subpackage)`` of every ``kvcompile.<subpackage>`` import in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "kvcompile":
                continue
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("kvcompile.")]
        else:
            continue
        for name in names:
            yield node.lineno, name


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel == ("__init__.py",):  # the package's lazy public API names every stage by design
            continue
        me = rel[0].removesuffix(".py")
        assert me in rank, f"{path}: subpackage {me!r} has no place in LAYERS"
        for line, other in imported_subpackages(path.read_text()):
            if other != me and other in rank and rank[other] > rank[me]:
                found.append(f"{path.relative_to(root)}:{line}: {me} imports {other}")
    return found


def test_no_module_imports_one_above_it():
    assert upward_imports() == []


def test_the_check_sees_upward_imports(tmp_path):
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "store.py").write_text("def f():\n    from kvcompile.cache.mixed import MixedPrecisionCache\n")
    (tmp_path / "measure.py").write_text("import kvcompile.plan.optimize\nfrom kvcompile import calibrate\n")
    (tmp_path / "plan.py").write_text("from kvcompile.kv import PrecisionMap\nfrom kvcompile.measure import quality\n")
    assert upward_imports(tmp_path) == ["kv/store.py:2: kv imports cache", "measure.py:1: measure imports plan",
                                        "measure.py:2: measure imports calibrate"]


def test_op_references_and_plugin_host_code_do_not_load_transformers():
    """The cache-update op's reference and the plugin's host path append through kv.store, not the
    transformers cache, so a TensorRT enqueue does not import transformers."""
    code = """
import sys, torch
from kvcompile.ops import get_op
from kvcompile.targets.trt.plugin import run_op
spec = get_op("KVCacheUpdate")
attrs = dict(sink_scheme="fp16", recent_scheme="fp16", bulk_scheme="int4", sink_tokens=1, recent_window=2, head_dim=32, age_tiers="")
past = [torch.empty(1, 1, 0, int(p.shape[3]), dtype=getattr(torch, p.dtype)) for p in spec.inputs(attrs)[:-1]]
out = run_op(spec, attrs, [*past, torch.randn(1, 1, 5, 32)])
assert out[-1].shape == (1, 1, 5, 32), out[-1].shape
assert "transformers" not in sys.modules, "transformers was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
