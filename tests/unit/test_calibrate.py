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
