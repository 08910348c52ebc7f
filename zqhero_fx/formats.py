"""Number formats as frozen data: INT8, FP8 (E4M3, E5M2), INT4, FP4 (E2M1) and FP6 (E3M2), each with its PyTorch
quantize / dequantize reference and its choice of scale. All formats are symmetric (no zero point): a value x is stored
as the code nearest to x / scale, saturating at ±max_value. This module sits at the bottom of the layering: it imports
nothing from zqhero_fx but the errors.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch

from zqhero_fx.errors import ConfigError

# Scales never fall below this: all-zero rows quantize to 0 instead of dividing by zero.
MIN_SCALE = 1e-8


class Granularity(enum.Enum):
    """What one scale covers."""

    PER_TENSOR = "per_tensor"
    PER_TOKEN = "per_token"
    PER_FEATURE = "per_feature"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class Scheme(enum.Enum):
    """ZeroQuant-HERO's activation schemes."""

    TWQ = "twq"  # token-wise dynamic: per-token scale computed at run time, inside the norm
    FWQ = "fwq"  # feature-wise static: per-feature scale from calibration, folded into the next GEMM's weight
    SQ = "sq"  # static per-tensor

    def __str__(self) -> str:
        return self.value


def round_to_float_grid(v: torch.Tensor, mantissa_bits: int, exponent_bias: int, max_value: float) -> torch.Tensor:
    """Round float32 `v` to a float format's nearest value (ties to even, subnormals included), saturating at ±max.

    Within a binade [2**e, 2**(e+1)) the format's values are the multiples of 2**(e - mantissa_bits); below the smallest
    normal 2**(1 - bias) the subnormals keep the quantum of the lowest binade. So rounding is round(|v| / quantum) *
    quantum, with quantum a power of two (exact division). NaN stays NaN.
    """
    magnitude = v.abs().clamp_max(max_value)
    quantum = _quantum(magnitude, mantissa_bits, exponent_bias)
    return torch.copysign(torch.round(magnitude / quantum) * quantum, v)


def _binade(magnitude: torch.Tensor, exponent_bias: int) -> torch.Tensor:
    """The exponent e with 2**e <= magnitude < 2**(e+1); zero and subnormals get the lowest normal exponent."""
    min_normal_exponent = 1 - exponent_bias
    _, exponent = torch.frexp(magnitude.clamp_min(2.0**min_normal_exponent))
    return exponent - 1  # frexp's mantissa lies in [0.5, 1)


def _quantum(magnitude: torch.Tensor, mantissa_bits: int, exponent_bias: int) -> torch.Tensor:
    """The spacing of the format's values in magnitude's binade."""
    return torch.ldexp(torch.ones_like(magnitude), _binade(magnitude, exponent_bias) - mantissa_bits)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


@dataclass(frozen=True)
class Format:
    """A number format. Build one directly, or start from a preset: `INT4.replace(group_size=128)`."""

    name: str
    kind: str  # "int" or "float"
    bits: int
    # torch.int8 / a float8 dtype; torch.uint8 for the sub-byte formats (4-bit packed two per byte, 6-bit one per byte).
    storage_dtype: torch.dtype
    max_value: float  # largest representable magnitude
    exponent_bits: int = 0  # float formats only
    mantissa_bits: int = 0
    exponent_bias: int = 0
    granularity: Granularity = Granularity.PER_CHANNEL  # the format's default weight granularity
    group_size: int | None = None  # for PER_GROUP
    # ZeroQuant-FP: every scale rounded up to a power of two, so rescaling is an exponent shift.
    power_of_two_scales: bool = False
    rounding: str = "nearest_even"

    def __post_init__(self):
        if self.kind not in ("int", "float"):
            raise ConfigError(f"format {self.name!r}: kind={self.kind!r}, use 'int' or 'float'")
        if self.bits not in (4, 6, 8):
            raise ConfigError(f"format {self.name!r}: bits={self.bits}, only 4, 6 and 8 have an encoding")
        if self.kind == "float" and 1 + self.exponent_bits + self.mantissa_bits != self.bits:
            raise ConfigError(
                f"format {self.name!r}: sign + exponent_bits={self.exponent_bits} + mantissa_bits="
                f"{self.mantissa_bits} must add up to bits={self.bits}"
            )
        expected_storage = self._expected_storage_dtype()
        if self.storage_dtype != expected_storage:
            raise ConfigError(
                f"format {self.name!r}: storage_dtype={self.storage_dtype}, a {self.bits}-bit {self.kind} format "
                f"is stored as {expected_storage}"
            )
        if self.max_value != self._largest_code_value():
            raise ConfigError(
                f"format {self.name!r}: max_value={self.max_value}, but the largest value the encoding "
                f"holds is {self._largest_code_value()}"
            )
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"format {self.name!r}: group_size={self.group_size} must be positive")
        if self.granularity is Granularity.PER_GROUP and self.group_size is None:
            raise ConfigError(f"format {self.name!r}: granularity PER_GROUP needs a group_size")
        if self.rounding != "nearest_even":
            raise ConfigError(f"format {self.name!r}: rounding={self.rounding!r}, only 'nearest_even' is implemented")

    def _expected_storage_dtype(self) -> torch.dtype:
        if self.bits < 8:
            return torch.uint8
        if self.kind == "int":
            return torch.int8
        # An 8-bit float is stored in the torch float8 dtype of the same layout; only E4M3 and E5M2 exist.
        by_layout = {(4, 3, 7): torch.float8_e4m3fn, (5, 2, 15): torch.float8_e5m2}
        layout = (self.exponent_bits, self.mantissa_bits, self.exponent_bias)
        if layout not in by_layout:
            raise ConfigError(f"format {self.name!r}: no torch float8 dtype has (exponent, mantissa, bias)={layout}")
        return by_layout[layout]

    def _largest_code_value(self) -> float:
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)  # symmetric: the most negative two's-complement code is unused
        if self.bits == 8:
            return torch.finfo(self.storage_dtype).max
        return float(self._sub_byte_magnitudes()[-1])

    @property
    def packed_per_byte(self) -> int:
        return 2 if self.bits == 4 else 1

    @property
    def is_sub_byte(self) -> bool:
        return self.bits < 8

    def replace(self, **changes) -> "Format":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ scales
    def scale_for(self, absmax: torch.Tensor) -> torch.Tensor:
        """The scale that maps `absmax` onto max_value (never below MIN_SCALE)."""
        scale = (absmax.float() / self.max_value).clamp_min(MIN_SCALE)
        if not self.power_of_two_scales:
            return scale
        # Round up through frexp rather than ceil(log2(s)): log2 can round a value just above 2**k down to k exactly,
        # which would give a scale below the plain one and saturate absmax.
        mantissa, exponent = torch.frexp(scale)
        return torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))

    # ------------------------------------------------------------ code values
    def round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Float32 values already divided by the scale -> the nearest representable value, saturating at ±max_value.

        The "fake quant" in code units; NaN stays NaN.
        """
        v = v.float()
        if self.kind == "int":
            return torch.round(v).clamp(-self.max_value, self.max_value)
        if self.bits == 8:
            # torch's cast rounds to nearest even; clamp first, as values past max_value become NaN in e4m3fn.
            return v.clamp(-self.max_value, self.max_value).to(self.storage_dtype).float()
        return round_to_float_grid(v, self.mantissa_bits, self.exponent_bias, self.max_value)

    def grid(self) -> torch.Tensor:
        """Every representable finite value, negative and non-negative, sorted, float32 (one zero)."""
        if self.kind == "int":
            return torch.arange(-self.max_value, self.max_value + 1, dtype=torch.float32)
        if self.bits == 8:
            every_code = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(self.storage_dtype).float()
            values = every_code[every_code.isfinite()]
        else:
            magnitudes = self._sub_byte_magnitudes()
            values = torch.cat((-magnitudes, magnitudes))
        # unique merges -0.0 with 0.0 but may keep either; adding 0.0 makes the one zero +0.0 (IEEE: -0 + 0 = +0).
        return torch.unique(values) + 0.0

    def _sub_byte_magnitudes(self) -> torch.Tensor:
        """The value of each magnitude code 0 .. 2**(bits-1) - 1 of a sub-byte float (no inf / NaN codes)."""
        codes = torch.arange(2 ** (self.bits - 1), dtype=torch.int32)
        exponent_field, mantissa_field = codes >> self.mantissa_bits, codes & ((1 << self.mantissa_bits) - 1)
        fraction = mantissa_field.float() / 2**self.mantissa_bits
        # Field 0 is subnormal: no implicit leading 1, and the exponent of field 1.
        significand = torch.where(exponent_field == 0, fraction, 1.0 + fraction)
        return torch.ldexp(significand, exponent_field.clamp_min(1) - self.exponent_bias)

    # ------------------------------------------------------------ storage
    def _encode(self, on_grid: torch.Tensor) -> torch.Tensor:
        """Grid values (round_to_grid's output) -> storage codes, packed two per byte for 4-bit formats."""
        if self.bits == 8:
            return on_grid.to(self.storage_dtype)
        if self.kind == "int":
            # Two's-complement nibble; NaN goes through torch's float->int cast, like INT8.
            codes = (on_grid.to(torch.int8) & 0x0F).to(torch.uint8)
        else:
            codes = self._encode_sub_byte_float(on_grid)
        if self.packed_per_byte == 1:
            # FP6 keeps one 6-bit code per byte for now; bit-stream packing (4 codes in 3 bytes) comes in a later issue.
            return codes
        return _pack_nibbles(codes)

    def _encode_sub_byte_float(self, on_grid: torch.Tensor) -> torch.Tensor:
        # Code = sign | exponent | mantissa. Magnitude codes count the grid in order: each binade above the lowest adds
        # 2**mantissa_bits codes, and within it the code steps by one per quantum. No NaN code exists: NaN stores 0.
        magnitude = on_grid.abs().nan_to_num(0.0)
        binade = _binade(magnitude, self.exponent_bias)
        quantum = _quantum(magnitude, self.mantissa_bits, self.exponent_bias)
        min_normal_exponent = 1 - self.exponent_bias
        magnitude_code = (binade - min_normal_exponent) * 2**self.mantissa_bits + (magnitude / quantum).to(torch.int32)
        sign = (torch.signbit(on_grid) & ~on_grid.isnan()).to(torch.int32)
        return ((sign << (self.bits - 1)) | magnitude_code).to(torch.uint8)

    def _decode(self, q: torch.Tensor) -> torch.Tensor:
        """Storage codes -> float32 code values (unpacked)."""
        if q.dtype != self.storage_dtype:
            raise ConfigError(f"format {self.name!r} stores codes as {self.storage_dtype}, got {q.dtype}")
        if self.bits == 8:
            return q.float()
        codes = _unpack_nibbles(q) if self.packed_per_byte == 2 else q
        if self.kind == "int":
            return ((codes.to(torch.int16) ^ 8) - 8).float()  # sign-extend the two's-complement nibble
        magnitudes = self._sub_byte_magnitudes().to(q.device)
        value_of_code = torch.cat((magnitudes, -magnitudes))  # the sign is the top bit
        return value_of_code[codes.long()]

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x / scale (broadcast), rounded to the grid, encoded to storage_dtype (4-bit: packed along the last dim).

        NaN: the fp8 formats keep it; INT8/INT4 get torch's float->int8 cast of NaN (0 on CPU); FP4/FP6 store 0.
        """
        if self.packed_per_byte == 2 and (x.dim() == 0 or x.shape[-1] % 2):
            size = "a scalar" if x.dim() == 0 else x.shape[-1]
            raise ConfigError(
                f"{self.name} packs two codes per byte along the last dim, which must be even: got {size}"
            )
        # Division, not multiplication by a reciprocal: it is what the INT8 kernels compute, bit for bit.
        v = x.float() / torch.as_tensor(scale, device=x.device).float().clamp_min(MIN_SCALE)
        return self._encode(self.round_to_grid(v)).contiguous()

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self._decode(q) * torch.as_tensor(scale, device=q.device).float()).to(dtype).contiguous()

    # ------------------------------------------------------------ granularities
    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic (TWQ): one scale per row of the last dim -> (q, scale[..., 1])."""
        scale = self.scale_for(x.float().abs().amax(dim=-1, keepdim=True))
        # Contiguous like the kernels' fake implementations, which Inductor checks strides against.
        return self.quantize(x, scale), scale.contiguous()

    def quantize_per_channel(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [N, K], one scale per output channel (row) -> (q, scale [N])."""
        if w.dim() != 2:
            raise ConfigError(f"quantize_per_channel expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
        q, scale = self.quantize_per_token(w)
        return q, scale.reshape(-1)

    def quantize_per_group(self, w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [N, K], one scale per group of k consecutive columns.

        Returns (q [N, K], packed to [N, K // 2] for 4-bit formats; scales [N, K // k]).
        """
        if w.dim() != 2:
            raise ConfigError(f"quantize_per_group expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
        k = self._group_size(group_size)
        n, columns = w.shape
        if columns % k:
            raise ConfigError(f"quantize_per_group: K={columns} is not a multiple of the group size k={k}")
        scales = self.scale_for(w.float().abs().reshape(n, columns // k, k).amax(dim=-1))
        return self.quantize(w, scales.repeat_interleave(k, dim=1)), scales.contiguous()

    def dequantize_per_group(
        self, q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        k = self._group_size(group_size)
        columns = q.shape[-1] * self.packed_per_byte
        if scales.shape[-1] * k != columns:
            raise ConfigError(
                f"dequantize_per_group: {scales.shape[-1]} groups of k={k} do not cover K={columns} columns"
            )
        return self.dequantize(q, scales.repeat_interleave(k, dim=-1), dtype)

    def _group_size(self, group_size: int | None) -> int:
        k = self.group_size if group_size is None else group_size
        if k is None or k <= 0:
            raise ConfigError(f"format {self.name!r}: per-group quantization needs a positive group size, got {k}")
        return k


INT8 = Format("int8", "int", 8, torch.int8, 127.0)
FP8_E4M3 = Format("fp8_e4m3", "float", 8, torch.float8_e4m3fn, 448.0, 4, 3, 7)
FP8_E5M2 = Format("fp8_e5m2", "float", 8, torch.float8_e5m2, 57344.0, 5, 2, 15)
INT4 = Format("int4", "int", 4, torch.uint8, 7.0, granularity=Granularity.PER_GROUP, group_size=64)  # symmetric [-7, 7]
FP4_E2M1 = Format("fp4_e2m1", "float", 4, torch.uint8, 6.0, 2, 1, 1, granularity=Granularity.PER_GROUP, group_size=32)
FP6_E3M2 = Format("fp6_e3m2", "float", 6, torch.uint8, 28.0, 3, 2, 3)  # per output channel
# FP6's other layout, one more mantissa bit and a narrower range; ZeroQuant(4+2) chose E3M2. CPU and Triton kernels
# decode E3M2 only: E2M3 weights run packed_linear's reference (a comparison format, docs/formats.md).
FP6_E2M3 = Format("fp6_e2m3", "float", 6, torch.uint8, 7.5, 2, 3, 1)

FORMATS: dict[str, Format] = {f.name: f for f in (INT8, FP8_E4M3, FP8_E5M2, INT4, FP4_E2M1, FP6_E3M2, FP6_E2M3)}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "fp4": "fp4_e2m1", "e2m1": "fp4_e2m1",
            "fp6": "fp6_e3m2", "e3m2": "fp6_e3m2", "e2m3": "fp6_e2m3"}
_FORMAT_OF_DTYPE = {torch.int8: INT8, torch.float8_e4m3fn: FP8_E4M3, torch.float8_e5m2: FP8_E5M2}


def get_format(name_or_format: str | Format) -> Format:
    """A Format as is, or the preset of that name (case-insensitive; also "fp8", "e4m3", "e5m2", "fp4", "fp6", ...)."""
    if isinstance(name_or_format, Format):
        return name_or_format
    if not isinstance(name_or_format, str):
        raise ConfigError(f"expected a Format or a format name, got {type(name_or_format).__name__}")
    key = name_or_format.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ConfigError(
            f"unknown format {name_or_format!r}: known formats are {', '.join(FORMATS)} "
            f"(aliases {', '.join(_ALIASES)})"
        )
    return FORMATS[key]


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    """int8 or a float8 dtype (every one-byte floating dtype torch has is a float8 variant)."""
    return dtype == torch.int8 or (dtype.is_floating_point and dtype.itemsize == 1)


def format_of_dtype(dtype: torch.dtype) -> Format:
    if dtype not in _FORMAT_OF_DTYPE:
        raise ConfigError(f"no format stores its codes as {dtype}: known are {', '.join(map(str, _FORMAT_OF_DTYPE))}")
    return _FORMAT_OF_DTYPE[dtype]
