"""Property-based fuzzing of the artifact loaders and the scheme grammar (fixed budget, derandomized).

Every mutated artifact must be either refused with one KvcompileError line or accepted and valid by
the independent oracle of kvcompile.fuzzing; ``python bench/fuzz.py`` runs >= 1,000 cases per loader.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompile import fuzzing
from kvcompile.errors import SchemeError
from kvcompile.quant import get_scheme

BUDGET = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GOOD = ("one-line error", "accepted valid")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@BUDGET
@given(seed=st.integers(0, 2**32 - 1), raw=st.booleans())
def test_precision_map_loader(seed, raw, tiny_geometry, workdir):
    from kvcompile.kv.precision_map import PrecisionMap
    from kvcompile.plan.presets import resolve_map

    rng = random.Random(seed)
    base = resolve_map(rng.choice(["int4", "kivi-2", "nf4"]), tiny_geometry, sink_tokens=rng.choice([0, 4]))
    base.save(workdir / "base.json")
    data = (workdir / "base.json").read_bytes()
    data = fuzzing.mutate_bytes(data, rng) if raw else json.dumps(fuzzing.mutate_json(json.loads(data), rng)).encode()
    (workdir / "map.json").write_bytes(data)
    outcome, detail = fuzzing.classify(lambda: PrecisionMap.load(workdir / "map.json"),
                                       fuzzing.map_doc_problem(fuzzing.parse_strict(data)))
    assert outcome in GOOD, detail


@BUDGET
@given(name=st.one_of(st.text(max_size=16), st.from_regex(r"(int[0-9]{1,2}|nf4)(-sym|-ch|-g[0-9]{1,6}|-s32|-rot|-nodq){0,4}",
                                                           fullmatch=True)),
       head_dim=st.sampled_from([1, 24, 32, 48, 64, 96, 128, 256]))
def test_scheme_grammar(name, head_dim):
    """A name is refused with a SchemeError, or is a canonical scheme exactly when the oracle says so."""
    try:
        scheme = get_scheme(name)
    except SchemeError:
        assert fuzzing._scheme_problem(name, head_dim, per_token=False) is not None
        return
    if scheme.name == name:
        from kvcompile.quant.base import storable_scheme

        try:
            storable_scheme(name, head_dim)
            stored = True
        except SchemeError:
            stored = False
        assert stored == (fuzzing._scheme_problem(name, head_dim, per_token=False) is None), (name, head_dim)


@pytest.fixture(scope="module")
def fuzz_export(tiny_lm, tiny_geometry, tmp_path_factory):
    from kvcompile.export import export_onnx
    from kvcompile.plan.presets import resolve_map

    return export_onnx(tiny_lm, resolve_map("kivi-2", tiny_geometry, sink_tokens=2, recent_window=8),
                       tmp_path_factory.mktemp("fuzz-export") / "e", max_context=64)


@settings(BUDGET, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1))
def test_export_manifest_loader(seed, fuzz_export):
    from kvcompile.export import ExportedModel

    manifest = fuzz_export.path / "kvcompile_export.json"
    original_bytes = manifest.read_bytes()
    original = json.loads(original_bytes)
    data = json.dumps(fuzzing.mutate_json(original, random.Random(seed))).encode()
    try:
        manifest.write_bytes(data)
        outcome, detail = fuzzing.classify(lambda: ExportedModel.load(fuzz_export.path),
                                           fuzzing.export_manifest_problem(fuzzing.parse_strict(data), original))
    finally:
        manifest.write_bytes(original_bytes)
    assert outcome in GOOD, detail


def test_the_oracles_can_tell_valid_from_invalid(tiny_geometry, tmp_path):
    """The oracles are not vacuous: a valid map passes, a boolean integer or a bad group does not."""
    from kvcompile.plan.presets import resolve_map

    resolve_map("kivi-2", tiny_geometry).save(tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert fuzzing.map_doc_problem(doc) is None
    assert fuzzing.map_doc_problem({**doc, "sink_tokens": True}) == "sink_tokens"
    doc["schemes"]["key"]["bulk"][0][0] = "int4-g7"
    assert "group does not divide" in fuzzing.map_doc_problem(doc)
