"""Calibration on the tiny model: structure, monotonicity, the artifact."""

from __future__ import annotations

import pytest
import torch

from kvcompile.calibrate import Calibration, calibrate
from kvcompile.calibrate.estimate import distance_buckets
from kvcompile.errors import ArtifactError, KvcompileError

SCHEMES = ["fp16", "int8", "int4", "int4-ch-g8", "int2", "int2-ch-g8"]


@pytest.fixture(scope="module", params=["hybrid", "fisher"])
def calib(tiny_lm, request):
    return calibrate(tiny_lm, text="wikipedia-calibration", windows=3, window=96, schemes=SCHEMES, estimator=request.param,
                     sink_options=[0, 4], window_options=[0, 16], progress=False)


def _total(c, name, w=0, n=0):
    return c.cost[:, :, :, c.schemes.index(name), c.window_options.index(w), c.sink_options.index(n)].sum().item()


def test_shapes_and_units(calib):
    assert calib.cost.shape == (2, 2, 2, len(SCHEMES), 2, 2)
    assert (calib.cost >= 0).all() and calib.cost_unit.startswith("nats")
    assert calib.curvature.shape == (2, 2, 2, 2) and (calib.curvature > 0).all()
    assert (calib.diameter > 0).all()


def test_fewer_bits_cost_more(calib):
    assert _total(calib, "fp16") < 1e-2 * _total(calib, "int8")
    assert _total(calib, "int8") < _total(calib, "int4") < _total(calib, "int2")


def test_window_and_sinks_only_remove_cost(calib):
    for name in ("int4", "int2", "int2-ch-g8"):
        assert _total(calib, name, w=16) < _total(calib, name, w=0)
        assert _total(calib, name, n=4) <= _total(calib, name, n=0)


def test_predictions_are_within_a_small_factor_of_measured_kl(calib):
    """The data-calibrated constant c (measured / predicted) is O(1) at 4 bits even on a random model.

    (On the default model: see docs/calibration-results.md.)"""
    c = calib.correction[calib.schemes.index("int4")].item()
    assert 1 / 4 < c < 4, c


def test_attention_estimator_runs_forward_only(tiny_lm):
    c = calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=64, estimator="attention",
                  schemes=["int8", "int2"], window_options=[0, 16], progress=False)
    assert c.cost_unit.startswith("attention-output") and (c.correction == 1).all()
    assert _total(c, "int8") < _total(c, "int2")


def test_save_load_roundtrip_and_tamper_detection(calib, tmp_path):
    calib.save(tmp_path / "cal")
    loaded = Calibration.load(tmp_path / "cal")
    assert torch.equal(loaded.cost, calib.cost) and loaded.schemes == calib.schemes
    assert loaded.content_hash() == calib.content_hash()
    blob = (tmp_path / "cal" / "calibration.safetensors").read_bytes()
    (tmp_path / "cal" / "calibration.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        Calibration.load(tmp_path / "cal")


def test_bad_options_are_clear(tiny_lm):
    with pytest.raises(KvcompileError, match="unknown estimator"):
        calibrate(tiny_lm, estimator="magic", progress=False)
    with pytest.raises(KvcompileError, match="shorter than the calibration window"):
        calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=32, window_options=[0, 64], progress=False)


def test_distance_buckets_partition_the_causal_triangle():
    b = distance_buckets(10, [0, 3, 6])
    assert b.shape == (3, 10, 10)
    assert torch.equal(b.sum(0), torch.tril(torch.ones(10, 10, dtype=torch.long)))
    assert b[1, 5, 2] and b[1, 5, 0] and not b[1, 5, 4] and b[2, 9, 0] and not b[2, 3, 0]


def test_default_options_adapt_to_a_short_window(tiny_lm):
    c = calibrate(tiny_lm, text="wikipedia-calibration", windows=1, window=24, schemes=["int4"], progress=False)
    assert c.window_options == [0, 16] and c.sink_options == [0, 1, 4]


def _resave(calib, tmp_path, json_edit=None, tensor_edit=None):
    """Save ``calib``, edit its JSON and/or tensors, re-record the tensors' hash (so only the edit is wrong)."""
    import hashlib
    import json

    from safetensors.torch import load, save

    d = calib.save(tmp_path / "cal")
    tensors = load((d / "calibration.safetensors").read_bytes())
    if tensor_edit:
        tensor_edit(tensors)
    blob = save(tensors)
    (d / "calibration.safetensors").write_bytes(blob)
    doc = json.loads((d / "calibration.json").read_text())
    doc["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    if json_edit:
        json_edit(doc)
    (d / "calibration.json").write_text(json.dumps(doc))
    return d


@pytest.mark.parametrize("json_edit,tensor_edit,message", [
    (lambda d: d.update(window=0), None, "window must be an integer from 2"),
    (lambda d: d.update(windows=True), None, "windows must be an integer"),
    (lambda d: d.update(estimator="magic"), None, "unknown estimator 'magic'"),
    (lambda d: d.update(schemes=["fp16", "int4-g7", *d["schemes"][2:]]), None, "int4-g7"),
    (lambda d: d.update(sink_options=[0, -4]), None, "sink_options entry must be an integer from 0"),
    (lambda d: d["geometry"].update(head_dim="32"), None, "geometry.head_dim must be an integer"),
    (lambda d: d.update(geometry=[1, 2]), None, "missing or mistypes field"),
    (None, lambda t: t["cost"].__setitem__((0, 0, 0, 0, 0, 0), float("nan")), "cost has NaN, infinite or negative"),
    (None, lambda t: t["cost"].__setitem__((0, 0, 0, 0, 0, 0), -1.0), "cost has NaN, infinite or negative"),
    (None, lambda t: t.update(correction=t["correction"][:2]), "correction has shape"),
    (None, lambda t: t.update(curvature=t["curvature"].to(torch.int64)), "curvature must be a float64 tensor"),
    (None, lambda t: t.pop("diameter"), "missing or mistypes field"),
])
def test_malformed_calibrations_are_refused_with_one_line(calib, tmp_path, json_edit, tensor_edit, message):
    d = _resave(calib, tmp_path, json_edit, tensor_edit)
    with pytest.raises(ArtifactError, match=message) as info:
        Calibration.load(d)
    assert "\n" not in str(info.value)


def test_a_malformed_safetensors_file_with_a_matching_hash_is_refused(calib, tmp_path):
    import hashlib
    import json

    d = calib.save(tmp_path / "cal")
    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"
    (d / "calibration.safetensors").write_bytes(blob)
    doc = json.loads((d / "calibration.json").read_text())
    doc["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (d / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        Calibration.load(d)


def test_saving_over_a_foreign_directory_is_refused(calib, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not a kvcompile calibration directory"):
        calib.save(tmp_path / "mine")
    calib.save(tmp_path / "cal")
    calib.save(tmp_path / "cal")  # an older calibration is replaced
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == ["calibration.json", "calibration.safetensors"]


@pytest.mark.parametrize("groups", [1, 3])
def test_the_hybrid_estimators_query_chunks_give_the_unchunked_costs(monkeypatch, groups):
    """Each chunk of sampled queries reads only the keys up to its last query: the costs equal those
    of one chunk over all keys (float32 sums in another order)."""
    from kvcompile.calibrate import estimate

    g = torch.Generator().manual_seed(0)
    hkv, t, d = 2, 96, 32
    out = torch.randn(1, hkv * groups, t, d, generator=g).requires_grad_(True)
    out.grad = torch.randn(1, hkv * groups, t, d, generator=g)
    rec = {"query": torch.randn(1, hkv * groups, t, d, generator=g), "key": torch.randn(1, hkv, t, d, generator=g) * 2,
           "value": torch.randn(1, hkv, t, d, generator=g), "out": out, "groups": groups, "scaling": d ** -0.5}
    schemes, sinks, windows = ["int2", "int2-ch-g16", "int4", "lm2-rot"], [0, 4], [0, 8, 32]
    costs = {}
    for chunks in (1, 4):
        monkeypatch.setattr(estimate, "HYBRID_CHUNKS", chunks)
        costs[chunks] = torch.zeros(1, hkv, 2, len(schemes), len(windows), len(sinks), dtype=torch.float64)
        estimate._hybrid_costs(rec, 0, costs[chunks], schemes, sinks, windows)
    assert (costs[1] > 0).any()
    torch.testing.assert_close(costs[4], costs[1], rtol=1e-5, atol=0)
