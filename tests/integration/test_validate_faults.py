"""`kvcompile validate` on the default model passes a faithful export and fails each injected fault.

The faults (kvcompile.validate.faults) are exporter bugs of the kind validate exists to catch, put
into an export of a map with sinks, a window, per-channel and per-token 2-bit formats and kv heads
that differ: a window one position short, a dropped sink, two kv heads' schemes swapped, every
integer scale read 5 % too large.  Thresholds and their noise floor: docs/export.md.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvcompile.export import export_onnx
from kvcompile.validate import faults
from kvcompile.validate.compare import validate_export

pytestmark = pytest.mark.model

OPTIONS = dict(progress=False, write_polygraphy=False, threads=2)


@pytest.fixture(scope="module")
def probe(smollm):
    return faults.probe_map(smollm.geometry)


@pytest.fixture(scope="module")
def faithful(smollm, probe, tmp_path_factory):
    return export_onnx(smollm, probe, tmp_path_factory.mktemp("faithful") / "e", max_context=160)


def test_validate_passes_a_faithful_export(smollm, faithful):
    result = validate_export(faithful, lm=smollm, **OPTIONS)
    assert result.passed, result.summary()


@pytest.mark.parametrize("fault", faults.MAP_FAULTS)
def test_validate_fails_an_export_whose_graph_differs_from_its_map(smollm, faithful, probe, fault):
    broken = replace(faithful, pmap=faults.claimed_map(probe, fault))
    result = validate_export(broken, lm=smollm, **OPTIONS)
    assert not result.passed, f"{fault}: {result.summary()}"


def test_validate_fails_an_export_with_a_wrong_scale(smollm, probe, tmp_path):
    with faults.wrong_scale_lowering(1.05):
        broken = export_onnx(smollm, probe, tmp_path / "e", max_context=160)
    # the fault is in the ONNX lowering, which only the function bodies run
    result = validate_export(broken, lm=smollm, **OPTIONS, native=False)
    assert not result.passed, result.summary()
