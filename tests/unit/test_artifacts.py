"""Directory artifacts are swapped in whole: a failure or a kill leaves the old one or the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvcompile import artifacts
from kvcompile.artifacts import remove_stale_staging, staged_directory
from kvcompile.errors import ArtifactError


def _write(directory: Path, tag: str) -> None:
    (directory / "a.json").write_text(tag)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.bin").write_text(tag * 1000)


def _read(directory: Path) -> set[str]:
    return {(directory / "a.json").read_text(), (directory / "sub" / "b.bin").read_text()[: len("new")]}


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p != directory)


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_success_replaces_and_failure_keeps_the_old_artifact(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    out = tmp_path / "art"
    with staged_directory(out) as d:
        _write(d, "old")
    with pytest.raises(RuntimeError):
        with staged_directory(out) as d:
            _write(d, "new")
            raise RuntimeError("interrupted")
    assert _read(out) == {"old"} and _siblings(out) == []
    with staged_directory(out) as d:
        _write(d, "new")
    assert _read(out) == {"new"} and _siblings(out) == []


def test_a_foreign_directory_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="is not a kvcompile calibration directory"):
        with staged_directory(out, is_ours=lambda d: (d / "calibration.json").is_file(), what="calibration"):
            pass
    assert (out / "notes.txt").read_text() == "keep" and _siblings(out) == []


KILLED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from kvcompile import artifacts
    if sys.argv[2] == "two-renames":
        artifacts._exchange = lambda a, b: False
        real_replace = os.replace
        def replace(src, dst):  # stop between the two renames of the swap
            real_replace(src, dst)
            if Path(dst).name == "previous":
                print("between", flush=True); time.sleep(60)
        os.replace = replace
    with artifacts.staged_directory(Path(sys.argv[1])) as d:
        (d / "a.json").write_text("new")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_text("new" * 1000)
        if sys.argv[2] == "inside":
            print("inside", flush=True); time.sleep(60)
""")


@pytest.mark.parametrize("where", ["inside", "two-renames"])
def test_a_killed_writer_leaves_the_old_artifact_and_the_next_run_cleans_up(tmp_path, where):
    out = tmp_path / "art"
    with staged_directory(out) as d:
        _write(d, "old")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out), where], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() in ("inside", "between")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_siblings(out)) == 1  # the killed run's staging directory
    if where == "inside":
        assert _read(out) == {"old"}
    else:  # killed with the old artifact moved aside and the new one not yet in place
        assert not out.exists()
    removed = remove_stale_staging(out)
    assert len(removed) == 1 and _siblings(out) == [] and _read(out) == {"old"}


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from kvcompile.calibrate import Calibration
    from kvcompile.export import export_onnx
    from kvcompile.models import LoadedModel
    from kvcompile.models.adapters import adapter_for
    from kvcompile.plan.presets import resolve_map

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    adapter = adapter_for(config)
    lm = LoadedModel(LlamaForCausalLM(config).eval(), None, adapter.geometry(config), adapter, "tiny")
    out, kind = Path(sys.argv[1]), sys.argv[2]
    g = lm.geometry
    maps = [resolve_map(s, g) for s in ("int4", "int8")]
    calibs = [Calibration(model="tiny", geometry=g, text="t", windows=1, window=8, estimator="hybrid", cost_unit="nats",
                          schemes=["fp16", "int4"], sink_options=[0], window_options=[0],
                          cost=torch.full((2, 2, 2, 2, 1, 1), float(i)), curvature=torch.ones(2, 2, 2, 1),
                          diameter=torch.ones(2, 2, 2)) for i in (1, 2)]
    i = 0
    while True:
        if kind == "export":
            export_onnx(lm, maps[i % 2], out, max_context=64)
        else:
            calibs[i % 2].save(out)
        print("done", flush=True)
        i += 1
""")


@pytest.mark.parametrize("kind", ["export", "calibration"])
def test_kill_at_random_points_leaves_the_old_or_the_new_artifact(tmp_path, kind):
    """kill -9 a process that rewrites an artifact in a loop, at random moments: the artifact always
    loads whole, and the next write removes what the killed one left behind."""
    import random

    from kvcompile.calibrate import Calibration
    from kvcompile.export import ExportedModel

    out = tmp_path / "artifact"
    rng = random.Random(0)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), kind], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(rng.randrange(1, 4)):  # let it finish one to three writes, then kill it mid-way
            assert proc.stdout.readline().strip() == "done"
        import time

        time.sleep(rng.random() * 0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if kind == "export":
            ex = ExportedModel.load(out)  # cross-checks manifest, map, layout, files and graph
            assert ex.pmap.scheme(0, 0, "key", "bulk").name in ("int4", "int8")
        else:
            assert Calibration.load(out).cost.flatten()[0].item() in (1.0, 2.0)
        remove_stale_staging(out)
        assert _siblings(out) == [], f"trial {trial}"
