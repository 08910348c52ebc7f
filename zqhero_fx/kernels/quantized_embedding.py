"""Static quantized embedding table: gather quantized rows and dequantize with their scale.

`table_q` is [V, D] in a quantized format (int8, float8) and `scale` is [V, 1] (one static scale per row) or [1] (one
per table, SQ). The Triton kernel takes INT8, FP8 E4M3 and FP8 E5M2 tables (FP8 on sm_89+ on a GPU): widening a code to
fp32 is exact, so it is bit-exact against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zqhero_fx import dispatch
from zqhero_fx.kernels._triton_common import cast_rne, device_guard, row_scale_operand, triton_takes_format


# ---------------------------------------------------------------- reference (the spec)
def quantized_embedding_ref(indices, table_q, scale, out_dtype):
    rows = table_q[indices].float()
    row_scale = scale.float()[indices] if scale.numel() != 1 else scale.float().reshape(())
    return (rows * row_scale).to(out_dtype)


# ---------------------------------------------------------------- Triton kernel
@triton.jit
def _quantized_embedding_kernel(
    idx_ptr, table_ptr, scale_ptr, out_ptr,
    n_tokens, vocab, dim,
    stride_tv, stride_td, stride_sv,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A [BLOCK_T tokens, BLOCK_D features] tile of the output.
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_valid = toks < n_tokens
    mask = tok_valid[:, None] & (cols < dim)[None, :]
    store_mask = mask
    # Token ids; negative ids count from the end of the table, as tensor indexing (the reference) does.
    idx = tl.load(idx_ptr + toks, mask=tok_valid, other=0).to(tl.int64)
    idx = tl.where(idx < 0, idx + vocab, idx)
    # An out-of-range id is an error (asserted with TRITON_DEBUG=1); without the assert its row reads as zeros
    # rather than touching memory outside the table.
    idx_valid = (idx >= 0) & (idx < vocab)
    tl.device_assert(idx_valid | ~tok_valid, "quantized_embedding: index out of range")
    tok_valid = tok_valid & idx_valid
    mask = mask & idx_valid[:, None]
    # Gather the quantized rows (int8 or float8 codes) and their scale (stride_sv = 0 for one scale per table),
    # dequantize in fp32 (widening a code to fp32 is exact).
    rows = tl.load(table_ptr + idx[:, None] * stride_tv + cols[None, :] * stride_td, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + idx * stride_sv, mask=tok_valid, other=0.0).to(tl.float32)
    out = rows.to(tl.float32) * scale[:, None]
    out_ptrs = out_ptr + toks[:, None].to(tl.int64) * dim + cols[None, :]
    tl.store(out_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=store_mask)


# ---------------------------------------------------------------- launcher
def quantized_embedding_triton(indices, table_q, scale, out_dtype):
    vocab, dim = table_q.shape
    out = torch.empty((*indices.shape, dim), dtype=out_dtype, device=table_q.device)
    if out.numel() == 0:
        return out
    flat_idx = indices.reshape(-1)
    if not flat_idx.is_contiguous():
        flat_idx = flat_idx.contiguous()
    scales, stride_sv = row_scale_operand(scale, vocab, "quantized_embedding scale")
    n_tokens = flat_idx.numel()
    block_d = min(triton.next_power_of_2(dim), 1024)
    block_t = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(dim, block_d))
    with device_guard(table_q):
        _quantized_embedding_kernel[grid](
            flat_idx, table_q, scales, out,
            n_tokens, vocab, dim,
            table_q.stride(0), table_q.stride(1), stride_sv,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=max(1, min(8, block_t * block_d // 512)),
        )
    return out


# ---------------------------------------------------------------- registration
dispatch.register("quantized_embedding", dispatch.KernelSpec(
    reference=quantized_embedding_ref, triton=quantized_embedding_triton,
    triton_applies=lambda indices, table_q, *rest: triton_takes_format(table_q.dtype, table_q.device)))
