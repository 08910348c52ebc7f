"""rotary_quantize: Hugging Face's rotary embedding (rotate_half form, full and partial) fused with static
quantization, against an independent float computation, and the Triton kernel bit for bit against the reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_checks import (
    DEVICES,
    FP8_DTYPE_LIST,
    assert_codes_equal,
    assert_quantized_close,
    run_reference,
    run_triton,
)
from zqhero_fx import dispatch
from zqhero_fx.formats import format_of_dtype

OP = "rotary_quantize"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
OUT_DTYPES = [pytest.param(torch.int8, id="int8"), pytest.param(E4M3, id="e4m3"), pytest.param(E5M2, id="e5m2")]


def rope_angles(batch, seq, rotary_dim, *, base=10000.0, offset=0, dtype=torch.float32):
    """cos, sin [batch, seq, rotary_dim] as Hugging Face's LlamaRotaryEmbedding builds them: inv_freq over the even
    dims, emb = cat(freqs, freqs); each batch row starts at its own position (`offset` * row)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    positions = torch.arange(seq, dtype=torch.float64)[None, :] + offset * torch.arange(batch)[:, None]
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_rotary(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb (unsqueeze_dim=1) with the partial-rotary split of GPT-NeoX / Phi, in
    float64: the independent computation."""

    def rotate_half(t):
        t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
        return torch.cat((-t2, t1), dim=-1)

    x = x.double()
    cos, sin = cos.double(), sin.double()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def make_inputs(batch, heads, seq, dim, rotary_dim, seed, *, out_dtype=torch.int8, x_dtype=torch.float32,
                transposed=True, angles="batch", scale=None):
    """x [B, H, T, D] (a transposed view of a [B, T, H, D] projection output unless `transposed` is False), real RoPE
    angles shaped [B, T, r] ("batch"), [1, T, r] ("shared") or [T, r] ("2d"), or unstructured random cos / sin
    ("random"), and a per-tensor scale that maps the rotated values' absmax onto the format."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        x = torch.randn(batch, seq, heads, dim, generator=g).to(x_dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, seq, dim, generator=g).to(x_dtype)
    if angles == "random":  # unstructured: the two halves of cos (and of sin) differ
        cos, sin = torch.randn(2, batch, seq, rotary_dim, generator=g)
    else:
        cos, sin = rope_angles(batch if angles == "batch" else 1, seq, rotary_dim, offset=7)
    if angles == "2d":
        cos, sin = cos[0], sin[0]
    if scale is None:
        scale = torch.tensor([x.float().abs().max().item() * 1.2 / format_of_dtype(out_dtype).max_value])
    return (x, cos, sin, scale, out_dtype)


def check(args, device):
    out = run_triton(OP, device, *args)
    ref = run_reference(OP, *args)
    assert out.is_contiguous() and ref.is_contiguous()
    assert_codes_equal(out, ref)  # the same fp32 operations in the same order, IEEE division, the shared rounding
    return out


# ---------------------------------------------------------------- the reference is the op's definition
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("dim, rotary_dim", [(64, 64), (32, 32), (32, 16)])
def test_reference_matches_hugging_face_rotary(dim, rotary_dim, out_dtype):
    args = make_inputs(2, 3, 11, dim, rotary_dim, seed=1, out_dtype=out_dtype)
    x, cos, sin, scale = args[:4]
    ref = run_reference(OP, *args)
    assert ref.shape == x.shape and ref.dtype == out_dtype
    # Quantizing the float64 result with the same scale: one grid step at most where fp32 and float64 straddle a
    # rounding boundary.
    expected = format_of_dtype(out_dtype).quantize(hf_rotary(x, cos, sin).float(), scale)
    assert_quantized_close(ref, expected, fraction=2e-3)
    # and the dequantized output is within half a step of the exact rotation (INT8: the step is the scale)
    if out_dtype == torch.int8:
        err = (ref.double() * scale.double() - hf_rotary(x, cos, sin)).abs()
        assert float(err.max()) <= 0.5 * float(scale) * (1 + 1e-5)


def test_reference_partial_rotary_passes_the_rest_through():
    x, cos, sin, scale, dtype = make_inputs(1, 2, 5, 32, 16, seed=2)
    ref = run_reference(OP, x, cos, sin, scale, dtype)
    assert torch.equal(ref[..., 16:], torch.ops.zqhero.quantize(x[..., 16:].contiguous(), scale, dtype))
    # with cos = 1, sin = 0 the whole op is plain quantization
    ones, zeros = torch.ones_like(cos), torch.zeros_like(sin)
    assert torch.equal(run_reference(OP, x, ones, zeros, scale, dtype), torch.ops.zqhero.quantize(x, scale, dtype))


def test_reference_rejects_bad_operands():
    x, cos, sin, scale, dtype = make_inputs(1, 2, 5, 32, 16, seed=3)
    with pytest.raises(ValueError, match="must be even"):
        run_reference(OP, x, cos[..., :15], sin[..., :15], scale, dtype)
    with pytest.raises(ValueError, match="per-tensor"):
        run_reference(OP, x, cos, sin, torch.rand(32), dtype)
    with pytest.raises(ValueError, match="quantized dtype"):
        run_reference(OP, x, cos, sin, scale, torch.float16)
    with pytest.raises(ValueError, match=r"\[B, T, rotary_dim\]"):
        run_reference(OP, x, cos[:, :4], sin[:, :4], scale, dtype)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        run_reference(OP, x[0], cos, sin, scale, dtype)


# ---------------------------------------------------------------- Triton vs the reference, bit for bit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", [
    (2, 3, 19, 64, 64),  # Llama head dim, T not a multiple of the position block
    (1, 2, 70, 32, 32),  # several position blocks
    (2, 2, 9, 32, 16),  # partial rotary, 16 of 32 (GPT-NeoX / Phi)
    (1, 3, 5, 40, 24),  # rotary half 12 and pass-through 16: neither a power of two
    (3, 1, 1, 64, 64),  # decode: one position per sequence
], ids=lambda s: "B{}H{}T{}D{}r{}".format(*s))
def test_matches_reference(device, shape, out_dtype):
    check(make_inputs(*shape, seed=4, out_dtype=out_dtype), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angles", ["shared", "2d", "random"])
def test_broadcast_angles(device, angles):
    check(make_inputs(2, 2, 13, 64, 64, seed=5, angles=angles), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(device, x_dtype):
    # fp16 / bf16 activations with fp32 or half angles: all widened exactly before the fp32 arithmetic.
    x, cos, sin, scale, dtype = make_inputs(2, 2, 9, 32, 32, seed=6, x_dtype=x_dtype)
    check((x, cos, sin, scale, dtype), device)
    check((x, cos.to(x_dtype), sin.to(x_dtype), scale, E4M3), device)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_operands(device):
    # x contiguous, x a transposed view, x a head slice of a fused QKV output; cos / sin slices of a longer cache
    # whose last dim is strided too.
    args = make_inputs(2, 3, 10, 32, 32, seed=7, transposed=False)
    check(args, device)
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 10, 3 * 4, 32, generator=g).transpose(1, 2)  # [B, 3H, T, D] view of [B, T, 3H, D]
    x = qkv[:, 4:8]
    cos_cache, sin_cache = rope_angles(2, 40, 64)
    cos, sin = cos_cache[:, 5:15, ::2], sin_cache[:, 5:15, ::2]
    assert not (x.is_contiguous() or cos.is_contiguous())
    check((x, cos, sin, torch.tensor([0.03]), torch.int8), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.int8, *FP8_DTYPE_LIST])
def test_saturates(device, out_dtype):
    args = make_inputs(1, 2, 6, 32, 16, seed=9, out_dtype=out_dtype, scale=torch.tensor([1e-6]))
    out = check(args, device).float()
    max_value = format_of_dtype(out_dtype).max_value
    assert (out == max_value).any() and (out == -max_value).any() and out.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_zero_scale(device):
    x, cos, sin, _, dtype = make_inputs(1, 2, 0, 32, 32, seed=10, scale=torch.tensor([0.02]))
    assert run_triton(OP, device, x, cos, sin, torch.tensor([0.02]), dtype).shape == (1, 2, 0, 32)
    # A scale below MIN_SCALE is floored like zqhero::quantize: scale 0 saturates (and exact zeros stay 0, not
    # 0 / 0 = NaN), scale 1e-10 divides by 1e-8.
    x, cos, sin, _, _ = make_inputs(1, 1, 3, 32, 32, seed=11)
    x = x.clone()
    x[..., :4] = x[..., 16:20] = 0.0  # features 0..3 rotate with 16..19: zero outputs
    for dtype in (torch.int8, E4M3):
        out = check((x, cos, sin, torch.tensor([0.0]), dtype), device)
        assert (out[..., :4].float() == 0).all()
        check((x * 1e-9, cos, sin, torch.tensor([1e-10]), dtype), device)


def test_triton_takes_float_inputs_and_quantized_outputs():
    takes = dispatch.KERNELS[OP].triton_applies
    args = make_inputs(1, 1, 3, 32, 32, seed=0)
    assert takes(*args)
    assert takes(*args[:4], E5M2)
    assert not takes(args[0].to(torch.float64), *args[1:])
    assert not takes(*args[:4], torch.uint8)
