"""quantize_kv_cache: a decoder's KV cache stores keys and values in the attention's format.

After lower, a quantized attention reads K as quantize(index_copy_(cache, 2, slots, k_new), s_k): the whole cache is
written in float and requantized on every step. Quantization with a static scale that does not vary along batch and slots (SQ per tensor for K,
per head and feature for V) is elementwise along the slots, so it commutes with the copy into the cache:

    quantize(index_copy_(cache, slots, k_new), s)  ==  index_copy_(quantize(cache, s), slots, quantize(k_new, s))

Here the cache input becomes a tensor of the format's storage dtype (INT8: a quarter of FP32's bytes) and only the
new tokens are quantized; the attention reads the cache as it is. Applies to cache inputs of a decoder step graph
(zqhero_fx/decoder.py) whose every reader is one such quantize; `QuantConfig(quantize_kv_cache=False)` keeps the
cache float. Keys keep M3's per-tensor SQ scale (per-head key scales would need a per-head
qk_scale in the attention kernel): our choice, the scale M3 already calibrates.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zqhero_fx.modes import QuantConfig
from zqhero_fx.passes._graph import aten, is_op, val, zq


def _cache_write(placeholder: fx.Node) -> fx.Node | None:
    """The one in-place index_copy_ into this cache input, or None. Other users may only read its sizes."""
    writes = [u for u in placeholder.users if is_op(u, aten.index_copy_.default) and u.args[0] is placeholder]
    others = [u for u in placeholder.users if u not in writes and not is_op(u, aten.sym_size.int)]
    return writes[0] if len(writes) == 1 and not others else None


def _slot_invariant(scale: fx.Node, cache: fx.Node) -> bool:
    """A static scale that does not vary along the batch and slot dims of a [batch, heads, slots, dim] cache (per
    tensor for K, per head and feature for V), so quantizing commutes with writing slots."""
    scale_val, cache_val = val(scale), val(cache)
    if scale.op != "get_attr" or scale_val is None or cache_val is None or scale_val.dim() > cache_val.dim():
        return False
    padded = (1,) * (cache_val.dim() - scale_val.dim()) + tuple(scale_val.shape)
    return cache_val.dim() == 4 and padded[0] == 1 and padded[2] == 1


def _same_quantize(nodes: list[fx.Node], cache: fx.Node) -> fx.Node | None:
    """The first of `nodes` when all are zqhero.quantize with one slot-invariant static scale and one dtype."""
    if not nodes or not all(is_op(n, zq.quantize.default) for n in nodes):
        return None
    first = nodes[0]
    scale = first.args[1]
    if not isinstance(scale, fx.Node) or not _slot_invariant(scale, cache):
        return None
    if any(n.args[1] is not scale or n.args[2:] != first.args[2:] for n in nodes[1:]):
        return None
    return first


def quantize_kv_cache(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    if "zqhero_decoder" not in gm.meta or not config.quantize_kv_cache:
        return gm
    quantized = 0
    for placeholder in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        write = _cache_write(placeholder)
        quantize = _same_quantize(list(write.users), placeholder) if write is not None else None
        if quantize is None:
            continue
        scale, dtype = quantize.args[1], quantize.args[2] if len(quantize.args) > 2 else quantize.kwargs["dtype"]
        write.prepend(scale)  # a get_attr: defined before the write that now reads it
        with gm.graph.inserting_before(write):
            new_codes = gm.graph.call_function(zq.quantize.default, (write.args[3], scale, dtype))
        new_codes.meta = {k: v for k, v in quantize.meta.items() if k != "val"}
        cache_read = write
        if dtype.is_floating_point:
            # torch's CPU index_copy_ has no float8 kernel: write the codes' bytes into a byte view of the cache
            # (the same storage) and read the cache back as float8.
            with gm.graph.inserting_before(write):
                cache_bytes = gm.graph.call_function(aten.view.dtype, (placeholder, torch.uint8))
                code_bytes = gm.graph.call_function(aten.view.dtype, (new_codes, torch.uint8))
            write.args = (cache_bytes, write.args[1], write.args[2], code_bytes)
            with gm.graph.inserting_after(write):
                cache_read = gm.graph.call_function(aten.view.dtype, (write, dtype))
        else:
            write.args = (*write.args[:3], new_codes)
        for reader in list(write.users):
            if reader is not new_codes and reader is not cache_read:
                reader.replace_all_uses_with(cache_read)
                gm.graph.erase_node(reader)
        old = placeholder.meta["val"]
        with old.fake_mode:
            placeholder.meta["val"] = torch.empty_strided(old.shape, old.stride(), dtype=dtype, device=old.device)
        quantized += 1
    gm.meta.setdefault("zqhero", {})["quantized_kv_caches"] = quantized
    return gm
