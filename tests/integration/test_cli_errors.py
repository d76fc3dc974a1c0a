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
    (["eval", "--scheme", "int4", "--task", "retrieval", "--mode", "decode"], "--task retrieval scores by the exact"),
    (["eval", "--scheme", "int4", "--task", "retrieval", "--depths", "0.5,x"], "--depths: expected comma-separated"),
    (["eval", "--scheme", "int4", "--task", "retrieval", "--depths", "1.5"], "retrieval depths must be fractions"),
    (["eval", "--scheme", "int4", "--task", "retrieval", "--window", "9000"], "exceeds the model's context of 8192"),
    (["eval", "--scheme", "int2-rot-o1"], "the base of an outlier format must be an integer or Lloyd-Max format"),
    (["eval", "--scheme", "lm5"], "lm: bits must be one of (2, 3, 4)"),
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


@pytest.mark.parametrize("args,message", [
    (["plan", "calib", "--budget-bits", "nan", "-o", "m.json"], "argument --budget-bits: expected a finite number"),
    (["plan", "calib", "--budget-bits", "inf", "-o", "m.json"], "argument --budget-bits: expected a finite number"),
    (["plan", "calib", "--budget-bits", "1e9", "-o", "m.json"], "above 0 up to 32, got '1e9'"),
    (["plan", "calib", "--target-kl", "nan", "-o", "m.json"], "argument --target-kl: expected a finite number"),
    (["plan", "calib", "--target-kl", "-1", "-o", "m.json"], "argument --target-kl: expected a finite number"),
    (["plan", "calib", "--budget-bits", "4", "--context", "0", "-o", "m.json"], "argument --context: expected an integer from 1"),
    (["plan", "calib", "--budget-bits", "4", "-o", "."], "-o . is a directory; expected the path of the map JSON"),
    (["plan", "map.json", "--budget-bits", "4", "-o", "m.json"], "map.json is a file; expected a calibration directory"),
    (["run", "export", "--prompt", ""], "--prompt is empty"),
    (["run", "export", "--prompt", "@latin1.txt"], "expected UTF-8 text, found byte 0xe9"),
    (["run", "export", "--prompt", "x", "--max-new-tokens", "-3"], "argument --max-new-tokens: expected an integer from 1"),
    (["run", "export", "--prompt", "x", "--prefix-cache-mb", "nan"], "argument --prefix-cache-mb: expected a finite number"),
    (["schemes", "--head-dim", "0"], "argument --head-dim: expected an integer from 1 to 65536, got '0'"),
    (["schemes", "--head-dim", "-64"], "argument --head-dim: expected an integer from 1 to 65536, got '-64'"),
    (["eval", "--scheme", "int4", "--max-windows", "-3"], "argument --max-windows: expected an integer from 1"),
    (["eval", "--scheme", "int4", "--window", "٤"], "argument --window: expected an integer from 2"),
    (["validate", "export", "--min-cosine", "2"], "argument --min-cosine: expected a finite number from -1 to 1"),
])
def test_bad_arguments_are_one_line_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    from kvcompile.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "map.json").write_text("{}")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvcompile") and message in err, err


def test_a_scheme_with_group_zero_is_a_one_line_error():
    proc = run_cli("eval", "--scheme", "nf4-g0", "--max-windows", "1", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "kvcompile: error: nf4: group size must be from 1 to 65536, got 0"


def test_schemes_marks_what_a_head_dim_cannot_store():
    proc = run_cli("schemes", "--head-dim", "96")
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line[:1].isalnum()}
    assert proc.returncode == 0 and "cannot store" in rows["int4-rot"]  # Hadamard needs a power of two
    assert float(rows["int4"].split()[1]) == 4 + 2 * 16 / 32  # codes + fp16 scale and zero per 32 channels
    assert "cannot store" in run_cli("schemes", "--head-dim", "48").stdout.split("\nint4 ")[1].splitlines()[0]
