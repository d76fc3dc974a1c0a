"""The runner interface every decoder follows (in the spirit of Polygraphy's runners).

Lifecycle: ``activate()`` acquires the runtime (a session, an engine context, a model) and
``deactivate()`` releases it; a decoder is a context manager doing both.  Decoding:
``start(batch) -> state``, ``step(ids [B, S] int64, state) -> (logits [B, S, V] float32, state)``,
``cache_bytes(state)``.

:class:`GraphDecoder` implements decoding once for runtimes that execute the exported graph
(ONNX Runtime, TensorRT): the state is the packed cache as graph tensors, fed as ``past_*`` and
read back from ``present_*``; a subclass only implements ``activate``, ``infer(feed) -> outputs``
and ``deactivate``.
"""

from __future__ import annotations

import numpy as np

from kvcompile.errors import RuntimeBackendError

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def check_context(export, total: int) -> None:
    if total > export.max_context:
        raise RuntimeBackendError(f"context of {total} positions exceeds the export's max_context of "
                                  f"{export.max_context}; re-export with a larger --max-context")


def check_finite(logits: np.ndarray, where: str) -> None:
    if not np.isfinite(logits).all():
        raise RuntimeBackendError(f"{where}: the model produced NaN or inf logits; expected finite values "
                                  "(check the precision map and the input)")


def check_ids(ids: np.ndarray) -> None:
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise RuntimeBackendError(f"expected input ids [batch, tokens] with tokens >= 1, got shape {ids.shape}")


def empty_past(export, batch: int) -> dict[str, np.ndarray]:
    """The graph's ``past_*`` inputs for an empty cache: ``[batch, heads, 0, width]`` each."""
    return {p.past: np.zeros((batch, len(g.heads), 0, p.width), NUMPY_DTYPES[p.dtype])
            for g in export.groups for p in g.ports}


class Decoder:
    """Base of every backend's decoder (see the module docstring)."""

    #: backend name, used in messages
    name = "decoder"

    def __init__(self, export):
        self.export = export
        self.is_active = False

    def activate(self) -> "Decoder":
        self.is_active = True
        return self

    def deactivate(self) -> None:
        self.is_active = False

    def __enter__(self) -> "Decoder":
        return self if self.is_active else self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _check_active(self) -> None:
        if not self.is_active:
            raise RuntimeBackendError(f"the {self.name} decoder is not active; call activate() (or use it in a with block)")

    def start(self, batch: int):
        raise NotImplementedError

    def step(self, ids: np.ndarray, state):
        raise NotImplementedError

    def cache_bytes(self, state) -> int:
        raise NotImplementedError


class GraphDecoder(Decoder):
    """A decoder over the exported graph: ``state`` = the past tensors by input name + the length."""

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once: inputs by name -> outputs by name (host numpy arrays)."""
        raise NotImplementedError

    def start(self, batch: int):
        return {"past": empty_past(self.export, batch), "length": 0}

    def step(self, ids: np.ndarray, state):
        self._check_active()
        check_ids(ids)
        check_context(self.export, state["length"] + ids.shape[1])
        out = self.infer({"input_ids": ids, **state["past"]})
        check_finite(out["logits"], self.name)
        past = {p.past: out[p.present] for g in self.export.groups for p in g.ports}
        return out["logits"], {"past": past, "length": state["length"] + ids.shape[1]}

    def cache_bytes(self, state) -> int:
        return int(sum(a.nbytes for a in state["past"].values()))
