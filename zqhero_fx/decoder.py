"""Decoder LLMs: capture a Hugging Face `*ForCausalLM` with its KV cache, and generate text with the captured (or
converted) graph.

The captured graph is one *step*: it takes the new tokens, their positions, the cache slots they go to, a padding mask
over the cache slots and the KV cache (one key and one value tensor per layer, [batch, kv_heads, cache_len, head_dim]),
writes the new keys and values into the cache in place (`aten.index_copy_`) and returns the logits of the new tokens.
Prefill (many tokens) and decode (one token) run the same graph; batch, prompt length and cache length are symbolic up
to the maxima given at capture. The cache lives outside the graph, so a converted model's cache is whatever dtype its
graph's cache inputs have: INT8 when the mode quantizes attention (passes/quantize_kv_cache.py), float otherwise.

    gm = zqhero_fx.trace(model, {"input_ids": ids, "attention_mask": mask}, max_cache_len=1024)
    q = zqhero_fx.convert(gm, "M3", calibration=[{"input_ids": ids}])
    out = zqhero_fx.generate(q, prompt_ids, max_new_tokens=32)
    out.sequences, out.decode_tokens_per_second

Why these inputs and not Hugging Face's StaticCache held as buffers (transformers' executorch wrapper): buffers fix the
batch size at capture and make every sequence share one cache; graph inputs leave the cache's shape and dtype to the
caller, and the graph still updates it in place (no copy of the cache per step).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from zqhero_fx.errors import CaptureError

STEP_INPUTS = ("input_ids", "position_ids", "cache_position", "attention_mask")
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_CACHE_LEN = 2048


@dataclass(frozen=True)
class DecoderSpec:
    """What a step graph's caller needs to know: the cache layout and the limits it was captured for."""

    model_class: str
    num_layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    vocab_size: int
    max_batch: int
    max_cache_len: int
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())


# ---------------------------------------------------------------- the cache the graph sees
try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers is optional for non-decoder users
    Cache = CacheLayerMixin = None


if CacheLayerMixin is not None:
    class GraphCacheLayer(CacheLayerMixin):
        """One layer's cache as two caller-owned tensors; new keys/values are written at `cache_position` in place
        and the whole cache is returned (the mask hides slots not written yet)."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.cache_position = keys, values, cache_position
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.cache_position, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, self.cache_position, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, query_length):
            return self.keys.shape[2], 0

        def get_seq_length(self):
            return self.cache_position[-1] + 1

        def get_max_length(self):
            return self.keys.shape[2]

    class GraphCache(Cache):
        def __init__(self, keys: list, values: list, cache_position: torch.Tensor):
            super().__init__(layers=[GraphCacheLayer(k, v, cache_position) for k, v in zip(keys, values)])


def visibility_mask(cache_position: torch.Tensor, attention_mask: torch.Tensor, sliding_window: int | None):
    """Boolean [batch, 1, new tokens, cache slots]: slot j holds position j; a new token at position p sees the slots
    j <= p (and > p - window with a sliding window) that the padding mask marks as real tokens."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    visible = slots[None, :] <= cache_position[:, None]
    if sliding_window is not None:
        visible = visible & (slots[None, :] > cache_position[:, None] - sliding_window)
    return visible[None, None] & attention_mask[:, None, None, :].bool()


class CausalLMStep(torch.nn.Module):
    """A `*ForCausalLM` as one cache step with tensors in and logits out (what torch.export captures)."""

    def __init__(self, model: torch.nn.Module, sliding_window: int | None):
        super().__init__()
        self.model = model
        self.sliding_window = sliding_window
        params = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, position_ids, cache_position, attention_mask, key_cache: list, value_cache: list):
        cache = GraphCache(key_cache, value_cache, cache_position)
        visible = visibility_mask(cache_position, attention_mask, self.sliding_window)
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa":
            # Eager attention adds the mask to the logits: it needs the additive form, not a boolean keep-mask.
            dtype = next(self.model.parameters()).dtype
            visible = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(dtype).min)
        output = self.model(input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                            attention_mask=visible,
                            use_cache=True, **{self.cache_argument: cache})
        return output.logits


# ---------------------------------------------------------------- capture
def is_causal_lm_with_cache(model: torch.nn.Module) -> bool:
    """A Hugging Face causal LM whose config asks for a KV cache (the default): `trace` captures it as a step graph."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (config is not None and callable(can_generate) and can_generate()
            and not getattr(config, "is_encoder_decoder", False)
            and bool(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                             "use_cache", False)))


_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


def _sliding_window(config, max_cache_len: int) -> int | None:
    """The window every layer attends within, or None for full attention; refuse per-layer mixes we cannot mask."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
        if unknown:
            raise CaptureError(f"{config.model_type}: cache layers of type {unknown} are not attention KV caches; "
                               "zqhero_fx captures decoders whose every layer keeps keys and values")
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False or window >= max_cache_len:
        return None
    if layer_types and len(set(layer_types)) > 1:
        raise CaptureError(f"{config.model_type} mixes sliding-window ({window}) and full-attention layers; with "
                           f"max_cache_len={max_cache_len} > {window} they need different masks: capture with "
                           f"max_cache_len <= {window}")
    return int(window)


def _cache_shape(config) -> tuple[int, int, int, int]:
    """(layers, kv heads, key dim, value dim) from a text config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim, head_dim


def _eos_ids(model) -> tuple[int, ...]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def new_cache(spec: DecoderSpec, batch: int, cache_len: int, dtypes, device=None) -> tuple[list, list]:
    """Zeroed key and value caches for `batch` sequences of up to `cache_len` tokens, one dtype pair per layer."""
    keys = [torch.zeros(batch, spec.kv_heads, cache_len, spec.key_dim, dtype=k, device=device) for k, _ in dtypes]
    values = [torch.zeros(batch, spec.kv_heads, cache_len, spec.value_dim, dtype=v, device=device) for _, v in dtypes]
    return keys, values


def trace_decoder(model: torch.nn.Module, example_inputs, *, max_cache_len: int | None = None,
                  max_batch: int | None = None) -> fx.GraphModule:
    """Capture a causal LM as a step graph (see the module docstring). `example_inputs` gives example token ids
    ({"input_ids": ids, ...} or ids); the example only sets dtypes and devices, every size is symbolic."""
    from zqhero_fx.capture import _eval_mode, exported_module, split_inputs

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_cache_len = int(max_cache_len or min(getattr(config, "max_position_embeddings", DEFAULT_MAX_CACHE_LEN),
                                             DEFAULT_MAX_CACHE_LEN))
    max_batch = int(max_batch or DEFAULT_MAX_BATCH)
    if max_cache_len < 2 or max_batch < 1:
        raise CaptureError(f"max_cache_len must be >= 2 and max_batch >= 1, got {max_cache_len} and {max_batch}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_cache_len > positions:
        raise CaptureError(f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={positions}")
    window = _sliding_window(config, max_cache_len)
    layers, kv_heads, key_dim, value_dim = _cache_shape(config)
    spec = DecoderSpec(type(model).__name__, layers, kv_heads, key_dim, value_dim, config.vocab_size, max_batch,
                       max_cache_len, window, _eos_ids(model))

    args, kwargs = split_inputs(example_inputs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise CaptureError("a causal LM is captured from example token ids: pass {'input_ids': ids} with ids an "
                           "integer tensor [batch, tokens]")
    # Examples with every dim >= 2 and distinct, so export keeps each symbolic instead of specialising it.
    batch, tokens, cache_len = 2, 3, max(5, min(8, max_cache_len))
    device = ids.device
    example_ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
    dtype = next(model.parameters()).dtype
    keys, values = new_cache(spec, batch, cache_len, [(dtype, dtype)] * layers, device)
    positions_ = torch.arange(tokens, device=device)
    example = (example_ids, positions_.expand(batch, tokens).contiguous(), positions_,
               torch.ones(batch, cache_len, dtype=torch.long, device=device), keys, values)
    step = CausalLMStep(model, window)
    with _eval_mode(model), torch.no_grad():
        _check_cache_used(step, example, spec)
        batch_dim = torch.export.Dim("batch", max=max_batch)
        token_dim = torch.export.Dim("tokens", min=1, max=max_cache_len)
        slot_dim = torch.export.Dim("cache_len", max=max_cache_len)
        dynamic = {"input_ids": {0: batch_dim, 1: token_dim}, "position_ids": {0: batch_dim, 1: token_dim},
                   "cache_position": {0: token_dim}, "attention_mask": {0: batch_dim, 1: slot_dim},
                   "key_cache": [{0: batch_dim, 2: slot_dim}] * layers,
                   "value_cache": [{0: batch_dim, 2: slot_dim}] * layers}
        try:
            program = torch.export.export(step, example, dynamic_shapes=dynamic, strict=False)
        except Exception as error:
            raise CaptureError(f"could not capture {type(model).__name__} with its KV cache: {type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}") from error
    gm = exported_module(program)
    gm.meta["zqhero_decoder"] = spec
    gm.meta["zqhero_example_inputs"] = {"input_ids": ids}
    return gm


def _check_cache_used(step: CausalLMStep, example, spec: DecoderSpec) -> None:
    """Run the step once eagerly: every layer must write its cache through our cache object, else the model keeps
    its state some other way (an unknown cache class) and the captured graph would silently forget the past."""
    keys, values = example[4], example[5]
    sentinel = 12345.0  # finite: masked slots must not turn the logits into NaN
    for k in keys:
        k.fill_(sentinel)
    try:
        step(*example)
    except Exception as error:
        raise CaptureError(f"{spec.model_class} does not run with zqhero_fx's cache ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}): its cache class is not one "
                           "zqhero_fx knows (a KV cache of [batch, heads, length, dim] per layer)") from error
    tokens = example[0].shape[1]
    unused = [i for i, k in enumerate(keys) if (k[:, :, :tokens] == sentinel).all(-1).any()]
    if unused:
        raise CaptureError(f"{spec.model_class}: layers {unused} never wrote keys through the cache object zqhero_fx "
                           "passed; the model keeps its cache in a class zqhero_fx does not know")
    for k, v in zip(keys, values):
        k.zero_()
        v.zero_()


# ---------------------------------------------------------------- running a step graph
def spec_of(model) -> DecoderSpec:
    spec = getattr(model, "meta", {}).get("zqhero_decoder") if isinstance(model, fx.GraphModule) else None
    if spec is None:
        raise CaptureError("this is not a decoder step graph: capture the causal LM with zqhero_fx.trace(model, "
                           "{'input_ids': ids}) (with use_cache left on) first")
    return spec


def cache_dtypes(gm: fx.GraphModule) -> list[tuple[torch.dtype, torch.dtype]]:
    """Per layer, the (key, value) cache dtypes the graph takes: float as captured, int8 where convert quantized it."""
    spec = spec_of(gm)
    dtypes = {n.target: n.meta["val"].dtype for n in gm.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    if not dtypes and "zqhero_cache_dtypes" in gm.meta:  # loaded by zqhero_fx.load: no traced metadata
        return list(gm.meta["zqhero_cache_dtypes"])
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"][len(STEP_INPUTS):]
    keys, values = names[:spec.num_layers], names[spec.num_layers:]
    return [(dtypes[k], dtypes[v]) for k, v in zip(keys, values)]


def _device(gm: fx.GraphModule) -> torch.device:
    tensor = next(iter(list(gm.parameters()) + list(gm.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_prompt(spec: DecoderSpec, input_ids, attention_mask, cache_len: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                 torch.int32):
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(
            input_ids).__name__
        raise CaptureError(f"input_ids must be an integer tensor [batch, tokens], got {got}")
    batch, tokens = input_ids.shape
    if tokens == 0:
        raise CaptureError("the prompt is empty: give at least one token")
    if cache_len > spec.max_cache_len:
        raise CaptureError(f"{tokens} prompt tokens need a cache of {cache_len} slots (with the new tokens), but the "
                           f"model was captured with max_cache_len={spec.max_cache_len}: trace it again with "
                           "a larger max_cache_len or shorten the prompt")
    if batch > spec.max_batch:
        raise CaptureError(f"batch of {batch} exceeds the max_batch={spec.max_batch} the model was captured with")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, tokens):
        raise CaptureError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(batch, tokens)}")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token positions that skip left padding, as Hugging Face's generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def step_inputs(gm: fx.GraphModule, input_ids, attention_mask=None, cache_len: int | None = None,
                check: bool = True) -> list:
    """The flat inputs of a prefill from an empty cache (what `convert` calibrates on and `prefill_logits` runs)."""
    spec = spec_of(gm)
    batch, tokens = input_ids.shape if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else (0, 0)
    cache_len = cache_len or tokens
    if check:
        _check_prompt(spec, input_ids, attention_mask, cache_len)
    device = input_ids.device
    mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
    mask[:, :tokens] = 1 if attention_mask is None else attention_mask.to(device)
    keys, values = new_cache(spec, batch, cache_len, cache_dtypes(gm), device)
    cache_position = torch.arange(tokens, device=device)
    positions = _positions(mask[:, :tokens])
    return [input_ids.long(), positions, cache_position, mask, *keys, *values]


def complete_inputs(gm: fx.GraphModule, inputs) -> list | None:
    """Flat inputs for a decoder graph given only {"input_ids", "attention_mask"} (or ids): a fresh-cache prefill.
    None when the caller already gives every step input."""
    from zqhero_fx.capture import split_inputs

    args, kwargs = split_inputs(inputs)
    if len(args) + len(kwargs) > 2 or set(kwargs) - {"input_ids", "attention_mask"}:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return step_inputs(gm, ids, mask)


def check_cache(gm: fx.GraphModule, keys: list, values: list) -> None:
    """Refuse caches whose count or dtypes differ from the graph's cache inputs (a float cache for an INT8 graph)."""
    expected = cache_dtypes(gm)
    if len(keys) != len(expected) or len(values) != len(expected):
        raise CaptureError(f"the graph takes {len(expected)} key and value caches, got {len(keys)} and {len(values)}")
    for i, ((k_dtype, v_dtype), k, v) in enumerate(zip(expected, keys, values)):
        for name, want, got in ((f"key_cache_{i}", k_dtype, k), (f"value_cache_{i}", v_dtype, v)):
            if not isinstance(got, torch.Tensor) or got.dtype != want:
                have = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
                raise CaptureError(f"{name} is {have}, but this graph keeps its cache as {want}: allocate it with "
                                   "zqhero_fx.decoder.step_inputs or new_cache(spec, ..., cache_dtypes(graph))")


def step_args(gm: fx.GraphModule, flat: list) -> tuple:
    """Flat inputs [input_ids, position_ids, cache_position, attention_mask, *keys, *values] as the step graph's
    arguments: the four tensors, then the key caches and the value caches as two lists."""
    layers = spec_of(gm).num_layers
    return (*flat[:4], list(flat[4:4 + layers]), list(flat[4 + layers:]))


def run_step(gm: fx.GraphModule, flat: list) -> torch.Tensor:
    """One step on flat inputs [input_ids, position_ids, cache_position, attention_mask, *keys, *values]."""
    args = step_args(gm, flat)
    check_cache(gm, args[4], args[5])
    return gm(*args)


def prefill_logits(gm: fx.GraphModule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Logits [batch, tokens, vocab] of every prompt token, from an empty cache (perplexity, KL, calibration)."""
    with torch.no_grad():
        return run_step(gm, step_inputs(gm, input_ids.to(_device(gm)), attention_mask))


# ---------------------------------------------------------------- generation
@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [batch, prompt + new tokens]
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second after the first one (which the prefill produces), summed over the batch."""
        steps = self.new_tokens - 1
        return self.sequences.shape[0] * steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate(gm: fx.GraphModule, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | list[int] | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
    """Greedy or sampled generation with a step graph from `zqhero_fx.trace` (float) or `zqhero_fx.convert`.

    Prompts in a batch are padded on the left (attention_mask 0 there), as for Hugging Face generate. Generation
    stops after `max_new_tokens`, or once every sequence has produced an end-of-sequence token (the model's
    `eos_token_id` unless given; finished rows then repeat it). `on_token(tokens [batch])` is called with every new
    token (streaming). Greedy output with the "fp" mode equals Hugging Face's `generate(do_sample=False)`.
    """
    spec = spec_of(gm)
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    device = _device(gm)
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    prompt_len = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    cache_len = prompt_len + max_new_tokens
    _check_prompt(spec, input_ids, attention_mask, cache_len)
    if attention_mask is not None:
        padded_right = (attention_mask[:, 1:].long() - attention_mask[:, :-1].long() < 0).any()
        if padded_right:
            raise CaptureError("attention_mask has padding after real tokens: pad prompts on the left for generation")
    eos = spec.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    flat = step_inputs(gm, input_ids, attention_mask, cache_len)
    mask, positions = flat[3], flat[1]
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    eos_tensor = torch.tensor(eos, device=device) if eos else None
    with torch.no_grad():
        start = time.perf_counter()
        logits = run_step(gm, flat)
        token = _choose(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        prefill_seconds = time.perf_counter() - start
        position = positions[:, -1:]
        start = time.perf_counter()
        for step in range(max_new_tokens):
            if eos_tensor is not None:
                token = torch.where(finished, tokens[-1] if tokens else token, token)
                finished |= torch.isin(token, eos_tensor)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            slot = prompt_len + step
            mask[:, slot] = 1
            position = position + 1
            flat[0], flat[1], flat[2] = token[:, None], position, torch.tensor([slot], device=device)
            logits = run_step(gm, flat)
            token = _choose(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        decode_seconds = time.perf_counter() - start
    sequences = torch.cat([input_ids.long(), torch.stack(tokens, 1)], 1)
    return GenerationResult(sequences, len(tokens), prefill_seconds, decode_seconds)
