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
