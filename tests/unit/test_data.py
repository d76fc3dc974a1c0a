"""Shipped calibration / evaluation text: manifest, licences, checksums."""

from __future__ import annotations

import shutil

import pytest

from kvcompile.data import data_dir, load_text, manifest
from kvcompile.errors import DataError


def test_manifest_has_source_licence_and_roles():
    entries = manifest()
    assert {"wikipedia-calibration", "wikipedia-heldout", "gutenberg-shakespeare"} <= set(entries)
    roles = {e["role"] for e in entries.values()}
    assert roles == {"calibration", "evaluation"}
    for e in entries.values():
        assert e["source"] and e["licence"] and e["attribution"] and len(e["sha256"]) == 64


def test_every_shipped_text_verifies_and_the_splits_are_disjoint():
    calib, held = load_text("wikipedia-calibration"), load_text("wikipedia-heldout")
    assert len(calib) > 400_000 and len(held) > 400_000
    def titles(text):  # non-empty lines alternate: title, summary
        return set([line for line in text.splitlines() if line.strip()][::2])

    calib_titles, held_titles = titles(calib), titles(held)
    assert len(held_titles) > 900 and not calib_titles & held_titles
    assert "HAMLET" in load_text("gutenberg-shakespeare")


def test_tampered_text_fails_its_checksum(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data_dir(), copy)
    with open(copy / "wikipedia-heldout.txt", "a") as f:
        f.write("x")
    monkeypatch.setenv("KVCOMPILE_DATA", str(copy))
    with pytest.raises(DataError, match="does not match the manifest"):
        load_text("wikipedia-heldout")


def test_unknown_text_names_the_shipped_ones():
    with pytest.raises(DataError, match="wikipedia-heldout"):
        load_text("no-such-text")


@pytest.mark.model
def test_each_text_has_at_least_100k_tokens(smollm):
    for name in manifest():
        assert len(smollm.tokenizer(load_text(name)).input_ids) >= 100_000, name
