"""The torch.library side of the ops: schemas and fake impls (torch.compile tracing), and kernel selection through
the one dispatch table (zqhero_fx/dispatch.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.kernel_checks import INTERPRET, random_int8
from zqhero_fx import dispatch, ops
from zqhero_fx.kernels import REFERENCES as OPS
from zqhero_fx.kernels import use_kernels

FP8 = torch.float8_e4m3fn


def sample_calls():
    """One small, representative call per op: (op name, args)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    q8 = random_int8((2, 5, 16), g)
    w = random_int8((12, 16), g)
    qa = random_int8((2, 2, 5, 32), g)
    table = random_int8((10, 16), g)
    w_up = random_int8((12, 16), g)
    x_heads = torch.randn(2, 5, 3, 16, generator=g).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    cos, sin = torch.randn(2, 2, 5, 16, generator=g)
    return [
        ("quantize_per_token", (x,)),
        ("quantize", (x, torch.rand(16, generator=g) + 0.1)),
        ("dequantize", (q8, torch.rand(2, 5, 1, generator=g), torch.float16)),
        ("norm_quant", (x.half(), x.float(), torch.ones(16), torch.zeros(16), 1e-5, True, True)),
        ("norm_quant", (x, None, torch.ones(16), None, 1e-5, False, True)),
        ("quantized_linear", (q8, torch.rand(2, 5, 1), w, torch.rand(12), torch.rand(12), None, torch.rand(12), "gelu",
                         torch.int8)),
        ("quantized_linear", (q8, torch.rand(1) * 0.01, w, torch.rand(12), None, torch.randn(2, 5, 12).half(), None, "none",
                         torch.float16)),
        ("quantized_attention", (qa, qa, qa, torch.zeros(2, 1, 1, 5), 0.01, 1 / 127, None, False, torch.float32)),
        ("quantized_attention", (qa, qa, qa, None, 0.01, 1 / 127, torch.rand(2, 1, 32), True, torch.int8)),
        ("quantized_embedding", (torch.randint(0, 10, (2, 3), generator=g), table, torch.rand(10, 1), torch.float32)),
        ("embedding_norm_quant", (
            [torch.randint(0, 10, (2, 3), generator=g), torch.arange(3)[None]],
            [table, torch.randn(4, 16, generator=g)],
            [torch.rand(10, 1), torch.empty(0)],
            torch.ones(16), None, 1e-12, True,
        )),
        ("norm_quant", (x, None, torch.ones(16), None, 1e-6, True, False, "rms")),
        ("quantized_gated_linear", (q8, torch.rand(2, 5, 1) * 1e-3, w, torch.rand(12), w_up, torch.rand(12), "silu",
                                    None, torch.float16)),
        ("quantized_gated_linear", (q8, torch.rand(1) * 0.01, w, torch.rand(12), w_up, torch.rand(12), "gelu_tanh",
                                    torch.rand(12), torch.int8)),
        ("rotary_quantize", (x_heads, cos, sin, torch.tensor([0.02]), torch.int8)),
        ("rotary_quantize", (x_heads, cos[:1, :, :8], sin[:1, :, :8], torch.tensor([0.02]), torch.int8)),
        *packed_calls(g),
    ]


def packed_calls(g):
    """packed_linear's operand shapes: A8W4 (INT8 x uint4, integer group scales) and FP6 weight-only; W4A8 (FP8
    activations) with the FP8 calls."""
    from zqhero_fx.weight_quant import WeightScheme, quantize_weight

    w = torch.randn(12, 32, generator=g) * 0.1
    x = torch.randn(2, 5, 32, generator=g)
    a8w4 = quantize_weight(w, WeightScheme("int4", 16, "integer", zero_point=True)).operands()
    fp6 = quantize_weight(w, WeightScheme("fp6")).operands()
    return [
        ("packed_linear", (random_int8((2, 5, 32), g), torch.rand(2, 5, 1) * 0.01, *a8w4, torch.rand(12), None, None,
                           "gelu", torch.float32)),
        ("packed_linear", (x, None, *fp6, None, None, torch.rand(12) * 0.05, "silu", torch.int8)),
    ]


def fp8_calls():
    """The same ops on FP8 E4M3 operands: the dtypes say the format (packed_linear: W4A8)."""
    from zqhero_fx.weight_quant import WeightScheme, quantize_weight

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g)
    q8 = x.to(FP8)
    w = torch.randn(12, 16, generator=g).to(FP8)
    qa = torch.randn(2, 2, 5, 32, generator=g).to(FP8)
    kv = torch.randn(2, 1, 5, 32, generator=g).to(FP8)  # one K/V head shared by two query heads (MQA)
    w_up = torch.randn(12, 16, generator=g).to(FP8)
    cos, sin = torch.randn(2, 5, 8, generator=g)
    return [
        ("quantize_per_token", (x, FP8)),
        ("quantize", (x, torch.rand(16, generator=g) + 0.1, FP8)),
        ("dequantize", (q8, torch.rand(2, 5, 1, generator=g), torch.float32)),
        ("norm_quant", (x, x, torch.ones(16), None, 1e-6, False, True, "rms", FP8)),
        ("quantized_linear", (q8, torch.rand(2, 5, 1), w, torch.rand(12), None, None, torch.rand(12), "silu", FP8)),
        ("quantized_attention", (qa, kv, kv, None, 0.01, 1 / 448, None, True, torch.float32)),
        ("quantized_embedding", (torch.randint(0, 10, (2, 3), generator=g), torch.randn(10, 16).to(FP8),
                                 torch.rand(10, 1), torch.float32)),
        ("quantized_gated_linear", (q8, torch.rand(2, 5, 1), w, torch.rand(12), w_up, torch.rand(12), "silu",
                                    torch.rand(12), FP8)),
        ("rotary_quantize", (x.reshape(2, 5, 2, 8).transpose(1, 2), cos, sin, torch.tensor([0.01]), FP8)),
        ("packed_linear", (torch.randn(2, 5, 32, generator=g).to(FP8), torch.rand(1) * 0.01, *quantize_weight(
            torch.randn(12, 32, generator=g) * 0.1, WeightScheme("fp4", 16, "power_of_two_ratio", lorc_rank=2)
        ).operands(), None, torch.randn(2, 5, 12), None, "none", torch.float32)),
    ]


CALLS = sample_calls()
CALL_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CALLS)]
FP8_CALLS = fp8_calls()


def test_every_op_has_a_reference_and_a_registration():
    assert set(OPS) == set(ops.OPS) == {
        "quantize_per_token", "quantize", "dequantize", "norm_quant", "quantized_linear", "quantized_attention",
        "quantized_embedding", "embedding_norm_quant", "quantized_gated_linear", "rotary_quantize", "packed_linear",
    }
    for name in OPS:
        assert hasattr(torch.ops.zqhero, name)
    assert {name for name, _ in CALLS} == set(OPS)


@pytest.mark.parametrize("name, args", FP8_CALLS, ids=[f"{n}-fp8-{i}" for i, (n, _) in enumerate(FP8_CALLS)])
def test_opcheck_fp8(name, args):
    # The same schemas carry FP8 operands. opcheck's schema test compares float8 inputs with ops torch does not
    # implement for float8 (mul), so it runs only where the inputs are float; the fake-tensor and AOT-dispatch checks
    # run everywhere.
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args)
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if fp8_inputs else (
        "test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    with use_kernels("reference"):
        torch.library.opcheck(getattr(torch.ops.zqhero, name).default, args, test_utils=utils)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name, args", FP8_CALLS, ids=[f"{n}-fp8-{i}" for i, (n, _) in enumerate(FP8_CALLS)])
def test_fp8_operands_run_their_triton_kernel_or_say_why_not(name, args):
    op = getattr(torch.ops.zqhero, name)
    with use_kernels("reference"):
        expected = op(*args)
    with use_kernels("triton"):  # GQA included: the kernel reads each shared K/V head in place
        got = op(*args)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-5, atol=1e-5)


def test_a_quantized_output_needs_a_quantized_dtype():
    _, args = next(c for c in CALLS if c[0] == "quantized_linear")
    bad = list(args)
    bad[-1] = torch.float32  # out_scale given, float out_dtype
    with pytest.raises(ValueError, match="out_dtype must be a quantized dtype"):
        torch.ops.zqhero.quantized_linear(*bad)


@pytest.mark.parametrize("choice", [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
])
@pytest.mark.parametrize("name, args", CALLS, ids=CALL_IDS)
def test_opcheck(name, args, choice):
    # Schema, fake impl (shapes/dtypes/devices match the real outputs) and AOT-dispatch tracing, which is what
    # torch.compile relies on, for both implementations.
    with use_kernels(choice):
        torch.library.opcheck(
            getattr(torch.ops.zqhero, name).default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_torch_compile_traces_the_ops_and_keeps_the_runtime_choice():
    # fullgraph: every op must trace through its fake impl. The choice is made when the op runs, not when it is
    # traced, so one compiled graph follows use_kernels.
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 24, generator=g), torch.randn(3, 24, generator=g)
    w = random_int8((8, 24), g)

    def block(x, residual):
        q, s, _, summed = torch.ops.zqhero.norm_quant(x, residual, torch.ones(24), None, 1e-5, False, True)
        y = torch.ops.zqhero.quantized_linear(q, s, w, torch.full((8,), 0.01), None, None, None, "gelu", torch.float32)
        return y, summed

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with use_kernels("reference"):
        expected = block(x, residual)
        got_reference = compiled(x, residual)
    with use_kernels("triton"):
        calls = []
        spec = dispatch.KERNELS["quantized_linear"]

        def spy(*args):
            calls.append(1)
            return spec.triton(*args)

        dispatch.KERNELS["quantized_linear"] = dataclasses.replace(spec, triton=spy)
        try:
            got_triton = compiled(x, residual)
        finally:
            dispatch.KERNELS["quantized_linear"] = spec
    assert calls, "the compiled graph should have run the Triton kernel under use_kernels('triton')"
    for got in (got_reference, got_triton):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], expected[1])


LAUNCHED = ["quantize_per_token", "norm_quant", "quantized_linear", "quantized_attention", "quantized_embedding",
            "embedding_norm_quant", "quantized_gated_linear", "rotary_quantize"]


@pytest.mark.parametrize("name", LAUNCHED)
def test_kernel_selection(name, monkeypatch):
    # auto and reference keep CPU tensors on the reference (or a CPU kernel, never Triton); triton (by use_kernels or
    # $ZQHERO_KERNELS) forces the launcher; without the interpreter, forcing it on CPU is a clear error rather than a
    # crash in Triton.
    args = next(a for n, a in CALLS if n == name)
    calls = []
    spec = dispatch.KERNELS[name]
    monkeypatch.setitem(dispatch.KERNELS, name, dataclasses.replace(
        spec, triton=lambda *a: calls.append(1) or OPS[name](*a)))
    op = getattr(torch.ops.zqhero, name)
    monkeypatch.delenv("ZQHERO_KERNELS", raising=False)
    op(*args)
    with use_kernels("reference"):
        op(*args)
    assert not calls
    with use_kernels("triton"):
        op(*args)
    assert len(calls) == 1
    monkeypatch.setenv("ZQHERO_KERNELS", "triton")
    op(*args)
    assert len(calls) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        op(*args)
