"""Tiny random-initialised Hugging Face models of many Transformer families, and an input builder for each.

Every model is built from its config (never from_pretrained: no network) with tiny sizes: hidden 64, 2 layers,
4 heads (GQA families: 2 key/value heads), intermediate 128, vocab 100, max positions 128; weights are seeded with
torch.manual_seed(seed) and the model is returned in eval mode.

    from tests.families import FAMILIES, build, last_hidden
    model, batch = build("llama")          # batch 2, seq 8
    out = model(**batch)
    h = last_hidden(out)                   # [batch, seq, hidden] (ViT: [batch, 1 + patches, hidden])

Family.kind is "encoder" | "decoder" | "vision" | "encoder-decoder"; Family.norm is "layernorm" | "rmsnorm".

Attention: every family here is built with attn_implementation="sdpa"; in transformers 5.x all of them support SDPA
(and SDPA is also the default when nothing is asked for), so none silently falls back to eager. Decoder families are
built with use_cache=False in their config, so a forward never returns or builds a KV cache.

Inputs: text models get input_ids (int64) and attention_mask (int64); text encoders have padding in row 0
(mask[0, -2:] = 0); decoders get an all-ones mask (right padding in a causal LM is not a realistic batch).
BART also gets decoder_input_ids (and decoder_attention_mask, all ones). ViT gets pixel_values [batch, 3, 32, 32].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB, MAX_POS = 64, 2, 4, 2, 128, 100, 128
IMAGE, PATCH = 32, 8
BATCH, SEQ = 2, 8
ATTN = "sdpa"


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., dict]  # (batch, seq, seed) -> dict of keyword arguments for model(**inputs)
    kind: str  # "encoder" | "decoder" | "vision" | "encoder-decoder"
    norm: str  # "layernorm" | "rmsnorm"
    notes: str = field(default="", compare=False)


def last_hidden(output) -> torch.Tensor:
    """The last hidden state of a model output: `.last_hidden_state` when the output has one (every family here,
    BART's being the decoder's), else its first tensor (output[0] for ModelOutput / tuple outputs, e.g. from a
    captured GraphModule that returns the same structure)."""
    if isinstance(output, torch.Tensor):
        return output
    h = getattr(output, "last_hidden_state", None)
    if isinstance(h, torch.Tensor):
        return h
    if isinstance(output, dict):
        for v in output.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(output, (tuple, list)):
        return last_hidden(output[0])
    return output[0]


# ---------------------------------------------------------------------------------------------------- inputs


def _generator(seed):
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _text(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0, pad: bool = True, low: int = 0,
          vocab: int = VOCAB) -> dict:
    ids = torch.randint(low, vocab, (batch, seq), generator=_generator(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and seq > 2:
        mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def encoder_inputs(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0) -> dict:
    """input_ids + attention_mask with two padded positions at the end of row 0."""
    return _text(batch, seq, seed, pad=True)


def decoder_inputs(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0) -> dict:
    """input_ids + an all-ones attention_mask (causal models)."""
    return _text(batch, seq, seed, pad=False)


def clip_text_inputs(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0) -> dict:
    """CLIP pools at argmax(input_ids) (eos_token_id == 2 legacy path); ids avoid the special ids 0..2."""
    return _text(batch, seq, seed, pad=True, low=3)


def bart_inputs(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0) -> dict:
    """Encoder input_ids/attention_mask (row 0 padded) plus decoder_input_ids and an all-ones decoder mask."""
    enc = _text(batch, seq, seed, pad=True, low=4)
    g = _generator(None if seed is None else seed + 1)
    dec = torch.randint(4, VOCAB, (batch, seq), generator=g)
    dec[:, 0] = 2  # decoder_start_token_id
    return {**enc, "decoder_input_ids": dec, "decoder_attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def vit_inputs(batch: int = BATCH, seq: int = SEQ, seed: int | None = 0) -> dict:
    """pixel_values [batch, 3, 32, 32]; `seq` is ignored (the sequence is 1 + (32/8)^2 = 17 tokens)."""
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=_generator(seed))}


# ---------------------------------------------------------------------------------------------------- models


def _make(cls_name: str, config_name: str, seed: int = 0, **config):
    import transformers

    config.setdefault("attn_implementation", ATTN)
    cfg = getattr(transformers, config_name)(**config)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg).eval()


_BERTISH = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
                vocab_size=VOCAB, max_position_embeddings=MAX_POS)
_DECODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, intermediate_size=INTER, vocab_size=VOCAB,
                max_position_embeddings=MAX_POS, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def bert():
    return _make("BertModel", "BertConfig", **_BERTISH)


def roberta():
    # padding_idx 1: position ids start at 2, so max positions must cover seq + 2.
    return _make("RobertaModel", "RobertaConfig", **_BERTISH, pad_token_id=1)


def distilbert():
    return _make("DistilBertModel", "DistilBertConfig", dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
                 vocab_size=VOCAB, max_position_embeddings=MAX_POS)


def electra():
    # embedding_size 32 != hidden 64: embeddings (word+pos+type, LayerNorm) in 32, then embeddings_project 32 -> 64.
    return _make("ElectraModel", "ElectraConfig", **_BERTISH, embedding_size=32)


def albert():
    # embedding_size 32, projected to 64 by encoder.embedding_hidden_mapping_in; layers share one set of weights.
    return _make("AlbertModel", "AlbertConfig", **_BERTISH, embedding_size=32)


def vit():
    return _make("ViTModel", "ViTConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=INTER, image_size=IMAGE, patch_size=PATCH, num_channels=3)


def clip_text():
    # hidden_act quick_gelu (the CLIP default); causal + padding mask; pre-LayerNorm.
    return _make("CLIPTextModel", "CLIPTextConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=INTER, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                 projection_dim=HIDDEN, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def bart():
    return _make("BartModel", "BartConfig", d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                 encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
                 decoder_ffn_dim=INTER, vocab_size=VOCAB, max_position_embeddings=MAX_POS, use_cache=False,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)


def gpt2():
    # Conv1D projections (weight [in, out], addmm), gelu_new (tanh approximation).
    return _make("GPT2Model", "GPT2Config", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                 vocab_size=VOCAB, n_positions=MAX_POS, use_cache=False, bos_token_id=0, eos_token_id=0)


def opt():
    return _make("OPTModel", "OPTConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 ffn_dim=INTER, word_embed_proj_dim=HIDDEN, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                 use_cache=False, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def llama():
    return _make("LlamaModel", "LlamaConfig", **_DECODER)


def qwen2():
    return _make("Qwen2Model", "Qwen2Config", **_DECODER)


def mistral():
    return _make("MistralModel", "MistralConfig", **_DECODER, sliding_window=None)


def phi3():
    # Fused qkv_proj and gate_up_proj (one Linear each; chunk/slice afterwards).
    return _make("Phi3Model", "Phi3Config", **_DECODER)


def gemma():
    # head_dim defaults to 256 in GemmaConfig: set to hidden / heads. RMSNorm scales by (1 + weight); embeddings are
    # multiplied by sqrt(hidden); MLP activation gelu_pytorch_tanh.
    return _make("GemmaModel", "GemmaConfig", **_DECODER, head_dim=HIDDEN // HEADS)


def t5_encoder():
    # T5 RMSNorm ("T5LayerNorm": no mean subtraction, no bias), relative position bias, unscaled attention scores,
    # ReLU feed-forward (feed_forward_proj "relu"), no biases in linears.
    return _make("T5EncoderModel", "T5Config", d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTER, num_layers=LAYERS,
                 num_heads=HEADS, vocab_size=VOCAB, relative_attention_num_buckets=32,
                 relative_attention_max_distance=MAX_POS, use_cache=False, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)


def modernbert():
    # LayerNorm without bias, RoPE, fused Wqkv, GeGLU MLP (Wi -> chunk -> gelu(a) * b), local/global attention.
    return _make("ModernBertModel", "ModernBertConfig", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=INTER, vocab_size=VOCAB,
                 max_position_embeddings=MAX_POS, global_attn_every_n_layers=2, local_attention=16,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert", bert, encoder_inputs, "encoder", "layernorm"),
    Family("roberta", roberta, encoder_inputs, "encoder", "layernorm"),
    Family("distilbert", distilbert, encoder_inputs, "encoder", "layernorm"),
    Family("electra", electra, encoder_inputs, "encoder", "layernorm", "embedding_size 32 -> hidden 64 projection"),
    Family("albert", albert, encoder_inputs, "encoder", "layernorm", "embedding_size 32, shared layer weights"),
    Family("vit", vit, vit_inputs, "vision", "layernorm", "32x32 image, patch 8: 16 patches + CLS"),
    Family("clip_text", clip_text, clip_text_inputs, "encoder", "layernorm", "causal text encoder, quick_gelu"),
    Family("bart", bart, bart_inputs, "encoder-decoder", "layernorm", "encoder + decoder with cross-attention"),
    Family("gpt2", gpt2, decoder_inputs, "decoder", "layernorm", "Conv1D projections, gelu_new"),
    Family("opt", opt, decoder_inputs, "decoder", "layernorm", "ReLU MLP, pre-LN"),
    Family("llama", llama, decoder_inputs, "decoder", "rmsnorm", "GQA 4/2, RoPE, SiLU-gated MLP"),
    Family("qwen2", qwen2, decoder_inputs, "decoder", "rmsnorm", "GQA 4/2, RoPE, SiLU-gated MLP, qkv bias"),
    Family("mistral", mistral, decoder_inputs, "decoder", "rmsnorm", "GQA 4/2, RoPE, SiLU-gated MLP"),
    Family("phi3", phi3, decoder_inputs, "decoder", "rmsnorm", "GQA 4/2, fused qkv_proj and gate_up_proj"),
    Family("gemma", gemma, decoder_inputs, "decoder", "rmsnorm", "RMSNorm (1 + w), gelu tanh gated MLP"),
    Family("t5_encoder", t5_encoder, encoder_inputs, "encoder", "rmsnorm", "T5LayerNorm, relative bias, ReLU"),
    Family("modernbert", modernbert, encoder_inputs, "encoder", "layernorm", "bias-free LN, RoPE, GeGLU"),
]}


def build(name: str, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> tuple[nn.Module, dict]:
    """(model in eval mode, an example batch of keyword arguments: batch 2, seq 8 by default)."""
    family = FAMILIES[name]
    return family.build(), family.inputs(batch, seq, seed)


CAUSAL_LMS = ["gpt2", "opt", "llama", "qwen2", "mistral", "phi3", "gemma"]


def causal_lm(name: str, seed: int = 0) -> nn.Module:
    """The family's `*ForCausalLM` (GPT-2: GPT2LMHeadModel) with the same tiny sizes and its KV cache on, as Hugging
    Face configs default to; seeded, eval mode."""
    import transformers

    config = FAMILIES[name].build().config
    config.use_cache = True
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTN).eval()


__all__ = ["CAUSAL_LMS", "causal_lm", "Family", "FAMILIES", "build", "last_hidden", "encoder_inputs", "decoder_inputs", "bart_inputs",
           "vit_inputs", "clip_text_inputs"]
