"""export -> run -> validate on the default model (SmolLM2-135M), as a user runs them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (installed by install.sh)")

from kvcompile.cli import main  # noqa: E402


def test_export_run_validate_default_model(smollm, tmp_path, capsys):
    out = tmp_path / "kivi2"
    assert main(["export", "--scheme", "kivi-2", "--max-context", "256", "-o", str(out), "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "30 KVAttention nodes" in text and (out / "model.onnx.data").is_file()
    assert (out / "tokenizer").is_dir()

    assert main(["run", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "8",
                 "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The capital of France is") and "tokens/s" in text
    assert "[onnxruntime+native (CPUExecutionProvider)]" in text  # the native library, by default
    # the same graph on stock ONNX Runtime (function bodies) continues the prompt the same way
    assert main(["run", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "8",
                 "--threads", "2", "--no-native"]) == 0
    assert capsys.readouterr().out.split("\n\n[")[0] == text.split("\n\n[")[0]

    report = tmp_path / "validate.json"
    code = main(["validate", str(out), "--window", "96", "--prefill", "16", "--quiet", "--threads", "2",
                 "--json", str(report)])
    text = capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert code == 0 and doc["passed"], text
    for key in ("passed", "max_abs_error", "ppl", "ppl_reference", "top1_agreement"):
        assert key in doc
    assert abs(doc["ppl"] / doc["ppl_torch_same_map"] - 1) < 0.05  # same quality as the torch reference
    assert "polygraphy run" in text and (out / "validate_data_loader.py").is_file()

    assert main(["run", str(out), "--prompt", "x " * 300, "--max-new-tokens", "2"]) == 2
    assert "exceeds the export's max_context of 256" in capsys.readouterr().err

    # several requests sharing a document: the prefix cache restores its compressed blocks
    shared = "Paris is the capital and largest city of France, on the river Seine. " * 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{shared}Question {i}: what is the river? Answer:\n" for i in range(3)))
    assert main(["run", str(out), "--prompt", f"@{prompts}", "--backend", "torch", "--prefix-cache-mb", "8",
                 "--prefix-block", "16", "--max-new-tokens", "4", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "prefix cache: 2/3 hits" in text and text.count(" restored, ") == 3 and " 0 restored" in text
    answers = [line for line in text.splitlines() if line.startswith("Paris")]
    # the same requests served by 3 threads sharing one prefix cache: the same answers, in order
    assert main(["run", str(out), "--prompt", f"@{prompts}", "--backend", "torch", "--prefix-cache-mb", "8",
                 "--prefix-block", "16", "--max-new-tokens", "4", "--threads", "2", "--concurrency", "3"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("Paris")] == answers and len(answers) == 3
    assert "prefix cache: " in text and text.count(" restored, ") == 3
    # the ONNX Runtime backend: the graph's packed past tensors are the prefix state, restored on a hit
    assert main(["run", str(out), "--prompt", f"@{prompts}", "--prefix-cache-mb", "8", "--prefix-block", "16",
                 "--max-new-tokens", "4", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "prefix cache: 2/3 hits" in text and "[onnxruntime+native + prefix cache]" in text
    assert [line for line in text.splitlines() if line.startswith("Paris")] == answers


def test_export_trt_builds_an_engine_of_the_default_model(smollm, tmp_path, capsys):
    from kvcompile.targets.trt.build import tensorrt_flavour

    if tensorrt_flavour() is None:
        pytest.skip("TensorRT (tensorrt-rtx) is not installed; install.sh installs it")
    out = tmp_path / "trt"
    assert main(["export", "--scheme", "kivi-2", "--target", "trt", "--max-context", "256", "-o", str(out),
                 "--threads", "2", "--compute-capability", "89", "--compute-capability", "120"]) == 0
    text = capsys.readouterr().out
    assert "for SM 89, 120): 30 kvcompile plugin layers (compiled plugins)" in text
    assert f"runs in trtexec ({out / 'trtexec.sh'})" in text
    report = json.loads((out / "engine_report.json").read_text())
    assert len(report["plugin_layers"]) == 30 and report["engine_contains_plugin_fields"]
    assert report["engine_contains_plugin_library"] and report["creators"] == ["KVAttention:CPP", "KVWindowAttention:CPP"]
    fields = {(p["fields"]["key_bulk_scheme"], p["fields"]["value_bulk_scheme"], p["fields"]["recent_window"],
               p["fields"]["q_per_kv"]) for p in report["plugin_layers"]}
    assert fields == {("int2-ch", "int2", 32, 3)}  # KIVI-2: K per channel, V per token, window 32; 9 q / 3 kv heads
    assert (out / "model.engine").stat().st_size == report["engine_bytes"]
    import torch

    if not torch.cuda.is_available():
        assert main(["run", str(out), "--prompt", "Hi", "--backend", "trt"]) == 2
        assert "cannot run here" in capsys.readouterr().err
