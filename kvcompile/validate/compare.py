"""``kvcompile validate``: an exported graph against the torch reference and the full-precision model.

On windows of held-out text, each window is run as a prefill of ``prefill`` tokens followed by
one decode step per remaining token (teacher forcing), through

* the export on its backend (ONNX Runtime),
* the torch reference: the source model with ``MixedPrecisionCache`` and the *same* map,
* the full-precision source model (one plain forward pass, no cache quantization).

Export vs reference is compared with polygraphy's ``Comparator`` (one iteration per step,
output ``logits``) plus per-position cosine similarity and greedy agreement; export vs full
precision gives the task metrics (perplexity, KL, top-1 agreement).

Tolerance (why not bit equality): the cache ops are bit-exact against their references
(``tests/unit/test_ops.py``), but the surrounding float32 matmuls sum in another order, so K/V
differ by ~1e-6 and an occasional value crosses a rounding boundary of a low-bit format; one
flipped 2-bit code moves a logit by up to a few tenths, and flips accumulate over decode steps
(measured on SmolLM2, 160-token window, 128 decode steps: KIVI-2 max |err| 1.9, median 0.015,
93 % of steps within the tolerance below; int8 and fp16 100 %).  ``passed`` therefore requires
polygraphy's comparison (*median* absolute or relative error within ``atol``/``rtol`` = 0.05) to
pass on at least ``min_pass_rate`` (90 %) of the steps, per-position logits cosine similarity >=
``min_cosine`` (0.99), and greedy agreement between export and reference >= ``min_top1`` (0.97).
A semantic error (a wrong scheme, scale, segment or position) fails by far (tested by validating
against a reference with another map); the ops' exactness is tested separately, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvcompile.artifacts import atomic_write_bytes
from kvcompile.errors import KvcompileError

DEFAULT_TEXT = "wikipedia-heldout"


@dataclass
class ValidationResult:
    passed: bool
    polygraphy_passed: bool
    max_abs_error: float
    max_rel_error: float
    median_abs_error: float
    min_cosine: float
    top1_vs_reference: float  # export vs torch with the same map
    ppl: float  # export
    ppl_reference: float  # full-precision model
    ppl_torch_same_map: float  # torch reference with the export's map
    polygraphy_pass_rate: float  # fraction of steps within atol/rtol
    kl: float  # mean KL(full precision || export) per scored position
    top1_agreement: float  # export vs full precision
    tokens_scored: int
    windows: int
    tolerances: dict = field(default_factory=dict)
    backend: str = "ort"
    polygraphy_commands: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{verdict}: export vs torch reference (same map): max |err| {self.max_abs_error:.3g}, "
                f"median |err| {self.median_abs_error:.3g}, min cosine {self.min_cosine:.6f}, "
                f"greedy agreement {self.top1_vs_reference:.4f}, polygraphy steps within tolerance "
                f"{100 * self.polygraphy_pass_rate:.1f} %\n"
                f"quality vs full precision on {self.tokens_scored} tokens: PPL {self.ppl:.3f} "
                f"(torch, same map: {self.ppl_torch_same_map:.3f}) "
                f"(reference {self.ppl_reference:.3f}, {100 * (self.ppl / self.ppl_reference - 1):+.2f} %), "
                f"KL {self.kl:.4f}, top-1 agreement {self.top1_agreement:.4f}")


def _teacher_forced(decoder, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [T, V] for a window run as prefill + one decode step per token."""
    state = decoder.start(1)
    logits, state = decoder.step(ids[None, :prefill], state)
    rows = [logits[0]]
    for t in range(prefill, len(ids)):
        logits, state = decoder.step(ids[None, t:t + 1], state)
        rows.append(logits[0])
    return np.concatenate(rows, axis=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def write_polygraphy_files(export, prefill_ids: np.ndarray, reference_logits: np.ndarray, atol: float,
                           rtol: float) -> list[str]:
    """Data-loader script, inputs and reference outputs beside the model; returns the CLI command."""
    from polygraphy.comparator import IterationResult, RunResults

    from kvcompile.runtime.ort_backend import NUMPY_DTYPES

    directory = Path(export.path)
    feeds = {"input_ids": prefill_ids.astype(np.int64)[None]}
    for g in export.groups:
        for p in g.ports:
            feeds[p.past] = np.zeros((1, len(g.heads), 0, p.width), NUMPY_DTYPES[p.dtype])
    import io

    buf = io.BytesIO()
    np.savez(buf, **feeds)
    atomic_write_bytes(directory / "validate_inputs.npz", buf.getvalue())
    script = ('"""Polygraphy data loader written by `kvcompile validate`: the prefill inputs of the first\n'
              'validation window (input_ids and an empty packed cache)."""\n'
              "from pathlib import Path\n\nimport numpy as np\n\n\n"
              "def load_data():\n"
              "    with np.load(Path(__file__).with_name('validate_inputs.npz'), allow_pickle=False) as f:\n"
              "        yield {name: f[name] for name in f.files}\n")
    atomic_write_bytes(directory / "validate_data_loader.py", script.encode())
    results = RunResults([("torch-reference", [IterationResult({"logits": reference_logits[None]},
                                                              runner_name="torch-reference")])])
    tmp = directory / ".reference_outputs.json.tmp"
    results.save(str(tmp))
    tmp.replace(directory / "reference_outputs.json")
    model = directory / "model.onnx"
    return [f"polygraphy run {model} --onnxrt --data-loader-script {directory / 'validate_data_loader.py'} "
            f"--load-outputs {directory / 'reference_outputs.json'} --atol {atol} --rtol {rtol} "
            "--check-error-stat median --onnx-outputs logits"]


def validate_export(export, *, backend: str = "ort", lm=None, text: str = DEFAULT_TEXT, window: int = 160,
                    prefill: int = 32, max_windows: int = 1, atol: float = 0.05, rtol: float = 0.05,
                    min_cosine: float = 0.99, min_top1: float = 0.97, min_pass_rate: float = 0.9, progress: bool = True,
                    write_polygraphy: bool = True, threads: int | None = None) -> ValidationResult:
    import torch
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

    from kvcompile.data import load_text
    from kvcompile.models import load_model
    from kvcompile.runtime import open_decoder
    from kvcompile.validate.quality import token_windows

    if not 1 <= prefill < window:
        raise KvcompileError(f"--prefill must be in [1, window), got {prefill} with window {window}")
    if window > export.max_context:
        raise KvcompileError(f"window of {window} tokens exceeds the export's max_context {export.max_context}")
    lm = lm if lm is not None else load_model(export.model)
    options = {"threads": threads} if backend == "ort" else {}
    exported = open_decoder(export, backend, **options)
    reference = open_decoder(export, "torch", lm=lm)
    windows = token_windows(lm.tokenizer, load_text(text), window, max_windows).numpy()

    ours, refs, fulls = [], [], []
    iterator = windows
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(windows, desc="validate", unit="window")
    for ids in iterator:
        ours.append(_teacher_forced(exported, ids, prefill))
        refs.append(_teacher_forced(reference, ids, prefill))
        with torch.no_grad():
            fulls.append(lm.model(torch.from_numpy(ids)[None]).logits[0].float().numpy())

    # polygraphy: iteration 0 = the prefill, then one iteration per decode step
    def iterations(runner, logits_list):
        its = []
        for lg in logits_list:
            its.append(IterationResult({"logits": lg[None, :prefill]}, runner_name=runner))
            its.extend(IterationResult({"logits": lg[None, t:t + 1]}, runner_name=runner)
                       for t in range(prefill, len(lg)))
        return its

    from polygraphy.logger import G_LOGGER

    run_results = RunResults([(backend, iterations(backend, ours)), ("torch-reference", iterations("torch-reference", refs))])
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR  # per-iteration histograms are too long for a terminal
    try:
        accuracy = Comparator.compare_accuracy(
            run_results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="median"))
    finally:
        G_LOGGER.module_severity = severity
    matched, _, total = (accuracy.lst[0] if hasattr(accuracy, "lst") else accuracy).stats()
    pass_rate = matched / max(total, 1)
    polygraphy_passed = pass_rate >= min_pass_rate

    ours_all, refs_all, fulls_all = (np.concatenate(x, axis=0) for x in (ours, refs, fulls))
    diff = np.abs(ours_all - refs_all)
    rel = diff / np.maximum(np.abs(refs_all), 1e-6)
    cos = (ours_all * refs_all).sum(-1) / (np.linalg.norm(ours_all, axis=-1) * np.linalg.norm(refs_all, axis=-1))
    top1_ref = float((ours_all.argmax(-1) == refs_all.argmax(-1)).mean())

    # task metrics: predict token t+1 from position t, every position but each window's last
    targets = np.concatenate([w[1:] for w in windows])
    keep = np.concatenate([np.arange(len(w) - 1) + i * len(w) for i, w in enumerate(windows)])
    logp, logp_full = _log_softmax(ours_all[keep]), _log_softmax(fulls_all[keep])
    nll = -logp[np.arange(len(targets)), targets].mean()
    nll_full = -logp_full[np.arange(len(targets)), targets].mean()
    logp_same = _log_softmax(refs_all[keep])
    nll_same = -logp_same[np.arange(len(targets)), targets].mean()
    kl = float((np.exp(logp_full) * (logp_full - logp)).sum(-1).mean())
    top1 = float((logp.argmax(-1) == logp_full.argmax(-1)).mean())

    min_cos = float(cos.min())
    commands = write_polygraphy_files(export, windows[0][:prefill], refs[0][:prefill], atol, rtol) \
        if write_polygraphy and backend == "ort" else []
    return ValidationResult(
        passed=polygraphy_passed and min_cos >= min_cosine and top1_ref >= min_top1,
        polygraphy_passed=polygraphy_passed, max_abs_error=float(diff.max()), max_rel_error=float(rel.max()),
        median_abs_error=float(np.median(diff)), min_cosine=min_cos, top1_vs_reference=top1_ref,
        ppl=float(np.exp(nll)), ppl_reference=float(np.exp(nll_full)), ppl_torch_same_map=float(np.exp(nll_same)),
        kl=kl, top1_agreement=top1, polygraphy_pass_rate=float(pass_rate),
        tokens_scored=int(len(targets)), windows=len(windows),
        tolerances={"atol": atol, "rtol": rtol, "error_stat": "median", "min_pass_rate": min_pass_rate,
                    "min_cosine": min_cosine, "min_top1": min_top1},
        backend=backend, polygraphy_commands=commands)


def save_result(result: ValidationResult, path) -> None:
    atomic_write_bytes(path, (json.dumps(result.to_json(), indent=1) + "\n").encode())
