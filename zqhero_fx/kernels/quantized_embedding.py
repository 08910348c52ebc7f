"""Static INT8 embedding table: gather int8 rows and dequantize with their scale.

`table_q` is [V, D] int8 and `scale` is [V, 1] (one static scale per row) or [1] (one per table, SQ).
"""

from __future__ import annotations

import torch

from zqhero_fx.kernels._select import wants_triton


# ---------------------------------------------------------------- reference (the spec)
def quantized_embedding_ref(indices, table_q, scale, out_dtype):
    rows = table_q[indices].float()
    row_scale = scale.float()[indices] if scale.numel() != 1 else scale.float().reshape(())
    return (rows * row_scale).to(out_dtype)


# ---------------------------------------------------------------- Triton kernel and launcher
def quantized_embedding_triton(indices, table_q, scale, out_dtype):
    raise NotImplementedError("Triton quantized_embedding: written under issue 3")


# ---------------------------------------------------------------- registration
@torch.library.custom_op("zqhero::quantized_embedding", mutates_args=())
def quantized_embedding(
    indices: torch.Tensor, table_q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    if wants_triton(table_q):
        return quantized_embedding_triton(indices, table_q, scale, out_dtype)
    return quantized_embedding_ref(indices, table_q, scale, out_dtype)


@quantized_embedding.register_fake
def _(indices, table_q, scale, out_dtype):
    return table_q.new_empty((*indices.shape, table_q.shape[1]), dtype=out_dtype)
