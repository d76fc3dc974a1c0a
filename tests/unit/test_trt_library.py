"""The compiled TensorRT plugin library (plugins/, C++ + CUDA) up to the GPU boundary.

No GPU here: the kernels' block programs (plugins/src/programs.h, the source nvcc compiles) run on
the CPU through the library's C API and are checked against the torch reference exactly as the
ONNX Runtime library is (tests/unit/test_native.py: present parts bit-identical, the attention
output within a derived bound); the plugin's host logic (ports, shapes, workspace, fields) is
called through the same API; the embedded fat binary is parsed for its cubins' architectures,
kernel names and parameter sizes.  Engines built with the library are tested in test_trt.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kvcompile.ops import KV_ATTENTION
from kvcompile.targets.trt.library import PLUGIN_NAME, HostApi, library_path, require_library

from .test_native import CASES, STEPS, attention_case, run_steps
from .test_window_attention import CASES as WINDOW_CASES
from .test_window_attention import STEPS as WINDOW_STEPS
from .test_window_attention import run_steps as run_window_steps

BYTES = {"float32": 4, "float16": 2, "int8": 1}
KERNELS = ("kvc_update", "kvc_attend")
CUBIN_ARCHS = {80, 86, 89, 90, 120}


@pytest.fixture(scope="module")
def api():
    assert library_path() is not None, "libkvcompile_trt.so is not built; install.sh builds it (cmake -S plugins)"
    return HostApi()


def emulate(api):
    return lambda attrs, inputs: api.emulate(attrs, inputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gpu_kernels_source_matches_the_reference_over_prefill_and_decode(api, case):
    assert run_steps(CASES[case], STEPS, run=emulate(api)) == sum(STEPS)


def test_the_gpu_kernels_source_handles_mqa_multi_head_attention_and_long_caches(api):
    attrs = attention_case(("fp16", "fp16", "int4-ch"), ("fp16", "int8", "int4"), q_per_kv=4)
    run_steps(attrs, [5, 1, 30, 1], batch=1, kv_heads=1, run=emulate(api))
    attrs = attention_case(("fp16", "fp16", "int2"), ("fp16", "fp16", "int2"), q_per_kv=1)
    run_steps(attrs, [9, 1, 1], batch=2, kv_heads=3, run=emulate(api))
    # Gemma-3-like MQA at head dim 256: the 4 query heads need two attend blocks (shared memory)
    attrs = attention_case(("fp16", "fp16", "int4-ch"), ("fp16", "int8", "nf4"), q_per_kv=4, head_dim=256)
    run_steps(attrs, [6, 1, 20, 1], batch=1, kv_heads=1, run=emulate(api))
    # past 256 positions, decode steps and short prefills split the positions into chunks: the split-K
    # merge by the last chunk (with -rot values: the rotated accumulator rotated back there)
    attrs = attention_case(("fp16", "int8", "int2-ch"), ("fp16", "int8", "int4"), q_per_kv=2)
    run_steps(attrs, [520, 1, 1], batch=1, kv_heads=1, run=emulate(api))
    run_steps(CASES["rotated"], [300, 1, 5], run=emulate(api))


@pytest.mark.parametrize("head_dim", [32, 128, 256])
def test_the_gpu_kernels_source_at_other_head_dims(api, head_dim):
    attrs = attention_case(("fp16", "int8", "int2-ch"), ("fp16", "int4-g64" if head_dim >= 64 else "int4",
                                                            "int2-rot" if head_dim != 32 else "int2"), head_dim=head_dim)
    run_steps(attrs, [9, 1, 40, 1], batch=1, run=emulate(api))


def window_case(name):
    from kvcompile.ops.window_attention import window_attrs

    key, value, window, r, d = WINDOW_CASES[name]
    return window_attrs(key, value, window, d, r, d ** -0.5), 1 if r == 4 else 2


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_the_gpu_kernels_source_runs_window_attention_as_the_reference(api, case):
    """KVWindowAttention: the append blocks quantize the new rows and write the kept window, the
    attend blocks read the past rows in place and the new ones, within each query's window."""
    attrs, kv_heads = window_case(case)
    held = run_window_steps(attrs, WINDOW_STEPS, kv_heads=kv_heads, run=emulate(api))
    assert max(held) == attrs["window"] - 1
    # a wide window: decode over > 256 stored positions splits them into chunks merged on the device
    from kvcompile.ops.window_attention import window_attrs

    run_window_steps(window_attrs("int4", "int8", 700, 64, 2, 0.125), [690, 1, 30, 1], batch=1, kv_heads=1,
                     run=emulate(api))


def test_window_attention_shapes_fields_workspace_and_bad_input(api):
    from kvcompile.ops import KV_WINDOW_ATTENTION

    attrs, _ = window_case("int4 keys, int8 values")
    ins, outs = api.io(attrs)
    assert ins == [BYTES[p.dtype] for p in KV_WINDOW_ATTENTION.inputs(attrs)]
    assert outs == [BYTES[p.dtype] for p in KV_WINDOW_ATTENTION.outputs(attrs)]
    got = dict(line.split("=", 1) for line in api.field_roundtrip(attrs).splitlines())
    assert list(got) == [a.name for a in KV_WINDOW_ATTENTION.attributes] and got["window"] == "8"
    widths = [int(p.shape[-1]) for p in KV_WINDOW_ATTENTION.inputs(attrs)[3:]]
    for past, added, kept in [(0, 5, 5), (5, 1, 6), (7, 1, 7), (7, 20, 7), (0, 3, 3)]:
        dims = api.output_dims(attrs, [(2, 6, added, 64), (2, 2, added, 64), (2, 2, added, 64)] +
                               [(2, 2, past, w) for w in widths])
        assert dims == [(2, 6, added, 64)] + [(2, 2, kept, w) for w in widths], (past, added)
        assert api.workspace_size(attrs, 2, 2, added, past + added, exact=True) <= api.workspace_size(attrs, 4, 2, 64, 71)
    too_long = [np.zeros((1, 2, 8, w), np.int8 if i in (0, 3) else np.float16) for i, w in enumerate(widths)]
    with pytest.raises(ValueError, match="holds 8 positions, expected at most window - 1 = 7"):
        api.emulate(attrs, [np.zeros((1, 6, 1, 64)), np.zeros((1, 2, 1, 64)), np.zeros((1, 2, 1, 64)), *too_long])


def reference_shapes(attrs, batch, kv_heads, past, added):
    """Output shapes of the torch reference after `past` positions and `added` more."""
    r, d = attrs["q_per_kv"], attrs["head_dim"]
    ports = KV_ATTENTION.inputs(attrs)
    dt = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
    state = [torch.zeros(batch, kv_heads, 0, int(p.shape[-1]), dtype=dt[p.dtype]) for p in ports[3:]]
    for n in ([past] if past else []) + [added]:
        q, k = torch.randn(batch, kv_heads * r, n, d), torch.randn(batch, kv_heads, n, d)
        out = KV_ATTENTION.reference(attrs, q, k, k.clone(), *state)
        state = list(out[1:])
    return [tuple(t.shape) for t in out], [tuple(t.shape) for t in state]


@pytest.mark.parametrize("case", ["kivi-style", "tiers", "mixed widths"])
def test_output_shapes_for_prefill_decode_and_profile_bounds_equal_the_reference(api, case):
    attrs = CASES[case]
    for past, added in [(0, 7), (7, 1), (40, 1), (63, 1), (64, 1), (0, 128), (127, 1), (100, 28)]:
        want, past_state = reference_shapes(attrs, 2, 2, past, added)
        _, before = reference_shapes(attrs, 2, 2, 0, past) if past else (None, None)
        r, d = attrs["q_per_kv"], attrs["head_dim"]
        in_dims = [(2, 2 * r, added, d), (2, 2, added, d), (2, 2, added, d)]
        in_dims += before if past else [(2, 2, 0, int(p.shape[-1])) for p in KV_ATTENTION.inputs(attrs)[3:]]
        assert api.output_dims(attrs, in_dims) == want, (past, added)


def test_ports_and_format_support_follow_the_op_spec(api):
    for attrs in CASES.values():
        ins, outs = api.io(attrs)
        assert ins == [BYTES[p.dtype] for p in KV_ATTENTION.inputs(attrs)]
        assert outs == [BYTES[p.dtype] for p in KV_ATTENTION.outputs(attrs)]
        for pos, want in enumerate(ins + outs):
            assert api.supports(attrs, pos, want)
            assert not api.supports(attrs, pos, want, linear=False)
            for other in {1, 2, 4} - {want}:
                assert not api.supports(attrs, pos, other)


def test_fields_survive_serialization_and_deserialization(api):
    for attrs in CASES.values():
        text = api.field_roundtrip(attrs)
        got = dict(line.split("=", 1) for line in text.splitlines())
        assert list(got) == [a.name for a in KV_ATTENTION.attributes]
        for name, value in attrs.items():
            if name == "scale":
                assert np.float32(got[name]) == np.float32(value)
            else:
                assert got[name] == str(value), name


def test_the_workspace_covers_every_call_up_to_the_profile_maximum(api):
    for attrs in (CASES["tiers"], CASES["rotated"], attention_case(("fp16", "fp16", "int2-ch"), ("fp16", "fp16", "int2"),
                                                                   q_per_kv=4, head_dim=256)):
        bound = api.workspace_size(attrs, 4, 2, 2048, 8192)
        for batch in (1, 2, 4):
            for added in (1, 7, 64, 300, 2048):
                for total in (added, added + 1, 256, 1000, 4096, 8192):
                    if total >= added:
                        assert 0 < api.workspace_size(attrs, batch, 2, added, total, exact=True) <= bound
    attrs = CASES["tiers"]
    # it grows with the batch and the new positions, not with the context: the append buffers hold at
    # most the new positions plus the tiers' windows, and split-K partials are capped
    assert api.workspace_size(attrs, 2, 2, 1, 512) > api.workspace_size(attrs, 1, 2, 1, 512)
    assert api.workspace_size(attrs, 1, 2, 64, 512) > api.workspace_size(attrs, 1, 2, 1, 512)
    assert api.workspace_size(attrs, 1, 2, 1, 1 << 20) == api.workspace_size(attrs, 1, 2, 1, 512)
    assert api.workspace_size(attrs, 1, 2, 1, 1 << 20) < 8 << 20  # a decode step: under 8 MiB at a million positions


def test_bad_input_is_one_clear_line(api):
    attrs = CASES["kivi-style"]
    ports = KV_ATTENTION.inputs(attrs)
    empty = [np.zeros((1, 2, 0, int(p.shape[-1])), {1: np.int8, 2: np.float16, 4: np.float32}[BYTES[p.dtype]])
             for p in ports[3:]]
    q, k = np.random.randn(1, 6, 1, 64).astype(np.float32), np.random.randn(1, 2, 1, 64).astype(np.float32)
    bad = k.copy()
    bad[0, 1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN, infinite or beyond") as e:
        api.emulate(attrs, [q, bad, k, *empty])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"query \[B, H\*r, S, D\]"):
        api.emulate(attrs, [q[:, :5], k, k, *empty])
    wrong = dict(attrs, key_bulk_scheme="int5")
    with pytest.raises(ValueError, match="int5: integer schemes have 2, 3, 4 or 8 bits"):
        api.io(wrong)


def test_require_library_names_the_build_when_missing(monkeypatch, tmp_path):
    from kvcompile.errors import ExportError

    monkeypatch.setenv("KVCOMPILE_TRT_PLUGIN_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(ExportError, match="missing.so.*does not exist"):
        require_library()


# --- the embedded fat binary -------------------------------------------------------------------

def cubins(fatbin: bytes):
    """(sm, {kernel: (number of parameters, parameter bytes)}) of every ELF cubin in a fat binary
    (written by nvcc --no-compress, so the cubins are stored as they are)."""
    out, pos = [], 0
    while (pos := fatbin.find(b"\x7fELF", pos)) >= 0:
        elf = fatbin[pos:]
        pos += 4
        e_flags = struct.unpack_from("<I", elf, 48)[0]
        shoff, = struct.unpack_from("<Q", elf, 40)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 58)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + k * shentsize) for k in range(shnum)]
        names = sections[shstrndx][4]

        def name_of(offset):
            return elf[names + offset:elf.index(b"\0", names + offset)].decode()

        kernels = {}
        for sec in sections:
            name = name_of(sec[0])
            if not name.startswith(".nv.info."):
                continue
            data, i, params, size = elf[sec[4]:sec[4] + sec[5]], 0, 0, None
            while i < len(data):  # records: format, attribute, then a 16-bit value or a sized payload
                fmt, attr, value = data[i], data[i + 1], struct.unpack_from("<H", data, i + 2)[0]
                params += attr == 0x17  # EIATTR_KPARAM_INFO: one per parameter
                size = value if attr == 0x19 else size  # EIATTR_CBANK_PARAM_SIZE
                i += 4 + (value if fmt == 4 else 0)
            kernels[name.removeprefix(".nv.info.")] = (params, size)
        out.append(((e_flags >> 8) & 0xFF, kernels))
    return out


def test_the_library_embeds_a_cubin_per_architecture_with_the_three_kernels(api):
    fatbin = api.fatbin()
    assert struct.unpack_from("<I", fatbin, 0)[0] == 0xBA55ED50  # a CUDA fat binary
    found = cubins(fatbin)
    assert {sm for sm, _ in found} == CUBIN_ARCHS and len(found) == len(CUBIN_ARCHS)
    for sm, kernels in found:
        # each kernel takes the parameter struct by value: one parameter of the host's sizeof
        assert kernels == {k: (1, api.params_size()) for k in KERNELS}, sm
    assert api.params_size() <= 4096  # the kernel parameter limit of every architecture
    # PTX for GPUs newer than the newest cubin, with the same entry points
    ptx = fatbin[fatbin.find(b".version"):]
    assert b".target sm_120" in ptx
    for k in KERNELS:
        assert f".entry {k}(\n.param .align 8 .b8 {k}_param_0[{api.params_size()}]".encode() in ptx


def test_the_library_exports_only_the_tensorrt_entry_points_and_its_c_api():
    import subprocess

    symbols = subprocess.run(["nm", "-D", "--defined-only", str(require_library())], capture_output=True,
                             text=True, check=True).stdout.split()
    exported = {s for s in symbols if s.startswith(("getCreators", "setLoggerFinder", "kvc_"))}
    assert {"getCreators", "setLoggerFinder", "kvc_trt_emulate", "kvc_trt_fatbin"} <= exported
    assert PLUGIN_NAME.encode() in require_library().read_bytes()
    # nothing from TensorRT or CUDA is linked: the library loads on machines with neither
    needed = subprocess.run(["readelf", "-d", str(require_library())], capture_output=True, text=True,
                            check=True).stdout
    assert not [line for line in needed.splitlines() if "NEEDED" in line and ("nvinfer" in line or "cuda" in line
                                                                           or "tensorrt" in line)]


def test_without_a_gpu_driver_the_enqueue_is_one_line_naming_it(api):
    """The launch path up to the GPU boundary: parameters are built, then the driver is missing."""
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("a CUDA driver library is installed here")
    attrs = CASES["kivi-style"]
    q, k = torch.randn(1, 6, 1, 64), torch.randn(1, 2, 1, 64)
    empty = [torch.zeros(1, 2, 0, int(p.shape[-1]), dtype=getattr(torch, p.dtype))
             for p in KV_ATTENTION.inputs(attrs)[3:]]
    dims = api.output_dims(attrs, [tuple(t.shape) for t in (q, k, k, *empty)])
    outputs = [torch.zeros(d, dtype=torch.uint8) for d in dims]
    workspace = torch.zeros(api.workspace_size(attrs, 1, 2, 1, 1), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^KVAttention: the CUDA driver library libcuda.so.1 could not be opened"):
        api.enqueue_on_gpu(attrs, [q, k, k, *empty], outputs, workspace)


def test_the_gpu_check_script_and_its_benchmark_run_up_to_the_gpu_boundary():
    """bench/gpu_check.sh is valid shell naming files that exist; bench/plugin_speed.py runs its
    exactness check and timing loop on the CPU runner (--device cpu) and says so without a GPU."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for name in ("bench/plugin_speed.py", "bench/kernel_speed.py"):
        assert name in text and (root / name).is_file()
    assert "kvcompile validate" in text and "--backend trt" in text and "trtexec.sh" in text
    smoke = subprocess.run([sys.executable, str(root / "bench" / "plugin_speed.py"), "--device", "cpu"],
                           capture_output=True, text=True, timeout=600)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    assert "exactness: GPU == CPU runner over 20 steps" in smoke.stdout and "exactness window " in smoke.stdout
    assert "kivi-2" in smoke.stdout.split("scheme")[-1]
    if not torch.cuda.is_available():
        gpu = subprocess.run([sys.executable, str(root / "bench" / "plugin_speed.py")], capture_output=True, text=True,
                             timeout=600)
        assert gpu.returncode == 0 and "no CUDA GPU is visible; nothing measured" in gpu.stdout
