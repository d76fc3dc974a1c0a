"""Every example runs (with small sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[2]
SMALL_ARGS = {
    "01_generate_with_mixed_cache.py": ["--max-new-tokens", "8"],
    "02_calibrate_plan_evaluate.py": ["--windows", "1", "--window", "96", "--budget", "5"],
}


def test_every_example_has_small_arguments():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(SMALL_ARGS)


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_example_runs(name, tmp_path):
    args = SMALL_ARGS[name] + (["--out", str(tmp_path)] if name.startswith("02") else [])
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("bits/element" in proc.stdout) or ("planned" in proc.stdout)
