"""quantized_attention: INT8 (and FP8) QK^T, softmax with quantized probabilities, quantized P.V, against the
reference.

The kernel makes two passes over the keys (exact row max, then quantized P.V against it), so it quantizes p exactly as
the reference does; what differs is only exp's last bit and the order of the row sum. Float outputs therefore agree to
a few ulps, and an INT8 output or a probability that sits within an ulp of a rounding boundary can move one step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FP8_DTYPES,
    assert_int8_close,
    assert_quantized_close,
    random_fp8,
    random_int8,
    run_reference,
    run_triton,
    small_int_fp8,
)
from zqhero_fx import formats
from zqhero_fx.kernels import quantized_attention as A
from zqhero_fx.kernels import vnni_cpu

P_SCALE = 1.0 / 127


def make_inputs(b, h, sq, sk, d, seed, *, mask="none", causal=False, out_scale=None, out_dtype=torch.float32,
                temperature=1.0, kv_heads=None):
    """q [B, H, Sq, D], k and v [B, kv_heads (default H), Sk, D] and the op's other arguments."""
    g = torch.Generator().manual_seed(seed)
    hkv = h if kv_heads is None else kv_heads
    q, k, v = random_int8((b, h, sq, d), g), random_int8((b, hkv, sk, d), g), random_int8((b, hkv, sk, d), g)
    # s_q * s_k * 1/sqrt(d) for activations whose absmax maps to 127: logits of order +-10 at temperature 1.
    qk_scale = temperature * (4.0 / 127) ** 2 / math.sqrt(d)
    if mask == "float":  # BERT's additive padding mask [B, 1, 1, Sk]: the last keys of each sequence padded
        m = torch.zeros(b, 1, 1, sk)
        for i in range(b):
            m[i, ..., max(1, sk - 3 * i - 2):] = torch.finfo(torch.float32).min if i % 2 else float("-inf")
    elif mask == "bool":  # a full [B, 1, Sq, Sk] keep-mask
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    elif mask == "bool_heads":  # broadcast over batch and queries, one pattern per head
        m = torch.rand(1, h, 1, sk, generator=g) > 0.5
    elif mask == "float_2d":  # [Sq, Sk]: broadcasts over batch and heads
        m = torch.randn(sq, sk, generator=g)
    elif mask == "cache":  # a decoder's key cache [B, 1, Sq, Sk]: sequence i fills its first Sk - 3i - 5 slots
        filled = torch.tensor([max(1, sk - 3 * i - 5) for i in range(b)])
        m = (torch.arange(sk) < filled[:, None]).view(b, 1, 1, sk).expand(b, 1, sq, sk).contiguous()
    else:
        m = None
    if out_scale == "feature":  # FWQ on the attention output: [H, 1, D]
        os_ = torch.rand(h, 1, d, generator=g) * 0.5 + 0.3
    elif out_scale == "scalar":
        os_ = torch.tensor([0.5])
    else:
        os_ = None
    # A requantized output is INT8; otherwise the float dtype asked for.
    return (q, k, v, m, qk_scale, P_SCALE, os_, causal, torch.int8 if os_ is not None else out_dtype)


def check(args, device):
    out = run_triton("quantized_attention", device, *args)
    ref = run_reference("quantized_attention", *args)
    assert_attention_close(out, ref)
    return out, ref


def assert_attention_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.int8:
        assert_int8_close(out, ref)
    else:
        # Outputs are in units of V's int8 values (|out| <= 127). Almost all agree to float rounding; a probability
        # flipping one INT8 step moves its row by at most 127 * p_scale / rowsum <= 1.
        diff = (out.float() - ref.float()).abs()
        tight = 1e-4 * (1 + ref.float().abs()) if out.dtype == torch.float32 else 2e-2 * (1 + ref.float().abs())
        assert diff.max() <= 1.0 + float(tight.max()), float(diff.max())
        assert (diff > tight).float().mean() <= 1e-3, float((diff > tight).float().mean())


CASES = [  # (B, H, Sq, Sk, D)
    (1, 1, 1, 1, 32),
    (2, 3, 17, 17, 64),
    (1, 2, 130, 130, 128),
    (2, 2, 5, 130, 64),
    (1, 1, 130, 7, 32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["none", "float", "bool", "bool_heads", "float_2d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_quantized_attention_masks(device, case, mask):
    check(make_inputs(*case, seed=1, mask=mask), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_scale", ["feature", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_quantized_attention_causal_requantized(device, case, out_scale):
    # Causal with Sq < Sk, Sq > Sk (early queries see no key at all) and Sq == Sk; INT8 output.
    check(make_inputs(*case, seed=2, mask="float", causal=True, out_scale=out_scale), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_quantized_attention_half_outputs(device, out_dtype):
    check(make_inputs(2, 2, 33, 40, 64, seed=3, mask="bool", out_dtype=out_dtype), device)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_fully_masked_rows_give_zero(device):
    args = list(make_inputs(2, 2, 6, 20, 32, seed=4, mask="bool"))
    mask = args[3]
    mask[0, :, 2] = False  # query 2 of batch 0 attends to nothing
    mask[1] = False  # batch 1 attends to nothing at all
    out, ref = check(tuple(args), device)
    assert torch.all(out[0, :, 2] == 0) and torch.all(out[1] == 0)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_peaked_and_flat_softmax(device):
    # Very sharp logits (one key takes all the mass, p_q = 127 / 0) and very flat ones (every p_q near 127).
    check(make_inputs(1, 2, 20, 50, 64, seed=5, temperature=50.0), device)
    check(make_inputs(1, 2, 20, 50, 64, seed=5, temperature=1e-3), device)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_strided_heads(device):
    # q, k, v as the projections produce them: [B, S, H * D] viewed as [B, S, H, D] and transposed to
    # [B, H, S, D]; V also as a [B, H, D, S] tensor transposed back (K-major for the P.V dot).
    g = torch.Generator().manual_seed(6)
    b, s, h, d = 2, 19, 3, 32
    q = random_int8((b, s, h * d), g).view(b, s, h, d).transpose(1, 2)
    k = random_int8((b, s, h * d), g).view(b, s, h, d).transpose(1, 2)
    v = random_int8((b, h, d, s), g).transpose(-1, -2)
    assert not q.is_contiguous() and v.stride(-2) == 1
    check((q, k, v, None, 0.001, P_SCALE, None, False, torch.float32), device)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_three_dim_inputs(device):
    q, k, v, *rest = make_inputs(1, 4, 9, 12, 32, seed=7)
    check((q[0], k[0], v[0], torch.zeros(12), *rest[1:]), device)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=8)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), sq=st.integers(1, 70), sk=st.integers(1, 70),
    d=st.sampled_from([32, 64, 128, 48]), mask=st.sampled_from(["none", "float", "bool", "bool_heads"]),
    causal=st.booleans(), out_scale=st.sampled_from([None, "feature", "scalar"]),
    temperature=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**31 - 1),
)
def test_quantized_attention_hypothesis(device, b, h, sq, sk, d, mask, causal, out_scale, temperature, seed):
    check(
        make_inputs(b, h, sq, sk, d, seed, mask=mask, causal=causal, out_scale=out_scale, temperature=temperature),
        device,
    )


# ---------------------------------------------------------------- GQA / MQA, decoder shapes
# K/V with Hkv heads, each shared by H / Hkv query heads and read in place. (B, H, Hkv, Sq, Sk, D, mask, causal)
GQA_CASES = [
    (2, 4, 2, 17, 17, 32, "bool", True),  # prefill: causal, plus a [B, 1, Sq, Sk] keep-mask broadcast over heads
    (2, 4, 1, 17, 17, 32, "bool", True),  # MQA prefill
    (2, 4, 2, 1, 40, 64, "cache", False),  # decode: one query row, the cache's trailing slots masked out
    (2, 4, 1, 1, 40, 64, "cache", False),  # MQA decode
    (1, 6, 2, 5, 40, 32, "float", True),  # a few new tokens against a longer cache, causal
]


def case_id(case):
    b, h, hkv, sq, sk, d, mask, causal = case
    return f"{b}x{h}/{hkv}x{sq}x{sk}x{d}-{mask}" + ("-causal" if causal else "")


def gqa_inputs(case, seed, out_scale=None):
    b, h, hkv, sq, sk, d, mask, causal = case
    return make_inputs(b, h, sq, sk, d, seed, mask=mask, causal=causal, out_scale=out_scale, kv_heads=hkv)


def with_repeated_kv(args):
    """The same operands with K and V repeated to q's heads (the reference's spelling of GQA)."""
    q, k, v, *rest = args
    return (q, A.repeat_kv_heads(q, k), A.repeat_kv_heads(q, v), *rest)


def with_empty_cache_slots_scrambled(args):
    """K and V changed in the cache slots the "cache" mask hides: a decoder's output must not move."""
    q, k, v, mask, *rest = args
    hidden = ~mask[:, :, :1, :].transpose(-1, -2)  # [B, 1, Sk, 1]: the slots no query of the sequence sees
    return (q, torch.where(hidden, -k, k), torch.where(hidden, 127 - v.abs(), v), mask, *rest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_scale", [None, "feature"])
@pytest.mark.parametrize("case", GQA_CASES, ids=case_id)
def test_quantized_attention_gqa(device, case, out_scale):
    args = gqa_inputs(case, seed=11, out_scale=out_scale)
    assert A._triton_takes(*args)
    out, _ = check(args, device)
    # Query head h reads K/V head h // (H / Hkv): bit for bit what the kernel computes on K/V repeated to H heads.
    assert torch.equal(out, run_triton("quantized_attention", device, *with_repeated_kv(args)))
    if case[6] == "cache":
        assert torch.equal(out, run_triton("quantized_attention", device, *with_empty_cache_slots_scrambled(args)))


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_gqa_fully_masked_rows_and_strided_layouts(device):
    # Causal with Sq > Sk: the first queries see no key at all and give 0, as in the reference.
    out, _ = check(gqa_inputs((1, 4, 2, 9, 5, 32, "none", True), seed=13), device)
    assert torch.all(out[:, :, :4] == 0) and not torch.isnan(out).any()
    args = list(gqa_inputs((2, 4, 1, 1, 40, 64, "cache", False), seed=13))
    args[3][1] = False  # sequence 1's cache is empty
    out, _ = check(tuple(args), device)
    assert torch.all(out[1] == 0)
    # q, k, v as the projections produce them ([B, S, heads * D] viewed and transposed), K also D-major.
    g = torch.Generator().manual_seed(14)
    b, s, h, hkv, d = 2, 11, 6, 2, 32
    q = random_int8((b, s, h * d), g).view(b, s, h, d).transpose(1, 2)
    k = random_int8((b, hkv, d, s), g).transpose(-1, -2)
    v = random_int8((b, s, hkv * d), g).view(b, s, hkv, d).transpose(1, 2)
    check((q, k, v, None, 0.001, P_SCALE, None, True, torch.float32), device)


def test_kernels_take_kv_heads_that_divide_the_query_heads():
    from zqhero_fx import dispatch

    spec = dispatch.KERNELS["quantized_attention"]
    q, k, v, *rest = make_inputs(2, 6, 3, 5, 32, seed=0, kv_heads=6)
    for kv_heads in (6, 3, 2, 1):  # MHA, GQA, MQA
        assert spec.triton_applies(q, k[:, :kv_heads], v[:, :kv_heads], *rest)
    assert not spec.triton_applies(q, k[:, :4], v[:, :4], *rest)  # 4 K/V heads cannot serve 6 query heads
    assert not spec.triton_applies(q, k[:, :2], v[:, :1], *rest)  # K and V with different heads
    assert not spec.triton_applies(q, k[:1, :2], v[:1, :2], *rest)  # broadcast K/V batch: the reference
    with pytest.raises(ValueError, match="do not pair"):
        A.quantized_attention_triton(q, k[:, :4], v[:, :4], *rest)
    if vnni_cpu.extension() is not None:
        assert A.cpu_kernel_applies(q, k[:, :2], v[:, :2], None, None)
        assert not A.cpu_kernel_applies(q, k[:, :4], v[:, :4], None, None)


# ---------------------------------------------------------------- reference semantics
def test_reference_uniform_attention_averages_v():
    # Equal logits: every p is exp(0) = 1 -> p_q = 127, so the output is exactly the mean of V.
    v = random_int8((1, 1, 8, 32), torch.Generator().manual_seed(8))
    q = torch.zeros(1, 1, 3, 32, dtype=torch.int8)
    out = A.quantized_attention_ref(q, q[:, :, :1].expand(1, 1, 8, 32), v, None, 0.1, P_SCALE, None, False, torch.float32)
    torch.testing.assert_close(out, v.float().mean(-2, keepdim=True).expand(1, 1, 3, 32), rtol=1e-6, atol=1e-5)


def test_reference_quantizes_probabilities_before_normalisation():
    # Two keys with logits 0 and log(0.5): p = [1, 0.5] -> p_q = [127, 64] (round(63.5) = 64), out = (127 v0 + 64 v1)
    # * p_scale / 1.5. Checks the INT8 step happens on the unnormalised p, with the reference's rounding.
    k = torch.tensor([[[[1], [0]]]], dtype=torch.int8)
    q = torch.tensor([[[[1]]]], dtype=torch.int8)
    v = torch.tensor([[[[100], [-50]]]], dtype=torch.int8)
    mask = torch.tensor([0.0, math.log(0.5)]) - torch.tensor([1.0, 0.0])  # logits 1 - 1 = 0 and log(0.5)
    out = A.quantized_attention_ref(q, k, v, mask, 1.0, P_SCALE, None, False, torch.float32)
    p = torch.exp(torch.tensor([0.0, math.log(0.5)]))
    expected = (torch.round(p / P_SCALE) * torch.tensor([100.0, -50.0])).sum() * P_SCALE / p.sum()
    torch.testing.assert_close(out.flatten(), expected.reshape(1))


def test_autotune_space_is_bounded():
    assert 0 < len(A.ATTENTION_CONFIGS) <= 8
    for sq in (1, 64, 512):
        assert A._prune_attention_configs(A.ATTENTION_CONFIGS, {"sq_bucket": sq})


# ---------------------------------------------------------------- the fused CPU kernel (AVX-512 VNNI, vnni_cpu.py)
# Held to the Triton kernel's tolerances: its Q.K^T and P.V are exact too; exp and the row-sum order differ.
needs_vnni = pytest.mark.skipif(vnni_cpu.extension() is None, reason="no AVX-512 VNNI here, or the build failed")


def check_cpu_kernel(args):
    q, k, v, mask, *_ = args
    assert A.cpu_kernel_applies(q, k, v, mask, args[6])
    out, ref = A.quantized_attention_cpu(*args), A.quantized_attention_ref(*args)
    assert_attention_close(out, ref)
    return out, ref


@needs_vnni
@pytest.mark.parametrize("mask", ["none", "float", "bool", "bool_heads", "float_2d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpu_kernel_masks(case, mask):
    check_cpu_kernel(make_inputs(*case, seed=1, mask=mask))


@needs_vnni
@pytest.mark.parametrize("out_scale", ["feature", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpu_kernel_causal_requantized(case, out_scale):
    check_cpu_kernel(make_inputs(*case, seed=2, mask="float", causal=True, out_scale=out_scale))


@needs_vnni
def test_cpu_kernel_edge_cases():
    for out_dtype in (torch.float16, torch.bfloat16):
        check_cpu_kernel(make_inputs(2, 2, 33, 40, 64, seed=3, mask="bool", out_dtype=out_dtype))
    check_cpu_kernel(make_inputs(1, 2, 20, 50, 64, seed=5, temperature=50.0))
    check_cpu_kernel(make_inputs(1, 2, 20, 50, 64, seed=5, temperature=1e-3))
    args = list(make_inputs(2, 2, 6, 20, 32, seed=4, mask="bool"))
    args[3][0, :, 2] = False
    args[3][1] = False
    out, _ = check_cpu_kernel(tuple(args))
    assert torch.all(out[0, :, 2] == 0) and torch.all(out[1] == 0) and not torch.isnan(out).any()
    q, k, v, *rest = make_inputs(1, 4, 9, 12, 32, seed=7)  # 3-D operands, a 1-D mask
    check_cpu_kernel((q[0], k[0], v[0], torch.zeros(12), *rest[1:]))
    g = torch.Generator().manual_seed(6)  # heads as strided views; D not a multiple of 4 (Q copied, not read in place)
    b, s, h, d = 2, 19, 3, 30
    q = random_int8((b, s, h * d), g).view(b, s, h, d).transpose(1, 2)
    k = random_int8((b, s, h * d), g).view(b, s, h, d).transpose(1, 2)
    v = random_int8((b, h, d, s), g).transpose(-1, -2)
    check_cpu_kernel((q, k, v, None, 0.001, P_SCALE, torch.tensor([0.3]), True, torch.int8))


# Decoder shapes beyond the Triton ones: a 9-head / 3-KV-head decode against 37 cache slots (the last ones empty), a
# causal prefill Sq == Sk, and caches of 512 and 2048 keys.
CPU_DECODER_CASES = [
    (2, 9, 3, 1, 37, 64, "cache", False),
    (2, 4, 2, 24, 24, 64, "none", True),
    (2, 4, 1, 24, 24, 64, "cache", True),
    (1, 4, 1, 1, 512, 64, "cache", False),
    (2, 8, 2, 1, 2048, 128, "cache", False),
]


@needs_vnni
@pytest.mark.parametrize("out_scale", [None, "feature"])
@pytest.mark.parametrize("case", GQA_CASES + CPU_DECODER_CASES, ids=case_id)
def test_cpu_kernel_gqa(case, out_scale):
    from zqhero_fx import dispatch, use_kernels

    args = gqa_inputs(case, seed=11, out_scale=out_scale)
    out, _ = check_cpu_kernel(args)
    assert torch.equal(out, A.quantized_attention_cpu(*with_repeated_kv(args)))
    if case[6] == "cache":
        assert torch.equal(out, A.quantized_attention_cpu(*with_empty_cache_slots_scrambled(args)))
    with use_kernels("auto"):
        assert dispatch.select("quantized_attention", *args)[0] == "cpu"


@needs_vnni
def test_cpu_kernel_gqa_fully_masked_rows_and_strided_layouts():
    out, _ = check_cpu_kernel(gqa_inputs((1, 4, 2, 9, 5, 32, "none", True), seed=13))
    assert torch.all(out[:, :, :4] == 0) and not torch.isnan(out).any()
    args = list(gqa_inputs((2, 9, 3, 1, 37, 64, "cache", False), seed=13))
    args[3][1] = False  # sequence 1's cache is empty
    args[3][0, ..., 5] = False  # and a hole in sequence 0's
    out, _ = check_cpu_kernel(tuple(args))
    assert torch.all(out[1] == 0)
    # q with a non-unit stride along D (rows gathered), K D-major (the generic packer), V from a [B, S, Hkv * D] view.
    g = torch.Generator().manual_seed(14)
    b, s, h, hkv, d = 2, 11, 6, 2, 30
    q = random_int8((b, h, d, s), g).transpose(-1, -2)
    k = random_int8((b, hkv, d, s), g).transpose(-1, -2)
    v = random_int8((b, s, hkv * d), g).view(b, s, hkv, d).transpose(1, 2)
    check_cpu_kernel((q, k, v, None, 0.001, P_SCALE, torch.tensor([0.3]), True, torch.int8))


@needs_vnni
def test_cpu_kernel_takes_caches_up_to_max_terms():
    # P.V sums Sk products in int32 (vnni_cpu.MAX_TERMS); a longer cache is the reference's.
    q = torch.zeros(1, 4, 1, 64, dtype=torch.int8)
    for keys, takes in ((vnni_cpu.MAX_TERMS, True), (vnni_cpu.MAX_TERMS + 1, False)):
        kv = torch.zeros(1, 1, keys, 64, dtype=torch.int8)
        assert A.cpu_kernel_applies(q, kv, kv, None, None) == takes


@needs_vnni
@settings(deadline=None, max_examples=20)
@given(
    b=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(1, 3), sq=st.integers(1, 40),
    sk=st.integers(1, 90), d=st.sampled_from([8, 20, 64, 80, 132]),
    mask=st.sampled_from(["none", "float", "bool", "bool_heads", "cache"]), causal=st.booleans(),
    out_scale=st.sampled_from([None, "feature", "scalar"]), seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernel_gqa_hypothesis(b, kv_heads, group, sq, sk, d, mask, causal, out_scale, seed):
    args = make_inputs(b, kv_heads * group, sq, sk, d, seed, mask=mask, causal=causal, out_scale=out_scale,
                       kv_heads=kv_heads)
    out, _ = check_cpu_kernel(args)
    assert torch.equal(out, A.quantized_attention_cpu(*with_repeated_kv(args)))


@needs_vnni
@settings(deadline=None, max_examples=25)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), sq=st.integers(1, 70), sk=st.integers(1, 70),
    d=st.sampled_from([8, 32, 64, 128, 48, 20]), mask=st.sampled_from(["none", "float", "bool", "bool_heads"]),
    causal=st.booleans(), out_scale=st.sampled_from([None, "feature", "scalar"]),
    temperature=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernel_hypothesis(b, h, sq, sk, d, mask, causal, out_scale, temperature, seed):
    check_cpu_kernel(make_inputs(b, h, sq, sk, d, seed, mask=mask, causal=causal, out_scale=out_scale,
                                 temperature=temperature))


@needs_vnni
def test_op_runs_the_cpu_kernel_on_auto_and_the_reference_on_request():
    from zqhero_fx import use_kernels

    args = make_inputs(2, 3, 17, 17, 64, seed=8, mask="float", out_scale="feature")
    with use_kernels("auto"):
        assert torch.equal(torch.ops.zqhero.quantized_attention(*args), A.quantized_attention_cpu(*args))
    with use_kernels("reference"):
        assert torch.equal(torch.ops.zqhero.quantized_attention(*args), A.quantized_attention_ref(*args))
    # operands the kernel does not take (broadcast K/V batch dims) fall back to the reference
    q, k, v, *rest = args
    assert not A.cpu_kernel_applies(q, k[:1], v[:1], None, None)
    narrow = (q, k[:1].expand_as(k), v[:1].expand_as(v), *rest)
    assert A.cpu_kernel_applies(*narrow[:4], narrow[6])  # expanded views are fine: stride 0 batch
    check_cpu_kernel(narrow)


# ---------------------------------------------------------------- FP8 (E4M3, E5M2): FP8 Q.K^T, FP8 P, FP8 P.V
FP8_P_SCALE = {torch.float8_e4m3fn: 1.0 / 448, torch.float8_e5m2: 1.0 / 57344}


def make_fp8_inputs(b, h, sq, sk, d, seed, fp8, *, mask="none", causal=False, out_scale=None, out_q=None,
                    out_dtype=torch.float32, temperature=1.0, exact=False, kv_heads=None):
    """q, k, v in one FP8 format (k and v with kv_heads heads, default H). `exact`: small integers (Q.K^T exact in fp32
    in any order); otherwise activations of absmax ~ 4 sigma cast to FP8. The mask, causal and out_scale forms are the
    INT8 tests'."""
    int8_args = make_inputs(b, h, sq, sk, d, seed, mask=mask, causal=causal, out_scale=out_scale, out_dtype=out_dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    hkv = h if kv_heads is None else kv_heads
    shapes = ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    if exact:
        q, k, v = (small_int_fp8(s, fp8, g) for s in shapes)
        spread = 4.6  # std of an integer uniform on [-8, 8]
    else:
        spread = 64.0
        q, k, v = (random_fp8(s, fp8, g, spread) for s in shapes)
    # Logits of order +-3 at temperature 1.
    qk_scale = temperature * 3.0 / (spread * spread * math.sqrt(d))
    os_ = int8_args[6]
    if os_ is not None:
        os_ = os_ * 50.0  # outputs are in units of v's values (~64 here, not ~127 / 4)
    out = (out_q or fp8) if os_ is not None else out_dtype
    return (q, k, v, int8_args[3], qk_scale, FP8_P_SCALE[fp8], os_, causal, out)


def assert_fp8_attention_close(out, ref, args):
    """Q.K^T and P.V accumulate in fp32 in another order, and exp differs in its last bit: a probability sitting at a
    rounding boundary of the FP8 grid can move one step, by at most 2**-mantissa_bits of p (<= 1) relative, so its
    row moves by at most p_scale * step * max|v| / rowsum (rowsum >= 1). Everything else agrees to float rounding."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        assert_quantized_close(out, ref, fraction=2e-3)
        return
    q, v = args[0], args[2]
    max_step = 2.0 ** -formats.format_of_dtype(q.dtype).mantissa_bits  # the widest grid step relative to p <= 1
    v_max = float(v.float().abs().max()) if v.numel() else 0.0
    diff = (out.float() - ref.float()).abs()
    tight = (1e-4 if out.dtype == torch.float32 else 2e-2) * (1 + ref.float().abs())
    assert float(diff.max()) <= max_step * v_max + float(tight.max()), float(diff.max())
    assert (diff > tight).float().mean() <= 2e-3, float((diff > tight).float().mean())


def check_fp8(args, device):
    out = run_triton("quantized_attention", device, *args)
    ref = run_reference("quantized_attention", *args)
    assert_fp8_attention_close(out, ref, args)
    return out, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("mask", ["none", "float", "bool", "float_2d"])
@pytest.mark.parametrize("case", [(1, 1, 1, 1, 32), (2, 3, 17, 17, 64), (2, 2, 5, 130, 64), (1, 1, 130, 7, 32)],
                         ids=lambda c: "x".join(map(str, c)))
def test_quantized_attention_fp8_masks(device, case, mask, fp8):
    check_fp8(make_fp8_inputs(*case, seed=1, fp8=fp8, mask=mask), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_q", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8], ids=["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("out_scale", ["feature", "scalar"])
@pytest.mark.parametrize("case", [(2, 3, 17, 17, 64), (1, 2, 33, 20, 32)], ids=lambda c: "x".join(map(str, c)))
def test_quantized_attention_fp8_causal_requantized(device, case, out_scale, out_q):
    # E4M3 operands, requantized output in either FP8 format or INT8; causal with Sq > Sk too.
    check_fp8(make_fp8_inputs(*case, seed=2, fp8=torch.float8_e4m3fn, mask="float", causal=True,
                              out_scale=out_scale, out_q=out_q), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_quantized_attention_fp8_exact_logits_half_outputs_and_temperatures(device, fp8):
    # Integer-valued q, k: Q.K^T is exact, so only exp's last bit and the P.V order differ.
    for out_dtype in (torch.float16, torch.bfloat16):
        check_fp8(make_fp8_inputs(2, 2, 33, 40, 64, seed=3, fp8=fp8, mask="bool", out_dtype=out_dtype, exact=True),
                  device)
    for temperature in (50.0, 1e-3):  # peaked (one key takes all the mass) and flat (every p at the top binade)
        check_fp8(make_fp8_inputs(1, 2, 20, 50, 64, seed=5, fp8=fp8, temperature=temperature, exact=True), device)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_attention_fp8_fully_masked_rows_and_3d_inputs(device):
    fp8 = torch.float8_e4m3fn
    args = list(make_fp8_inputs(2, 2, 6, 20, 32, seed=4, fp8=fp8, mask="bool"))
    args[3][0, :, 2] = False
    args[3][1] = False
    out, _ = check_fp8(tuple(args), device)
    assert torch.all(out[0, :, 2] == 0) and torch.all(out[1] == 0) and not torch.isnan(out).any()
    q, k, v, *rest = make_fp8_inputs(1, 4, 9, 12, 32, seed=7, fp8=fp8)
    check_fp8((q[0], k[0], v[0], torch.zeros(12), *rest[1:]), device)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=5)
@given(
    b=st.integers(1, 2), h=st.integers(1, 2), sq=st.integers(1, 50), sk=st.integers(1, 50),
    d=st.sampled_from([32, 64, 48]), mask=st.sampled_from(["none", "float", "bool", "bool_heads"]),
    causal=st.booleans(), out_scale=st.sampled_from([None, "feature", "scalar"]),
    fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), exact=st.booleans(),
    temperature=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**31 - 1),
)
def test_quantized_attention_fp8_hypothesis(device, b, h, sq, sk, d, mask, causal, out_scale, fp8, exact,
                                            temperature, seed):
    check_fp8(make_fp8_inputs(b, h, sq, sk, d, seed, fp8, mask=mask, causal=causal, out_scale=out_scale,
                              temperature=temperature, exact=exact), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [GQA_CASES[0], GQA_CASES[3], GQA_CASES[4]], ids=case_id)
def test_quantized_attention_fp8_gqa(device, case):
    b, h, hkv, sq, sk, d, mask, causal = case
    args = make_fp8_inputs(b, h, sq, sk, d, seed=12, fp8=torch.float8_e4m3fn, mask=mask, causal=causal, kv_heads=hkv)
    out, _ = check_fp8(args, device)
    assert torch.equal(out, run_triton("quantized_attention", device, *with_repeated_kv(args)))


def test_triton_takes_fp8_in_one_format_only():
    from zqhero_fx import dispatch

    takes = dispatch.KERNELS["quantized_attention"].triton_applies
    args = make_fp8_inputs(1, 2, 5, 5, 32, seed=0, fp8=torch.float8_e4m3fn)
    assert takes(*args)
    q, k, v, *rest = args
    assert not takes(q, k, v.to(torch.float8_e5m2), *rest)  # mixed formats: the reference
    assert takes(q, k[:, :1], v[:, :1], *rest)  # MQA: the shared K/V head is read in place
    # FP8 never reaches the INT8 VNNI CPU kernel.
    assert not dispatch.KERNELS["quantized_attention"].cpu_applies(*args)
