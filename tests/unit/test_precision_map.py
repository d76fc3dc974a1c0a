"""PrecisionMap: accounting, validation, versioned atomic I/O."""

from __future__ import annotations

import json

import pytest

from kvcompile.errors import ArtifactError, KvcompileError
from kvcompile.models.adapters import KVGeometry
from kvcompile.kv.precision_map import PrecisionMap
from kvcompile.kv.segments import bulk_end, class_lengths
from kvcompile.plan.presets import resolve_map
from kvcompile.quant import get_scheme

GEOM = KVGeometry(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=64, max_positions=4096)


def test_bulk_end_segments():
    # no sinks, no window, per token: everything is bulk
    assert bulk_end(10, 0, 0, 1) == 10
    # 4 sinks, window 8: bulk = [4, L - 8)
    assert bulk_end(100, 4, 8, 1) == 92
    # per-channel blocks of 32 after 4 sinks and a window of 8: whole blocks only
    assert bulk_end(100, 4, 8, 32) == 4 + 64
    # short sequences: sinks fill first, nothing in bulk
    assert bulk_end(3, 4, 8, 1) == 3 and bulk_end(10, 4, 8, 1) == 4


def test_kivi_bits_count_window_and_incomplete_blocks():
    pmap = resolve_map("kivi-2", GEOM)
    L = 512
    # K: int2 per channel g32 -> bulk = 32 * floor((512 - 32) / 32) = 480 positions at 2 + 32/32 bits
    # V: int2 per token  g32 -> bulk = 480 positions at 2 + 32/32 bits; window of 32 at fp16
    expected = (480 * 3.0 + 32 * 16.0) / L
    assert pmap.bits_per_element(L) == pytest.approx(expected)
    # the same map costs more bits per element at a short context
    assert pmap.bits_per_element(64) > pmap.bits_per_element(4096)
    assert pmap.kv_bytes(L) == pytest.approx(expected * L * 2 * 3 * 2 * 64 / 8)


@pytest.mark.parametrize("n,w,g", [(0, 0, 1), (4, 8, 1), (0, 0, 32), (4, 32, 32), (1, 16, 128), (4, 0, 64)])
def test_allocated_memory_is_each_class_at_its_longest(n, w, g):
    """'allocated' counts per class the most positions it holds at any length L <= N (brute force)."""
    for N in (0, 3, 20, 100, 131, 512):
        per_length = [class_lengths(L, n, w, g) for L in range(N + 1)]
        assert all(sum(c.values()) == L for L, c in enumerate(per_length))  # final: a partition of the positions
        allocated = class_lengths(N, n, w, g, memory="allocated")
        assert allocated == {k: max(c[k] for c in per_length) for k in ("sink", "bulk", "recent")}


def test_allocated_memory_of_a_map_counts_the_waiting_block():
    pmap = resolve_map("kivi-2", GEOM)  # window 32, K per channel in blocks of 32, V per token
    # at 512 positions 32 wait in fp16; a K buffer for any length up to 512 needs 32 + 31, a V buffer 32
    keys, values = (480 * 3.0 + 63 * 16.0) / 512, (480 * 3.0 + 32 * 16.0) / 512
    assert pmap.bits_per_element(512, memory="allocated") == pytest.approx((keys + values) / 2)
    per_token = resolve_map("int4", GEOM)
    assert per_token.bits_per_element(512, memory="allocated") == per_token.bits_per_element(512)
    with pytest.raises(KvcompileError, match="final, allocated"):
        pmap.bits_per_element(512, memory="peak")


def test_uniform_and_overrides():
    pmap = resolve_map("int4", GEOM, sink_tokens=4, recent_window=16)
    assert pmap.sink_tokens == 4 and pmap.recent_window == 16
    assert pmap.scheme(2, 1, "value", "bulk") == get_scheme("int4")
    assert pmap.scheme(0, 0, "key", "sink") == get_scheme("fp16")
    assert pmap.bits_per_element(1000) == pytest.approx((4 * 16 + 16 * 16 + 980 * 5) / 1000)


def test_save_load_roundtrip_is_byte_identical(tmp_path):
    pmap = resolve_map("kivi-4", GEOM, sink_tokens=2)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    pmap.save(a)
    loaded = PrecisionMap.load(a)
    assert loaded == pmap and loaded.content_hash() == pmap.content_hash()
    loaded.save(b)
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    from kvcompile.artifacts import default_mode

    assert a.stat().st_mode & 0o777 == default_mode()  # not mkstemp's owner-only 0600


def _doc(tmp_path):
    resolve_map("int4", GEOM).save(tmp_path / "m.json")
    return json.loads((tmp_path / "m.json").read_text())


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
    (lambda d: d["schemes"]["key"]["bulk"].pop(), "must list 3 layers"),
    (lambda d: d["schemes"]["value"]["sink"][1].append("fp16"), r"sink\[1\] must list 2 kv heads"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(1, "int7"), r"bulk\[0\]\[1\].*int7"),
    (lambda d: d["schemes"]["key"]["recent"][0].__setitem__(0, "int4-ch"), "needs a per-token scheme"),
    (lambda d: d["schemes"].pop("value"), "exactly the keys"),
    (lambda d: d.update(recent_window=-1), "recent_window must be an integer from 0 to"),
    (lambda d: d.update(sink_tokens=True), "sink_tokens must be an integer from 0 to .*, got True"),
    (lambda d: d.update(head_dim=10**30), "head_dim must be an integer from 1 to 4096"),
    (lambda d: d.update(num_layers=3.0), "num_layers must be an integer"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, "int4-g7"), "not a multiple of the group size 7"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, "int4\n"), "unknown storage scheme"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, "int\u0664"), "unknown storage scheme"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, "nf4-g0"), "group size must be from 1"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, "int4-g32"), "not the canonical name; write 'int4'"),
    (lambda d: d["schemes"]["key"]["bulk"][0].__setitem__(0, ["int4"]), "must be a scheme name"),
    (lambda d: d.update(provenance=[1]), "provenance must be a JSON object"),
    (lambda d: d.update(model=7), "model must be a string"),
    (lambda d: d.pop("head_dim"), "missing or mistypes field"),
    (lambda d: d.update(artifact="calibration"), "expected a precision_map artifact"),
])
def test_malformed_maps_fail_with_one_line(tmp_path, mutate, message):
    doc = _doc(tmp_path)
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=message) as info:
        PrecisionMap.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content,message", [
    ('{"format_version": NaN}', "NaN is not a number JSON allows"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"artifact": "precision_map", "format_version": 1, "num_layers": ' + "9" * 5000 + "}", "not a JSON precision_map"),
    (b"\xff\xfe{}", "not a JSON precision_map"),
])
def test_unparsable_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ArtifactError, match=message) as info:
        PrecisionMap.load(path)
    assert "\n" not in str(info.value)


def test_an_unreadable_path_fails_with_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="cannot be read|not found"):
        PrecisionMap.load(tmp_path / ("x" * 300 + ".json"))
    with pytest.raises(ArtifactError, match="not found"):
        PrecisionMap.load(tmp_path)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ArtifactError, match="not a JSON precision_map"):
        PrecisionMap.load(tmp_path / "x.json")
    with pytest.raises(ArtifactError, match="not found"):
        PrecisionMap.load(tmp_path / "missing.json")


def test_map_for_another_model_is_rejected():
    pmap = resolve_map("int4", GEOM)
    with pytest.raises(ArtifactError, match="the model has"):
        pmap.check_model(30, 3, 64)


def test_unknown_spec_names_what_is_accepted():
    from kvcompile.errors import KvcompileError

    with pytest.raises(KvcompileError, match="neither a map file, a preset .*kivi-2.* nor a storage scheme"):
        resolve_map("int4-bogus", GEOM)


def test_layer_windows_are_checked_and_saved(tmp_path):
    from dataclasses import replace

    from kvcompile.errors import ArtifactError

    base = PrecisionMap.uniform(3, 2, 64, "int4", sink_tokens=2, recent_window=4)
    windowed = base.windowed((16, 0, 16))
    assert windowed.layer_windows == (16, 0, 16)
    assert {windowed.scheme(0, 1, "key", c).name for c in windowed.classes} == {"int4"}  # sinks and window too
    assert windowed.scheme(1, 0, "key", "sink").name == "fp16"  # a full layer keeps its classes
    windowed.save(tmp_path / "m.json")
    assert PrecisionMap.load(tmp_path / "m.json") == windowed
    assert "layer_windows" not in base.to_json_body()  # maps without windows hash as before
    for bad in ((16, 0), (1, 0, 0), (16, -1, 0), (True, 0, 0)):
        with pytest.raises(ArtifactError, match="layer_windows must be empty or list 3 integers"):
            replace(windowed, layer_windows=bad, _resolved={})
    with pytest.raises(ArtifactError, match="layer 0 is a sliding-window layer; its key head 0 needs one per-token"):
        replace(base, layer_windows=(16, 0, 16), _resolved={})
    with pytest.raises(ArtifactError, match="sliding windows \\[16, 0, 16\\], the model none"):
        windowed.check_model(3, 2, 64)
