"""State for a custom attention function, carried by the model's own attention modules.

transformers calls a registered attention function as ``f(module, query, key, value, ...)``.
The simulation and calibration passes need per-pass state in that function; keeping it on the
modules of the model being run (not in a module global) means two models can run such passes
at once, on different threads, and a pass that is not active fails clearly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

STATE_ATTRIBUTE = "_kvcompile_attention_state"


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx")]


@contextlib.contextmanager
def attention_state(model, state: Any, implementation: str, what: str) -> Iterator[Any]:
    """Within the block ``model`` runs attention ``implementation`` and each attention module
    carries ``state`` (read back with :func:`state_of`).  Blocks on one model do not nest."""
    modules = _attention_modules(model)
    if not modules:
        raise RuntimeError(f"{what}: the model has no attention modules with a layer_idx")
    if any(getattr(m, STATE_ATTRIBUTE, None) is not None for m in modules):
        raise RuntimeError(f"{what} does not nest: this model is already running a kvcompile attention pass")
    previous = model.config._attn_implementation
    for m in modules:
        setattr(m, STATE_ATTRIBUTE, state)
    model.set_attn_implementation(implementation)
    try:
        yield state
    finally:
        model.set_attn_implementation(previous)
        for m in modules:
            setattr(m, STATE_ATTRIBUTE, None)


def state_of(module, what: str) -> Any:
    """The state :func:`attention_state` put on ``module``; one line if there is none."""
    state = getattr(module, STATE_ATTRIBUTE, None)
    if state is None:
        raise RuntimeError(f"the {what} attention was called outside its pass (no state on the module)")
    return state
