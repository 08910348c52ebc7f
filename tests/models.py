"""Small models the tests convert: Hugging Face BERT encoders of several shapes, an encoder of the same block shape
with unrelated module names (written so torch.fx.symbolic_trace can also capture it), and a conv net."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BERT_SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "h64_l2": (64, 2, 4, 128),
    "h96_l3": (96, 3, 3, 256),
    "h128_l1": (128, 1, 8, 512),
}


def tiny_bert(shape: str = "h64_l2", attn: str = "sdpa", classifier: bool = False, seed: int = 0, vocab: int = 100):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    hidden, layers, heads, inter = BERT_SHAPES[shape]
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=128,
                        attn_implementation=attn)
    cls = BertForSequenceClassification if classifier else BertModel
    return cls(config).eval()


def bert_batch(batch: int, seq: int, vocab: int = 100, pad_from: int | None = None, seed: int | None = None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[0, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Block(nn.Module):
    """A post-LayerNorm encoder block with names unlike BERT's, attention written out by hand."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.norm_a = nn.LayerNorm(width)
        self.ff_in, self.act, self.ff_out = nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width)
        self.norm_b = nn.LayerNorm(width)

    def split(self, t, b, s):
        return t.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(self, x, bias):
        b, s, w = x.shape
        q, k, v = self.split(self.to_q(x), b, s), self.split(self.to_k(x), b, s), self.split(self.to_v(x), b, s)
        scores = torch.matmul(q, k.transpose(-1, -2)) / (w // self.heads) ** 0.5 + bias
        ctx = torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, w)
        x = self.norm_a(self.proj(ctx) + x)
        return self.norm_b(self.ff_out(self.act(self.ff_in(x))) + x)


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 48, heads: int = 4, ff: int = 96, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(64, width)
        self.norm_in = nn.LayerNorm(width)
        self.stack = nn.ModuleList([Block(width, heads, ff) for _ in range(depth)])

    def forward(self, ids, keep):
        s = ids.shape[1]
        x = self.norm_in(self.tok(ids) + self.pos.weight[:s])
        bias = (1.0 - keep[:, None, None, :].float()) * -10000.0
        for block in self.stack:
            x = block(x, bias)
        return x


def encoder_batch(batch: int, seq: int, vocab: int = 50, seed: int | None = None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randint(0, vocab, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long))


class ConvNet(nn.Module):
    """Ops zqhero has no INT8 scheme for (conv, batch norm, pooling) around one Linear + LayerNorm + Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.head(self.norm(y))


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    reference, estimate = reference.double(), estimate.double()
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum().clamp_min(1e-300)))
