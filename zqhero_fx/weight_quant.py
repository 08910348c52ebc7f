"""Weight quantizers for the packed low-bit formats (layouts: zqhero_fx/weights.py): what a `WeightScheme` asks for,
turned into zqhero::packed_linear's weight operands.

* Per-channel (group_scales "none"): one scale per output channel, round to nearest on the format's grid. FP6 E3M2 this
  way is ZeroQuant(4+2)'s coarse-grain scheme (DeepSpeed's serving code: row absmax / 28, round to nearest).
* Power-of-two group scales (ZeroQuant-FP, W4A8 with FP8 activations), two constraints, both so that code * group
  factor is an exact FP8 value (the 4-bit -> 8-bit conversion is an exponent shift):
  - "power_of_two": every group scale rounded up to a power of two; the row keeps the largest as its (power-of-two)
    per-channel scale and each group stores its exponent below it;
  - "power_of_two_ratio": one real per-channel scale (the largest group scale of the row) and each group's ratio to it
    rounded up to a power of two (ZeroQuant-FP reports this one as the better; our formulas, papers.md §2).
  Rounding up never clips. Exponents stop at E_MIN (a group far below its row's largest keeps a coarser scale than it
  needs) so that the smallest code times 2**e is still an FP8 E4M3 subnormal: the conversion stays exact.
* Integer group scales (DGQ, A8W4 with INT8 activations): asymmetric uint4 codes with a zero point per group, an
  integer group scale S2 >= 1 and a real per-channel scale s1, with |S2 * (q - z)| <= 127 so the expanded weight is
  INT8. `search="grid"` runs DGQ's two-phase grid search (ilur98/DGQ `searchquant`): per group, a clip ratio of the
  4-bit range minimising that group's output error on calibration activations; then per row, a clip ratio of the
  INT8 range (which sets s1 and the integer S2 = round(group scale / s1)) minimising the row's output error. DGQ
  searches 20 then 80 ratios; we search 20 and 20 over the same ranges (phase 2 dominates the cost and 80 did not pay
  for itself in our measurements: docs/formats.md). The output error is ||(W - W_q) X^T||^2 over up to SAMPLE_ROWS
  calibration rows; without calibration rows it falls back to the weight error (X = I).
* GPTQ (`rounding="gptq"`, optional): the scales as above, then the codes chosen column by column so that each
  rounding error is compensated by the columns still to come, on the GEMM's calibration inputs.
* LoRC (ZeroQuant-V2 / -FP): W ~= Q(W) + A B, A [N, r] B [r, K] from the truncated SVD of the error W - Q(W)
  (A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T), both stored INT8 with one scale per row; applied as a thin side GEMM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from zqhero_fx import weights
from zqhero_fx.errors import ConfigError
from zqhero_fx.formats import INT8, MIN_SCALE, Format, get_format

GROUP_SCALES = ("none", "integer", "power_of_two", "power_of_two_ratio")
SEARCHES = ("none", "grid")
ROUNDINGS = ("nearest", "gptq")
GPTQ_DAMPING = 0.01  # of the mean diagonal of H, added to it (GPTQ's default)
GPTQ_BLOCK = 128  # columns updated together (GPTQ's lazy batch)
KERNEL_GROUP_MULTIPLE = 16  # the packed kernels read whole 16-column groups (a vector lane's lookup table)
# Lowest exponent of a power-of-two group factor per 4-bit format: its smallest nonzero code (FP4 0.5, INT4 1) times
# 2**E_MIN is E4M3's smallest subnormal 2**-9, so code * 2**e converts to FP8 exactly.
E_MIN = {"fp4_e2m1": -8, "int4": -9}
SAMPLE_ROWS = 256  # calibration rows the grid search measures output error on
PHASE1_RATIOS = torch.tensor([1.02 - (i + 1) * 0.22 / 20 for i in range(20)])  # 1.009 .. 0.80, DGQ's
PHASE2_RATIOS = torch.tensor([1.02 - (i + 1) * 0.82 / 20 for i in range(20)])  # 0.979 .. 0.20 (DGQ: 80 steps)


@dataclass(frozen=True)
class WeightScheme:
    """How a GEMM weight is stored in a packed low-bit format."""

    format: str
    group_size: int = 0  # 0: one scale per output channel
    group_scales: str = "none"
    zero_point: bool = False  # asymmetric uint4 codes (integer group scales only)
    search: str = "none"
    lorc_rank: int = 0
    rounding: str = "nearest"  # or "gptq": error-compensating rounding on calibration inputs (GPTQ, Frantar et al.)

    def __post_init__(self):
        fmt = get_format(self.format)
        object.__setattr__(self, "format", fmt.name)
        if fmt.bits not in (4, 6):
            raise ConfigError(f"weight format {fmt.name}: packed weights are 4- or 6-bit; 8-bit weights run "
                              "quantized_linear")
        if self.group_scales not in GROUP_SCALES:
            raise ConfigError(f"group_scales={self.group_scales!r}: use one of {', '.join(GROUP_SCALES)}")
        if self.search not in SEARCHES:
            raise ConfigError(f"weight_search={self.search!r}: use one of {', '.join(SEARCHES)}")
        if self.group_size < 0 or (self.group_size and self.group_size % KERNEL_GROUP_MULTIPLE):
            raise ConfigError(f"weight group size {self.group_size}: use 0 (per channel) or a positive multiple of "
                              f"{KERNEL_GROUP_MULTIPLE} (the packed kernels read 16-column groups)")
        if self.group_scales == "none" and self.group_size:
            raise ConfigError(f"{fmt.name} with group_size={self.group_size} needs group scales the GEMM can take: "
                              "'integer' (INT8 activations) or 'power_of_two' / 'power_of_two_ratio' (FP8 ones)")
        if self.group_scales != "none" and not self.group_size:
            raise ConfigError(f"group_scales={self.group_scales!r} needs a group size")
        if self.group_scales == "integer" and fmt.name != "int4":
            raise ConfigError(f"integer group scales (DGQ) expand INT4 codes to INT8; {fmt.name} is not INT4")
        if self.group_scales.startswith("power_of_two") and fmt.name not in E_MIN:
            raise ConfigError(f"power-of-two group scales convert 4-bit codes to FP8; {fmt.name} is not INT4/FP4")
        if self.zero_point and self.group_scales != "integer":
            raise ConfigError("a zero point goes with integer group scales (DGQ's asymmetric uint4)")
        if self.search == "grid" and self.group_scales != "integer":
            raise ConfigError("weight_search='grid' is DGQ's search of its two scale levels: it needs integer group "
                              "scales")
        if self.lorc_rank < 0:
            raise ConfigError(f"lorc_rank={self.lorc_rank} must be >= 0 (0 turns LoRC off)")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"weight_rounding={self.rounding!r}: use one of {', '.join(ROUNDINGS)}")
        if self.rounding == "gptq" and self.group_scales == "integer":
            raise ConfigError("weight_rounding='gptq' takes per-channel or power-of-two group scales; DGQ's integer "
                              "scales have their own grid search (weight_search='grid')")

    @property
    def group_scale_kind(self) -> str:
        return {"none": "none", "integer": "integer"}.get(self.group_scales, "exponent")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    def replace(self, **changes) -> "WeightScheme":
        return dataclasses.replace(self, **changes)


@dataclass
class PackedWeight:
    """zqhero::packed_linear's weight operands (everything between x_scale and bias, in the op's order)."""

    w_codes: list[torch.Tensor]
    w_format: str
    group_size: int
    w_scale: torch.Tensor
    w_group_scale: torch.Tensor | None
    group_scale_kind: str
    w_group_zero: torch.Tensor | None
    lorc: list[torch.Tensor]

    def operands(self) -> tuple:
        return (self.w_codes, self.w_format, self.group_size, self.w_scale, self.w_group_scale,
                self.group_scale_kind, self.w_group_zero, self.lorc)

    def dequantize(self) -> torch.Tensor:
        return weights.dequantize(*self.operands())

    @property
    def nbytes(self) -> int:
        return weights.nbytes([*self.w_codes, self.w_scale, self.w_group_scale, self.w_group_zero, *self.lorc])


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, sample: torch.Tensor | None = None,
                    name: str = "weight", gram: torch.Tensor | None = None) -> PackedWeight:
    """Quantize a float weight [N, K]; `sample` ([..., K] calibration inputs of this GEMM) feeds the grid search,
    `gram` (XᵀX [K, K] over all calibration inputs; else computed from `sample`) GPTQ."""
    if w.dim() != 2:
        raise ConfigError(f"{name}: packed weights are 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    fmt = scheme.fmt
    if scheme.group_size and k % scheme.group_size:
        raise ConfigError(f"{name}: K={k} input features are not a multiple of the weight group size "
                          f"{scheme.group_size}; pick a group size that divides every GEMM's K (for example "
                          f"{_dividing_group_sizes(k)}) or override this module to another precision")
    multiple = 4 if fmt.bits == 6 else 2
    if k % multiple:
        raise ConfigError(f"{name}: K={k} is not a multiple of {multiple}, which {fmt.name}'s packing needs")
    w = w.detach().float()
    h = _gram(gram, sample, k, name) if scheme.rounding == "gptq" else None
    if scheme.group_scales == "none":
        scale = fmt.scale_for(w.abs().amax(1))
        target = gptq(w, fmt, scale[:, None].expand_as(w), h) if h is not None else w
        codes = fmt.quantize(target, scale[:, None])
        packed = PackedWeight(weights.pack_fp6(codes) if fmt.bits == 6 else [codes], fmt.name, 0, scale, None,
                              "none", None, [])
    elif scheme.group_scales == "integer":
        packed = _integer_group_scales(w, scheme, sample)
    else:
        packed = _power_of_two_group_scales(w, fmt, scheme.group_size, scheme.group_scales.endswith("ratio"), h)
    if scheme.lorc_rank:
        packed.lorc = low_rank_compensation(w, packed.dequantize(), scheme.lorc_rank, name)
    return packed


def _dividing_group_sizes(k: int) -> str:
    sizes = [g for g in (32, 64, 128, 256) if k % g == 0]
    return ", ".join(map(str, sizes)) if sizes else "none of 32/64/128/256: use 0 (per channel)"


def ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2(v)) for v > 0, exactly (frexp: v = m * 2**e with m in [0.5, 1); v is a power of two iff m == 0.5)."""
    mantissa, exponent = torch.frexp(v)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def _power_of_two_group_scales(w, fmt: Format, group_size: int, ratio: bool, h=None) -> PackedWeight:
    n, k = w.shape
    group_absmax = w.abs().reshape(n, k // group_size, group_size).amax(-1)
    raw = (group_absmax / fmt.max_value).clamp_min(MIN_SCALE)
    if ratio:
        row_scale = raw.amax(1)
        exponent = ceil_log2(raw / row_scale[:, None])
    else:
        absolute = ceil_log2(raw)
        top = absolute.amax(1)
        row_scale = torch.ldexp(torch.ones_like(raw[:, 0]), top)
        exponent = absolute - top[:, None]
    exponent = exponent.clamp(min=E_MIN[fmt.name], max=0)
    group_scale = torch.ldexp(row_scale[:, None].expand_as(raw), exponent)
    scale = group_scale.repeat_interleave(group_size, dim=1)
    codes = fmt.quantize(gptq(w, fmt, scale, h) if h is not None else w, scale)
    return PackedWeight([codes], fmt.name, group_size, row_scale.contiguous(), exponent.to(torch.int8).contiguous(),
                        "exponent", None, [])


# ---------------------------------------------------------------- GPTQ: error-compensating rounding
def _gram(gram, sample, k: int, name: str) -> torch.Tensor:
    if gram is None and sample is not None and sample.shape[-1] == k:
        rows = sample.detach().float().reshape(-1, k)
        gram = rows.t() @ rows
    if gram is None or tuple(gram.shape) != (k, k):
        raise ConfigError(f"{name}: weight_rounding='gptq' needs this GEMM's calibration inputs as it sees them: pass "
                          "calibration batches to convert (a static FWQ site, whose weight absorbed per-feature "
                          "scales, has none: use fwq_activations='per_token' there)")
    return gram.float()


def gptq(w: torch.Tensor, fmt: Format, scale: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023): round the columns of w [N, K] one at a time onto fmt's grid with the fixed
    per-element scales `scale` [N, K], spreading each column's rounding error over the columns not yet rounded so
    that the output error on the calibration inputs stays small (H = XᵀX [K, K] of those inputs, damped; Cholesky of
    H⁻¹). Needs more calibration tokens than K for a full-rank H. Returns the rounded weight (on the grid: quantizing
    it again with `scale` is exact)."""
    n, k = w.shape
    h = gram.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w = w.clone()
    w[:, dead] = 0.0
    h += GPTQ_DAMPING * torch.diagonal(h).mean() * torch.eye(k)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded = torch.zeros_like(w)
    for start in range(0, k, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, k)
        block, errors = w[:, start:end].clone(), torch.zeros(n, end - start)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column, s = block[:, i], scale[:, start + i]
            q = fmt.round_to_grid(column / s) * s
            rounded[:, start + i] = q
            error = (column - q) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return rounded


# ---------------------------------------------------------------- DGQ: integer group scales, two-phase search
def _asymmetric_groups(wg: torch.Tensor, ratio: torch.Tensor):
    """4-bit asymmetric (scale, zero) per group of wg [N, G, k] with the range clipped by `ratio` ([N, G] or scalar).
    The range always contains 0, so the zero point lies in 0..15."""
    low = wg.amin(-1).clamp(max=0) * ratio
    high = wg.amax(-1).clamp(min=0) * ratio
    scale = ((high - low) / 15).clamp_min(MIN_SCALE)
    zero = torch.round(-low / scale).clamp(0, 15)
    return scale, zero


def _codes(wg, step, zero, lower=0.0, upper=15.0):
    return (torch.round(wg / step[..., None]) + zero[..., None]).clamp(lower, upper)


class _OutputError:
    """||E X^T||^2 per row (or per row and group) for weight errors E, on calibration rows X (identity without)."""

    def __init__(self, sample: torch.Tensor | None, k: int, group_size: int):
        self.group_size = group_size
        x = None
        if sample is not None:
            rows = sample.detach().float().reshape(-1, sample.shape[-1])
            if rows.shape[-1] == k and rows.shape[0]:
                if rows.shape[0] > SAMPLE_ROWS:
                    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:SAMPLE_ROWS]
                    rows = rows[pick]
                x = rows
        self.x = x
        if x is not None:
            xg = x.reshape(x.shape[0], k // group_size, group_size)
            self.group_gram = torch.einsum("tgi,tgj->gij", xg, xg)  # H's diagonal blocks, [G, k, k]

    def per_group(self, error: torch.Tensor) -> torch.Tensor:
        """error [N, G, k] -> [N, G]."""
        if self.x is None:
            return error.square().sum(-1)
        return torch.einsum("ngi,gij,ngj->ng", error, self.group_gram, error)

    def per_row(self, error: torch.Tensor) -> torch.Tensor:
        """error [N, K] -> [N]."""
        if self.x is None:
            return error.square().sum(-1)
        return (error @ self.x.t()).square().sum(-1)


def _integer_group_scales(w, scheme: WeightScheme, sample) -> PackedWeight:
    n, k = w.shape
    size = scheme.group_size
    groups = k // size
    wg = w.reshape(n, groups, size)
    error = _OutputError(sample if scheme.search == "grid" else None, k, size)

    # Phase 1: the 4-bit group scale (and zero point), clip ratio per group.
    ratios = PHASE1_RATIOS if scheme.search == "grid" else torch.ones(1)
    best = torch.full((n, groups), float("inf"))
    group_scale = torch.zeros(n, groups)
    zero = torch.zeros(n, groups)
    for r in ratios:
        scale_r, zero_r = _asymmetric_groups(wg, r)
        err = error.per_group(wg - scale_r[..., None] * (_codes(wg, scale_r, zero_r) - zero_r[..., None]))
        better = err < best
        best = torch.where(better, err, best)
        group_scale = torch.where(better, scale_r, group_scale)
        zero = torch.where(better, zero_r, zero)

    # Phase 2: the per-channel INT8 scale s1 (clip ratio per row); S2 = round(group scale / s1) is then an integer.
    ratios = PHASE2_RATIOS if scheme.search == "grid" else torch.ones(1)
    row_absmax = w.abs().amax(1).clamp_min(MIN_SCALE)
    best_row = torch.full((n,), float("inf"))
    chosen = None
    for r in ratios:
        s1 = r * row_absmax / 127
        s2 = torch.round(group_scale / s1[:, None]).clamp(1, 127)
        reach = torch.floor(127 / s2)  # |S2 * (q - z)| <= 127
        q = _codes(wg, s1[:, None] * s2, zero, (zero - reach).clamp(min=0)[..., None],
                   (zero + reach).clamp(max=15)[..., None])
        deq = (s1[:, None, None] * s2[..., None] * (q - zero[..., None])).reshape(n, k)
        err = error.per_row(w - deq)
        better = err < best_row
        best_row = torch.where(better, err, best_row)
        if chosen is None:
            chosen = [s1, s2, q]
        else:
            chosen = [torch.where(better, s1, chosen[0]), torch.where(better[:, None], s2, chosen[1]),
                      torch.where(better[:, None, None], q, chosen[2])]
    s1, s2, q = chosen
    codes = weights.pack_nibbles(q.reshape(n, k).to(torch.uint8))
    return PackedWeight([codes], "int4", size, s1.contiguous(), s2.to(torch.int8).contiguous(), "integer",
                        zero.to(torch.uint8).contiguous(), [])


# ---------------------------------------------------------------- LoRC
def low_rank_compensation(w: torch.Tensor, w_quantized: torch.Tensor, rank: int, name: str = "weight"):
    """LoRC's INT8 factors [b [r, K], b_scale [r], a [N, r], a_scale [N]] of the error w - w_quantized."""
    n, k = w.shape
    if rank > min(n, k):
        raise ConfigError(f"{name}: LoRC rank {rank} is larger than the [{n}, {k}] weight allows (at most {min(n, k)})")
    u, s, vh = torch.linalg.svd(w.float() - w_quantized.float(), full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    a_q, a_scale = INT8.quantize_per_channel(a.contiguous())
    b_q, b_scale = INT8.quantize_per_channel(b.contiguous())
    return [b_q, b_scale, a_q, a_scale]
