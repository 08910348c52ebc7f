"""Packed low-bit weights: the storage layouts of zqhero::packed_linear's weight operands, and their PyTorch decoding
(the spec the kernels unpack against). Quantizers that produce them live in zqhero_fx/weight_quant.py.

A weight [N, K] (output channels x input features) is stored as

    W[n, k] = w_scale[n] * f[n, g] * (v[n, k] - z[n, g]),   g = k // group_size

* codes, row-major along K:
  - 4-bit formats (INT4, FP4 E2M1): one stream [N, K/2] uint8, element 2i in the low nibble, 2i + 1 in the high one
    (formats._pack_nibbles). INT4 codes are two's complement (-8..7; the quantizers use -7..7) unless a zero point is
    given, when they are unsigned 0..15 (DGQ's asymmetric uint4) and z is subtracted.
  - FP6 E3M2, "4+2" (ZeroQuant(4+2) / FP6-LLM): each 6-bit code c = sign | exponent(3) | mantissa(2) is split into its
    low 4 bits, stored as nibbles [N, K/2] like a 4-bit format, and its top 2 bits, stored four per byte [N, K/4]
    (element 4i + j in bits 2j..2j+1). Both streams are power-of-two sized, so a kernel loads them with aligned
    accesses and ORs the two parts back together in registers. The byte order within the streams is ours: DeepSpeed
    also interleaves them per GPU thread fragment, which this layout leaves to the kernel's tiling.
* f, the group factor, by `group_scale_kind`:
  - "none": 1 (per-channel scale only; FP6);
  - "integer": w_group_scale[n, g] int8 >= 1 (DGQ: f * (v - z) is an INT8 weight, so an INT8 x INT8 GEMM takes it);
  - "exponent": 2 ** w_group_scale[n, g] (ZeroQuant-FP: power-of-two group scales, so f * v is an exact FP8 value and
    the 4-bit -> 8-bit conversion is an exponent shift).
"""

from __future__ import annotations

import torch

from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import Format, _pack_nibbles, _unpack_nibbles, get_format

GROUP_SCALE_KINDS = ("none", "integer", "exponent")


# ---------------------------------------------------------------- code streams
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes 0..15 (uint8) -> [..., K/2] bytes."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"4-bit codes pack two per byte: K={codes.shape[-1]} must be even")
    return _pack_nibbles(codes.to(torch.uint8)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_nibbles(packed)


def pack_fp6(codes: torch.Tensor) -> list[torch.Tensor]:
    """[N, K] 6-bit codes (uint8 0..63) -> [lo4 [N, K/2], hi2 [N, K/4]], the 4+2 streams."""
    if codes.shape[-1] % 4:
        raise ConfigError(f"FP6 4+2 packing stores the top 2 bits four per byte: K={codes.shape[-1]} must be a "
                          "multiple of 4")
    codes = codes.to(torch.uint8)
    lo4 = pack_nibbles(codes & 0x0F)
    hi = (codes >> 4) & 0x03
    hi2 = hi[..., 0::4] | (hi[..., 1::4] << 2) | (hi[..., 2::4] << 4) | (hi[..., 3::4] << 6)
    return [lo4, hi2.contiguous()]


def unpack_fp6(lo4: torch.Tensor, hi2: torch.Tensor) -> torch.Tensor:
    hi = torch.stack([(hi2 >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)
    return unpack_nibbles(lo4) | (hi << 4)


def stream_shapes(w_format: str | Format, n: int, k: int) -> list[tuple[int, int]]:
    """The [rows, bytes] shape of each code stream of an [n, k] weight."""
    fmt = get_format(w_format)
    if fmt.bits == 6:
        return [(n, k // 2), (n, k // 4)]
    if fmt.bits == 4:
        return [(n, k // 2)]
    raise ConfigError(f"packed weights hold 4- or 6-bit formats, not {fmt.name}")


def columns(w_codes: list[torch.Tensor], w_format: str | Format) -> int:
    """K, the weight's input features, from its first stream."""
    return w_codes[0].shape[-1] * 2


# ---------------------------------------------------------------- decoding (the spec)
def code_values(w_codes: list[torch.Tensor], w_format: str | Format, w_group_zero: torch.Tensor | None = None,
                group_size: int = 0) -> torch.Tensor:
    """The float32 value v - z of every code, [N, K]."""
    fmt = get_format(w_format)
    if fmt.bits == 6:
        if len(w_codes) != 2:
            raise ConfigError(f"{fmt.name} weights come as two streams [lo4, hi2], got {len(w_codes)}")
        return fmt._decode(unpack_fp6(*w_codes))
    if fmt.bits != 4 or len(w_codes) != 1:
        raise ConfigError(f"packed weights: {fmt.name} with {len(w_codes)} code streams is not a packed layout")
    if w_group_zero is None:
        return fmt._decode(w_codes[0])
    if fmt.kind != "int":
        raise ConfigError(f"a zero point goes with unsigned INT4 codes, not {fmt.name}")
    unsigned = unpack_nibbles(w_codes[0]).float()
    return unsigned - per_column(w_group_zero.float(), group_size, unsigned.shape[-1])


def per_column(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] -> [N, K], each group's value repeated over its columns (group_size 0: one group, the whole row)."""
    size = group_size or k
    if per_group.shape[-1] * size != k:
        raise ConfigError(f"{per_group.shape[-1]} groups of {size} columns do not cover K={k}")
    return per_group.repeat_interleave(size, dim=-1)


def group_factor(w_group_scale: torch.Tensor | None, group_scale_kind: str, group_size: int, k: int) -> torch.Tensor:
    """f [N, K] (float32) or a scalar 1."""
    if group_scale_kind not in GROUP_SCALE_KINDS:
        raise ConfigError(f"group_scale_kind={group_scale_kind!r}: use one of {', '.join(GROUP_SCALE_KINDS)}")
    if group_scale_kind == "none":
        if w_group_scale is not None:
            raise ConfigError("group_scale_kind='none' takes no w_group_scale")
        return torch.ones(())
    if w_group_scale is None:
        raise ConfigError(f"group_scale_kind={group_scale_kind!r} needs w_group_scale")
    factor = w_group_scale.float() if group_scale_kind == "integer" else torch.exp2(w_group_scale.float())
    return per_column(factor, group_size, k)


def expand(w_codes, w_format, group_size, w_group_scale, group_scale_kind, w_group_zero) -> torch.Tensor:
    """f * (v - z), float32 [N, K]: the weight without its per-channel scale (exact: small integers times powers of
    two). For "integer" group scales it is DGQ's INT8 weight, for "exponent" ZeroQuant-FP's FP8 weight."""
    values = code_values(w_codes, w_format, w_group_zero, group_size)
    return values * group_factor(w_group_scale, group_scale_kind, group_size, values.shape[-1]).to(values.device)


def dequantize(w_codes, w_format, group_size, w_scale, w_group_scale, group_scale_kind, w_group_zero,
               lorc=()) -> torch.Tensor:
    """The float32 weight [N, K] these operands stand for, LoRC's low-rank term included."""
    w = expand(w_codes, w_format, group_size, w_group_scale, group_scale_kind, w_group_zero)
    w = w * w_scale.float().reshape(-1, 1)
    if lorc:
        b, b_scale, a, a_scale = lorc
        w = w + (a.float() * a_scale.float().reshape(-1, 1)) @ (b.float() * b_scale.float().reshape(-1, 1))
    return w


def lorc_side(x: torch.Tensor, lorc) -> torch.Tensor:
    """x [M, K] (float32, already in real units) -> x · Bᵀ · Aᵀ [M, N]: LoRC's thin side GEMM, rank r in the middle."""
    b, b_scale, a, a_scale = lorc
    t = (x @ b.float().t()) * b_scale.float()
    return (t @ a.float().t()) * a_scale.float()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
