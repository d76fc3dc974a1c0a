"""Bad input gets one clear line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["eval", "--scheme", "int5"], "int5: integer schemes support bits"),
    (["eval", "--scheme", "bogus"], "'bogus' is neither a map file"),
    (["eval", "/nonexistent/model", "--scheme", "int4"], "model '/nonexistent/model' not found"),
    (["eval", "--map", "/nonexistent/map.json"], "precision_map file not found"),
    (["eval", "--scheme", "int4", "--text", "/nonexistent.txt"], "text '/nonexistent.txt' not found"),
])
def test_one_line_errors(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("kvcompile: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_schemes_lists_exact_bits():
    proc = run_cli("schemes")
    assert proc.returncode == 0
    rows = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()[1:] if line[:1].isalnum() and len(line.split()) >= 2 and line.split()[1][0].isdigit()}
    assert rows["int4"] == 5.0 and rows["nf4"] == 4.75 and rows["fp8"] == 8.25 and rows["fp16"] == 16.0
