"""The zqhero op library: each file holds an op's PyTorch reference (the spec), its Triton kernel and launcher, and its
`torch.library` registration under `torch.ops.zqhero`. Importing this package registers every op."""

from zqhero_fx.kernels import (  # noqa: F401  (imported to register the ops)
    embedding_layer_norm_quant,
    int8_attention,
    int8_linear,
    layer_norm_quant,
    quantize,
    quantized_embedding,
    vnni_cpu,
)
from zqhero_fx.kernels._select import kernel_choice, use_kernels

OPS = {
    "quantize_per_token": quantize.quantize_per_token_ref,
    "quantize": quantize.quantize_ref,
    "dequantize": quantize.dequantize_ref,
    "layer_norm_quant": layer_norm_quant.layer_norm_quant_ref,
    "int8_linear": int8_linear.int8_linear_ref,
    "int8_attention": int8_attention.int8_attention_ref,
    "quantized_embedding": quantized_embedding.quantized_embedding_ref,
    "embedding_layer_norm_quant": embedding_layer_norm_quant.embedding_layer_norm_quant_ref,
}

__all__ = ["OPS", "kernel_choice", "use_kernels"]
