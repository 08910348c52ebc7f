"""int8_bmm: the AVX-512 VNNI batched INT8 matmul must equal the exact reference bit for bit, on every shape and
layout the attention core hands it, and fall back to the reference wherever it does not apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zqhero_fx.kernels import vnni_cpu as B

needs_kernel = pytest.mark.skipif(B.extension() is None, reason="no AVX-512 VNNI on this CPU, or the build failed")


def int8(shape, g, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=g)


def exact(a, b):  # independent of the module's reference: int64 on the CPU
    return torch.matmul(a.to(torch.int64), b.to(torch.int64)).to(torch.int32)


def test_reference_is_exact_at_the_extremes():
    a = torch.full((2, 3, 1000), -128, dtype=torch.int8)
    b = torch.full((2, 1000, 5), -128, dtype=torch.int8)
    assert torch.equal(B.int8_bmm_ref(a, b), torch.full((2, 3, 5), 128 * 128 * 1000, dtype=torch.int32))
    assert torch.equal(B.int8_bmm_ref(a, -(b + 1)), exact(a, -(b + 1)))


@needs_kernel
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1), (2, 3, 5, 7, 9), (1, 2, 4, 64, 128), (2, 12, 128, 64, 128), (1, 1, 17, 130, 33),
    (3, 1, 9, 4, 16), (1, 1, 3, 3, 80), (1, 1, 6, 5, 65), (2, 2, 129, 128, 64),
])
def test_kernel_matches_exactly(shape):
    b1, b2, m, k, n = shape
    g = torch.Generator().manual_seed(sum(shape))
    a, b = int8((b1, b2, m, k), g), int8((b1, b2, k, n), g)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), exact(a, b))


@needs_kernel
def test_saturated_operands_do_not_overflow():
    for value_a, value_b in [(-128, -128), (127, -128), (-128, 127), (127, 127)]:
        a = torch.full((1, 2, 5, 4096), value_a, dtype=torch.int8)
        b = torch.full((1, 2, 4096, 19), value_b, dtype=torch.int8)
        assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), exact(a, b))


@needs_kernel
def test_attention_layouts():
    """Q.K^T with Q, K heads-permuted views of [B, S, H, D] (K^T: unit stride along the reduction) and P.V with V a
    permuted view (unit stride along N); 2-D and 3-D operands too."""
    g = torch.Generator().manual_seed(0)
    bsz, s, h, d = 3, 37, 4, 24
    q = int8((bsz, s, h, d), g).transpose(1, 2)
    k = int8((bsz, s, h, d), g).transpose(1, 2)
    v = int8((bsz, s, h, d), g).transpose(1, 2)
    p = int8((bsz, h, s, s), g, 0, 128)
    assert torch.equal(torch.ops.zqhero.int8_bmm(q, k.transpose(-1, -2)), exact(q, k.transpose(-1, -2)))
    assert torch.equal(torch.ops.zqhero.int8_bmm(p, v), exact(p, v))
    # A with a non-unit stride along K, and a K that is not a multiple of 4: the packed-copy path
    a = int8((2, 11, 9), g).transpose(-1, -2)
    b = int8((2, 11, 6), g)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), exact(a, b))
    x, y = int8((7, 13), g), int8((13, 21), g)
    assert torch.equal(torch.ops.zqhero.int8_bmm(x, y), exact(x, y))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(b1=st.integers(1, 3), b2=st.integers(1, 3), m=st.integers(1, 40), k=st.integers(1, 150),
       n=st.integers(1, 150), seed=st.integers(0, 2**16), transpose_b=st.booleans())
def test_kernel_matches_exactly_hypothesis(b1, b2, m, k, n, seed, transpose_b):
    g = torch.Generator().manual_seed(seed)
    a = int8((b1, b2, m, k), g)
    b = int8((b1, b2, n, k), g).transpose(-1, -2) if transpose_b else int8((b1, b2, k, n), g)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), exact(a, b))


def test_empty_and_zero_length_reductions():
    a, b = torch.zeros(2, 0, 5, dtype=torch.int8), torch.zeros(2, 5, 3, dtype=torch.int8)
    assert torch.ops.zqhero.int8_bmm(a, b).shape == (2, 0, 3)
    a, b = torch.zeros(2, 4, 0, dtype=torch.int8), torch.zeros(2, 0, 3, dtype=torch.int8)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), torch.zeros(2, 4, 3, dtype=torch.int32))


def test_falls_back_to_the_reference_where_the_kernel_does_not_apply(monkeypatch):
    g = torch.Generator().manual_seed(1)
    # mismatched (broadcast) batch dims and 5-D operands are the reference's
    a, b = int8((2, 3, 4, 8), g), int8((1, 3, 8, 5), g)
    assert not B.fast_path_applies(a, b)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a, b), exact(a, b))
    a5, b5 = int8((1, 2, 2, 3, 8), g), int8((1, 2, 2, 8, 5), g)
    assert torch.equal(torch.ops.zqhero.int8_bmm(a5, b5), exact(a5, b5))
    # ZQHERO_CPU_VNNI=0 switches the kernel off
    monkeypatch.setenv("ZQHERO_CPU_VNNI", "0")
    B.extension.cache_clear()
    try:
        assert B.extension() is None and not B.fast_path_applies(a5[0], b5[0])
        assert torch.equal(torch.ops.zqhero.int8_bmm(a5[0], b5[0]), exact(a5[0], b5[0]))
    finally:
        monkeypatch.delenv("ZQHERO_CPU_VNNI")
        B.extension.cache_clear()


def test_rejects_non_int8_operands():
    with pytest.raises(TypeError, match="int8 operands"):
        torch.ops.zqhero.int8_bmm(torch.zeros(2, 3), torch.zeros(3, 2))


def test_fake_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.zqhero.int8_bmm(torch.empty(2, 5, 7, 9, dtype=torch.int8),
                                        torch.empty(2, 5, 9, 4, dtype=torch.int8))
    assert out.shape == (2, 5, 7, 4) and out.dtype == torch.int32


@needs_kernel
def test_attention_reference_runs_its_matmuls_on_the_kernel():
    """The CPU attention reference (what Inductor compiles on CPU) calls int8_bmm for Q.K^T and P.V, and its numbers
    equal the float32 formulation's exactly."""
    from zqhero_fx.kernels import quantized_attention as A

    g = torch.Generator().manual_seed(2)
    q, k, v = (int8((2, 3, 16, 8), g, -127) for _ in range(3))
    args = (q, k, v, None, 0.01, 1.0 / 127, None, False, torch.float32)
    graph = torch.fx.experimental.proxy_tensor.make_fx(A.quantized_attention_ref)(*args).graph
    assert sum(n.target is torch.ops.zqhero.int8_bmm.default for n in graph.nodes) == 2
    with_kernel = A.quantized_attention_ref(*args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "fast_path_applies", lambda a, b: False)
        assert torch.equal(A.quantized_attention_ref(*args), with_kernel)


# ---------------------------------------------------------------- the fused attention kernel (zqhero::int8_attention)
def attention_operands(b, h, hkv, sq, sk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return int8((b, h, sq, d), g, -127), int8((b, hkv, sk, d), g, -127), int8((b, hkv, sk, d), g, -127)


@needs_kernel
def test_attention_kernel_bool_mask_equals_its_additive_form():
    """A boolean keep-mask goes to the kernel as it is; it must give what the reference's 0 / -inf float mask gives,
    read with unit or non-unit stride along the keys."""
    ext = B.extension()
    q, k, v = attention_operands(2, 6, 2, 3, 45, 64, seed=3)
    keep = torch.rand(2, 1, 3, 45, generator=torch.Generator().manual_seed(4)) > 0.4
    additive = torch.where(keep, 0.0, float("-inf"))
    keep_strided = keep.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride 3 along the keys
    expected = ext.int8_attention(q, k, v, additive.expand(2, 6, 3, 45), 0.01, 1 / 127, None, False)
    for mask in (keep, keep_strided):
        assert torch.equal(ext.int8_attention(q, k, v, mask.expand(2, 6, 3, 45), 0.01, 1 / 127, None, False), expected)


@needs_kernel
def test_attention_kernel_same_numbers_for_any_thread_count_and_after_other_shapes():
    """Rows are cut into work items by thread count (one decode row per item when threads outnumber rows), and every
    thread keeps its buffers between calls; neither may change a single bit."""
    ext = B.extension()
    decode = attention_operands(2, 9, 3, 1, 300, 64, seed=5)
    prefill = attention_operands(1, 4, 1, 20, 20, 48, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = ext.int8_attention(*decode, None, 0.01, 1 / 127, None, False)
        for count in (2, 7, 32):
            torch.set_num_threads(count)
            assert torch.equal(ext.int8_attention(*decode, None, 0.01, 1 / 127, None, False), expected)
    finally:
        torch.set_num_threads(threads)
    # A longer cache, then a shorter one with another head dim and causal rows, then the first again.
    first = ext.int8_attention(*prefill, None, 0.01, 1 / 127, None, True)
    ext.int8_attention(*attention_operands(1, 2, 2, 3, 700, 128, seed=7), None, 0.01, 1 / 127, None, False)
    assert torch.equal(ext.int8_attention(*prefill, None, 0.01, 1 / 127, None, True), first)
    assert torch.equal(ext.int8_attention(*decode, None, 0.01, 1 / 127, None, False), expected)


@needs_kernel
def test_attention_kernel_refuses_heads_that_do_not_pair():
    ext = B.extension()
    q, k, v = attention_operands(1, 6, 4, 2, 8, 32, seed=8)
    with pytest.raises(RuntimeError, match="6 query heads cannot share 4"):
        ext.int8_attention(q, k, v, None, 0.01, 1 / 127, None, False)
    with pytest.raises(RuntimeError, match="do not pair"):
        ext.int8_attention(q, k[:, :2], v[:, :3], None, 0.01, 1 / 127, None, False)


# ---------------------------------------------------------------- the build itself, CPU features
def test_cpu_features():
    features = B.cpu_features()
    assert set(features) == {"model", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}
    assert isinstance(features["model"], str) and features["model"]
    assert all(isinstance(features[k], bool) for k in features if k != "model")
    assert B.cpu_has_vnni() == (features["avx512f"] and features["avx512bw"] and features["avx512_vnni"])


def test_source_is_package_data_and_named_by_its_hash(tmp_path, monkeypatch):
    assert B.CPP_PATH.is_file() and "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in B.CPP_SOURCE
    assert 'kernels/csrc/*.cpp' in (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    name = B.extension_name()
    assert name.startswith("zqhero_vnni_cpu_") and name.isidentifier() and name == B.extension_name()
    edited = tmp_path / "vnni_cpu.cpp"
    edited.write_text(B.CPP_SOURCE + "\n// edited\n")
    monkeypatch.setattr(B, "CPP_PATH", edited)
    assert B.extension_name() != name  # an edited .cpp never loads the stale cached build


_FRESH_BUILD = """
import json, warnings
{before}
import zqhero_fx
from zqhero_fx.kernels import vnni_cpu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ext = vnni_cpu.extension()
import torch
a = torch.randint(-128, 128, (2, 3, 9, 40), dtype=torch.int8)
b = torch.randint(-128, 128, (2, 3, 40, 17), dtype=torch.int8)
print(json.dumps({{"built": ext is not None, "name": getattr(ext, "__name__", None),
                  "exact": ext is not None and torch.equal(ext.int8_bmm(a, b), torch.matmul(a.long(), b.long()).int()),
                  "setuptools_use_distutils": __import__("os").environ.get("SETUPTOOLS_USE_DISTUTILS"),
                  "warnings": [str(w.message) for w in caught]}}))
"""


@pytest.mark.skipif(not B.cpu_features()["avx512_vnni"], reason="the CPU lacks AVX-512 VNNI")
@pytest.mark.slow  # two from-scratch C++ builds, ~35 s each
@pytest.mark.parametrize("before", [
    "import setuptools, distutils",
    # what the asset fetcher's pip check does on a fresh machine: it switches setuptools' distutils shim off, and the
    # first build used to fail with `AssertionError: .../distutils/core.py`
    "import importlib.util; importlib.util.find_spec('pip')",
], ids=["setuptools-distutils-first", "pip-looked-up-first"])
def test_first_build_in_a_fresh_process(tmp_path, before):
    """A first build (empty TORCH_EXTENSIONS_DIR) in a fresh process works whatever was imported before it."""
    env = {k: v for k, v in os.environ.items() if k not in ("SETUPTOOLS_USE_DISTUTILS", "ZQHERO_CPU_VNNI")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    proc = subprocess.run([sys.executable, "-c", _FRESH_BUILD.format(before=before)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [w for w in result["warnings"] if "did not build" in w], result["warnings"]
    assert result["built"] and result["exact"]
    assert result["name"] == B.extension_name()
    assert result["setuptools_use_distutils"] is None  # the work-around must not leak into the environment
