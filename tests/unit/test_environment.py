"""The install's promises, and per-user caches that several environments can share safely."""

from __future__ import annotations

import os

import pytest

from kvcompile import environment


def test_every_promised_dependency_is_installed():
    """Fails (does not skip) on an install that lacks what ./install.sh promises."""
    assert environment.missing_dependencies() == []


def test_a_missing_dependency_is_named(monkeypatch):
    monkeypatch.setattr(environment, "PROMISED", (("numpy", ("numpy",)), ("a TensorRT", ("no_such_trt", "no_trt_2"))))
    assert environment.missing_dependencies() == ["a TensorRT"]
    monkeypatch.setattr(environment, "PROMISED_FILES", (("the native library", "_native/no_such_library.so"),))
    assert environment.missing_dependencies() == ["a TensorRT", "the native library"]


def _fake_environment(root, version: str):
    libdir = root / "site-packages" / "tensorrt_rtx_libs"
    libdir.mkdir(parents=True)
    for name in ("libtensorrt_rtx.so.1", "libtensorrt_onnxparser_rtx.so.1"):
        (libdir / name).write_text(f"{name} {version}")
    return libdir


def test_library_links_are_per_environment_and_survive_removing_another(tmp_path, monkeypatch):
    import shutil

    from kvcompile.targets.trt.build import unversioned_links

    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "cache"))
    first = _fake_environment(tmp_path / "env1", "1.7")
    second = _fake_environment(tmp_path / "env2", "1.7")
    links_first, links_second = unversioned_links(first), unversioned_links(second)
    assert links_first != links_second
    for links, libdir in ((links_first, first), (links_second, second)):
        assert (links / "libtensorrt_rtx.so").resolve() == (libdir / "libtensorrt_rtx.so.1").resolve()
        assert (links / "libtensorrt_onnxparser_rtx.so").read_text() == "libtensorrt_onnxparser_rtx.so.1 1.7"
    assert unversioned_links(first) == links_first  # stable: reused, not re-created
    shutil.rmtree(tmp_path / "env1")
    assert (unversioned_links(second) / "libtensorrt_rtx.so").read_text() == "libtensorrt_rtx.so.1 1.7"
    # upgrading the libraries in place gives new links rather than reusing the old key
    (second / "libtensorrt_rtx.so.1").write_text("libtensorrt_rtx.so.1 1.8 (a longer file)")
    assert unversioned_links(second) != links_second


def test_library_env_puts_this_environments_links_first(tmp_path, monkeypatch):
    import importlib.util

    from kvcompile.targets.trt.build import library_env

    if importlib.util.find_spec("tensorrt_rtx_libs") is None and importlib.util.find_spec("tensorrt_libs") is None:
        pytest.fail("no TensorRT library package: ./install.sh installs tensorrt-rtx")
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))
    first = library_env()["LD_LIBRARY_PATH"].split(os.pathsep)[0]
    assert first.startswith(str(tmp_path / "trt-libs"))
    assert any(p.endswith(".so") and os.path.exists(os.path.join(first, p)) for p in os.listdir(first))
