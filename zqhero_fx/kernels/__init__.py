"""The kernels behind the zqhero IR (zqhero_fx/ops.py): each file holds an op's PyTorch reference (the spec), its
Triton kernel and launcher, and registers them (plus any fast CPU kernel) in the dispatch table (zqhero_fx/dispatch.py).
Importing this package registers every op's kernels; the ops import it on their first call."""

from zqhero_fx import ops  # noqa: F401  (the schemas the kernels implement)
from zqhero_fx.dispatch import KERNELS, kernel_choice, use_kernels
from zqhero_fx.kernels import (  # noqa: F401  (imported to register the kernels)
    embedding_norm_quant,
    norm_quant,
    packed_linear,
    quantize,
    quantized_attention,
    quantized_embedding,
    quantized_gated_linear,
    quantized_linear,
    rotary_quantize,
    vnni_cpu,
)

# op name -> its PyTorch reference (the spec every kernel is tested against)
REFERENCES = {name: spec.reference for name, spec in KERNELS.items()}

__all__ = ["REFERENCES", "kernel_choice", "use_kernels"]
