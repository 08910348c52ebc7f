"""Embedding^norm^quant: gather several embedding tables, sum them, LayerNorm, per-token quantization, one pass.

This is BERT's embedding block (word + token-type + position, add, LayerNorm) feeding the first INT8 GEMM, lowered in
mode M3. `indices[i]` indexes `tables[i]`; the index tensors broadcast against each other (position ids [1, S] with
input ids [B, S]), and the output has their broadcast shape plus the hidden dimension D. Each table is either

  * quantized [V, D] (int8, float8_e4m3fn, float8_e5m2) with `scales[i]` one static scale per row ([V, 1] or [V])
    or one per table ([1]); or
  * floating point [V, D] with `scales[i]` an empty tensor (numel 0): its rows are used as they are.

The dequantized rows are summed in fp32, in list order, then LayerNorm (weight, optional bias, eps) and TWQ exactly as
`norm_quant`. Outputs: (q [..., D] in `dtype` (int8, or float8 E4M3 / E5M2), scale fp32 [..., 1], normed), where
`normed` is the float LayerNorm output in `weight`'s dtype when `emit_normed`, else an empty tensor of that dtype. The
Triton kernel takes every mix of int8 / float8 / float tables, and FP8 only on sm_89+ on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels import int8_cpu
from zqhero_fx.formats import MIN_SCALE, format_of_dtype, is_quantized_dtype
from zqhero_fx.kernels._triton_common import (
    as_rows,
    cast_rne,
    device_guard,
    quantize_by_reciprocal,
    triton_takes_format,
)
from zqhero_fx.kernels.norm_quant import norm_quant_rows, row_blocks
from zqhero_fx.kernels.quantized_embedding import quantized_embedding_ref

# Tables the fused kernel gathers in one program (BERT needs 3). Fixed because a Triton signature is.
MAX_TABLES = 4


def _check_inputs(indices, tables, scales):
    if not (len(indices) == len(tables) == len(scales)) or len(tables) == 0:
        raise ValueError(
            "embedding_norm_quant: needs one index tensor, table and scale per table "
            f"(got {len(indices)}, {len(tables)}, {len(scales)})"
        )
    dims = {t.shape[-1] for t in tables}
    if len(dims) != 1 or any(t.dim() != 2 for t in tables):
        shapes = [tuple(t.shape) for t in tables]
        raise ValueError(f"embedding_norm_quant: tables must be [V, D] with one D; got {shapes}")
    for table, scale in zip(tables, scales):
        if is_quantized_dtype(table.dtype):
            if scale.numel() not in (1, table.shape[0]):
                raise ValueError(
                    f"embedding_norm_quant: a quantized table of {table.shape[0]} rows needs a [V, 1] or [1] scale; "
                    f"got {tuple(scale.shape)}"
                )
        elif table.is_floating_point():
            if scale.numel() != 0:
                raise ValueError("embedding_norm_quant: a float table takes an empty scale tensor")
        else:
            raise ValueError(
                f"embedding_norm_quant: tables must be quantized (int8, float8) or float, got {table.dtype}"
            )
    return torch.broadcast_shapes(*(i.shape for i in indices)), tables[0].shape[-1]


# ---------------------------------------------------------------- reference (the spec)
def embedding_rows_ref(indices, table, scale):
    """fp32 rows of one table: dequantized for a quantized table, as-is for float."""
    if is_quantized_dtype(table.dtype):
        return quantized_embedding_ref(indices, table, scale, torch.float32)
    return table[indices].float()


def embedding_norm_quant_ref(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8):
    shape, dim = _check_inputs(indices, tables, scales)
    summed = None
    for idx, table, scale in zip(indices, tables, scales):
        rows = embedding_rows_ref(idx.expand(shape), table, scale)
        summed = rows if summed is None else summed + rows
    normed32 = F.layer_norm(summed, (dim,), weight.float(), None if bias is None else bias.float(), eps)
    q, q_scale = format_of_dtype(dtype).quantize_per_token(normed32)
    normed = normed32.to(weight.dtype) if emit_normed else weight.new_empty(0)
    return q, q_scale, normed


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _embedding_norm_quant_kernel(
    idx_ptrs, stride_ir, stride_ic,  # per table: index tensor as a [rows, inner] broadcast view
    table_ptrs, stride_tv, stride_td, scale_ptrs, stride_sv, vocabs,  # per table
    w_ptr, b_ptr, q_ptr, scale_ptr, normed_ptr,
    n_tokens, n_inner, n_cols, eps,
    NUM_TABLES: tl.constexpr, FLOAT_TABLES: tl.constexpr,  # FLOAT_TABLES: bit i set = table i is float, no scale
    HAS_BIAS: tl.constexpr, EMIT_NORMED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # BLOCK_M tokens per program, whole rows (BLOCK_N >= n_cols); token t sits at (t // n_inner, t % n_inner) of the
    # broadcast index shape, which each table's index tensor reads through its own (possibly zero) strides.
    toks = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tok_valid = toks < n_tokens
    tok_outer = toks // n_inner
    tok_inner = toks % n_inner
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = tok_valid[:, None] & col_mask[None, :]

    # Gather and sum the tables in fp32, in list order (the reference's order). Unrolled: NUM_TABLES is a constexpr.
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(NUM_TABLES):
        idx = tl.load(idx_ptrs[i] + tok_outer * stride_ir[i] + tok_inner * stride_ic[i], mask=tok_valid, other=0)
        idx = idx.to(tl.int64)
        idx = tl.where(idx < 0, idx + vocabs[i], idx)  # negative ids count from the end, as tensor indexing does
        # Out-of-range ids are asserted with TRITON_DEBUG=1; otherwise they read zeros, never outside the table.
        idx_valid = (idx >= 0) & (idx < vocabs[i])
        tl.device_assert(idx_valid | ~tok_valid, "embedding_norm_quant: index out of range")
        rows = tl.load(
            table_ptrs[i] + idx[:, None] * stride_tv[i] + cols[None, :] * stride_td[i],
            mask=mask & idx_valid[:, None],
            other=0.0,
        ).to(tl.float32)
        if ((FLOAT_TABLES >> i) & 1) == 0:
            row_scale = tl.load(
                scale_ptrs[i] + idx * stride_sv[i], mask=tok_valid & idx_valid, other=0.0
            ).to(tl.float32)
            rows = rows * row_scale[:, None]
        s = s + rows

    # LayerNorm + TWQ on the summed rows, exactly as norm_quant does; q's element type is the output format.
    Q_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    y, scale = norm_quant_rows(s, mask, cols, col_mask, w_ptr, b_ptr, n_cols, eps, HAS_BIAS, False, Q_DTYPE)
    out_offsets = toks[:, None] * n_cols + cols[None, :]
    inv_scale = 1.0 / scale
    tl.store(q_ptr + out_offsets, quantize_by_reciprocal(y, inv_scale[:, None], Q_DTYPE), mask=mask)
    tl.store(scale_ptr + toks, scale, mask=tok_valid)
    if EMIT_NORMED:
        tl.store(normed_ptr + out_offsets, cast_rne(y, normed_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launcher
def embedding_norm_quant_triton(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8):
    shape, dim = _check_inputs(indices, tables, scales)
    if len(tables) > MAX_TABLES:
        raise ValueError(
            f"embedding_norm_quant: the fused kernel takes up to {MAX_TABLES} tables, got {len(tables)}"
        )
    device = tables[0].device
    q = torch.empty((*shape, dim), dtype=dtype, device=device)
    q_scale = torch.empty((*shape, 1), dtype=torch.float32, device=device)
    normed = torch.empty((*shape, dim) if emit_normed else (0,), dtype=weight.dtype, device=device)
    if q.numel() == 0:
        return q, q_scale.fill_(MIN_SCALE), normed

    # Every index tensor as a strided [rows, inner] view of the broadcast shape (position ids keep stride 0 over B).
    idx_views = [as_rows(i, shape) for i in indices]
    n_inner = shape[-1] if len(shape) else 1
    n_tokens = q.numel() // dim
    float_tables = 0
    table_scales = []
    for i, (table, scale) in enumerate(zip(tables, scales)):
        if is_quantized_dtype(table.dtype):
            flat = scale.reshape(-1)
            table_scales.append((flat, 0 if flat.numel() == 1 else flat.stride(0)))
        else:
            float_tables |= 1 << i
            table_scales.append((table, 0))  # never read: the bit in FLOAT_TABLES skips the scale
    block_m, block_n, num_warps = row_blocks(dim, 4, "embedding_norm_quant")
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    with device_guard(tables[0]):
        _embedding_norm_quant_kernel[(triton.cdiv(n_tokens, block_m),)](
            tuple(v[0] for v in idx_views), tuple(v[1] for v in idx_views), tuple(v[2] for v in idx_views),
            tuple(tables), tuple(t.stride(0) for t in tables), tuple(t.stride(1) for t in tables),
            tuple(s[0] for s in table_scales), tuple(s[1] for s in table_scales), tuple(t.shape[0] for t in tables),
            w, b, q, q_scale, normed if emit_normed else q,
            n_tokens, n_inner, dim, eps,
            NUM_TABLES=len(tables), FLOAT_TABLES=float_tables,
            HAS_BIAS=bias is not None, EMIT_NORMED=emit_normed,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return q, q_scale, normed


# ---------------------------------------------------------------- registration
def _triton_takes(indices, tables, scales, weight, bias, eps, emit_normed, dtype=torch.int8) -> bool:
    """A quantized output the kernel writes, and tables that are quantized (int8 / float8) or plain float."""
    device = tables[0].device
    return triton_takes_format(dtype, device) and all(
        triton_takes_format(t.dtype, device) if is_quantized_dtype(t.dtype) else t.is_floating_point()
        for t in tables
    )


# CPU (INT8 / float32 tables, INT8 out): one pass per token in C++ (csrc/norm_quant_cpu.cpp, via int8_cpu.py), kept
# opaque under Inductor as norm_quant is.
dispatch.register("embedding_norm_quant", dispatch.KernelSpec(
    reference=embedding_norm_quant_ref, triton=embedding_norm_quant_triton, triton_applies=_triton_takes,
    cpu=int8_cpu.embedding_norm_quant, cpu_applies=int8_cpu.embedding_norm_quant_takes,
    cpu_available=int8_cpu.available, cpu_kernel_beats_inductor=True))
