"""The 1-bit residual sketch (``<base>-qjl``): unbiased inner products over the sketch's draw, exact
bits, and one-line refusals where it has no implementation."""

from __future__ import annotations

import pytest
import torch

from kvcompile.errors import ExportError, SchemeError
from kvcompile.quant import get_scheme
from kvcompile.quant import sketch as sketch_module


def test_scores_are_unbiased_over_the_sketch_and_noisier_for_one_draw(monkeypatch):
    """E_S[q . x_hat] = q . x: the base format's score error (q along its residual, the worst case)
    disappears on average over sketch matrices, while each single draw adds noise."""
    base, s = get_scheme("lm2-rot"), get_scheme("lm2-rot-qjl")
    x = torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(3))
    r = x - base.roundtrip(x)
    q = r / r.norm()  # the base error of this score is |r|
    base_error = float((q * (base.roundtrip(x) - x)).sum())
    errors = []
    for draw in range(400):
        matrix = torch.randn(64, 64, generator=torch.Generator().manual_seed(draw))
        monkeypatch.setattr(sketch_module, "sketch_matrix", lambda d, m=matrix: m)
        errors.append(float((q * (s.roundtrip(x) - x)).sum()))
    errors = torch.tensor(errors)
    assert abs(base_error) > 0.1 and abs(errors.mean()) < 0.1 * abs(base_error)
    # one draw is not exact: relative spread sqrt(pi/2 - 1) / sqrt(m) = 0.094 for q along r
    assert 0.05 * abs(base_error) < errors.std() < 0.15 * abs(base_error)


def test_bits_count_the_signs_and_the_norm():
    s = get_scheme("int2-qjl")
    x = torch.randn(2, 3, 8, 64)
    assert s.bits_per_element(64) == get_scheme("int2").bits_per_element(64) + 1 + 16 / 64
    assert s.quantize(x).nbytes * 8 == s.bits_per_element(64) * x.numel()


def test_only_per_token_bases_and_no_lowering_or_kernel():
    from kvcompile.kernels import unsupported_reason
    from kvcompile.ops.lowering import check_lowerable

    for name in ("int2-ch-qjl", "lm2-rot-qjl-qjl"):
        with pytest.raises(SchemeError, match="per-token format"):
            get_scheme(name)
    with pytest.raises(ExportError, match="'lm2-rot-qjl' has no ONNX lowering yet"):
        check_lowerable(get_scheme("lm2-rot-qjl"), 64)
    assert "SketchScheme family has no kernel" in unsupported_reason(get_scheme("lm2-rot-qjl"))
