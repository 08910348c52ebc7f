import math

import torch

import zqhero_fx
from tests.models import ConvNet, bert_batch
from tests.passes._util import apply, count, run_flat
from zqhero_fx.capture import flatten_inputs
from zqhero_fx.passes._graph import ATTENTION, EMBEDDING, GELU, LAYER_NORM, LINEAR, MATMUL, SOFTMAX, aten
from zqhero_fx.passes.canonicalize import canonicalize
from zqhero_fx.passes.propagate_meta import propagate_meta


def _canonical(gm, example):
    gm = __import__("copy").deepcopy(gm)
    gm.meta["zqhero"] = {"flat_example": flatten_inputs(gm, example) if example is not None else None}
    propagate_meta(gm)
    return gm, apply(__import__("copy").deepcopy(gm), canonicalize, "canonicalize")


def test_eager_attention_becomes_one_attention_node(bert_traced):
    _, gm = bert_traced("h64_l2", "eager")
    before, after = _canonical(gm, None)
    assert count(before, MATMUL) == 4 and count(before, SOFTMAX) == 2 and count(before, ATTENTION) == 0
    assert count(after, MATMUL) == 0 and count(after, SOFTMAX) == 0 and count(after, ATTENTION) == 2
    assert count(after, aten.dropout.default) == 0
    flat = flatten_inputs(gm, bert_batch(2, 9, pad_from=6, seed=1))
    torch.testing.assert_close(run_flat(after, flat), run_flat(before, flat), rtol=1e-5, atol=1e-5)


def test_both_attention_implementations_give_the_same_canonical_ops(bert_traced):
    canon = {}
    for attn in ("sdpa", "eager"):
        _, after = _canonical(bert_traced("h64_l2", attn)[1], None)
        canon[attn] = {t: count(after, t) for t in (LINEAR, LAYER_NORM, GELU, EMBEDDING, ATTENTION, MATMUL, SOFTMAX)}
    assert canon["sdpa"] == canon["eager"]
    assert canon["sdpa"][LINEAR] == 13 and canon["sdpa"][ATTENTION] == 2


def test_symbolic_trace_modules_become_aten_ops_with_weights_as_get_attr(encoder_model):
    from tests.models import encoder_batch

    gm = torch.fx.symbolic_trace(encoder_model)
    before, after = _canonical(gm, encoder_batch(2, 8))
    assert sum(n.op == "call_module" for n in before.graph.nodes) > 0
    assert sum(n.op == "call_module" for n in after.graph.nodes) == 0
    linears = [n for n in after.graph.nodes if n.target is LINEAR]
    assert len(linears) == 12 and all(n.args[1].op == "get_attr" for n in linears)
    assert count(after, ATTENTION) == 0  # the score scale is a traced shape value here, not a constant: left alone
    flat = flatten_inputs(gm, encoder_batch(3, 7, seed=2))
    torch.testing.assert_close(run_flat(after, flat), run_flat(before, flat), rtol=1e-5, atol=1e-5)


def test_unknown_modules_stay():
    gm = torch.fx.symbolic_trace(ConvNet().eval())
    _, after = _canonical(gm, (torch.randn(2, 3, 8, 8),))
    assert [n.target for n in after.graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    assert count(after, LINEAR) == 1 and count(after, LAYER_NORM) == 1


class _FamilySpellings(torch.nn.Module):
    """The model-family spellings canonicalize turns into one op each, written as the Hugging Face models write them:
    Llama's and Gemma's RMSNorm, GPT-2's Conv1D (addmm with an [in, out] weight), GPT-2's gelu_new, torch.relu."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w_llama = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.w_gemma = torch.nn.Parameter(torch.randn(16) * 0.1)
        self.conv1d_w = torch.nn.Parameter(torch.randn(16, 24) * 0.2)
        self.conv1d_b = torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.w_llama * h.to(x.dtype)  # Llama
        g = h.float()
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
        g = (g * (1.0 + self.w_gemma.float())).type_as(h)  # Gemma
        flat = torch.addmm(self.conv1d_b, g.view(-1, g.size(-1)), self.conv1d_w)
        y = flat.view(g.size()[:-1] + (24,))  # GPT-2 Conv1D
        y = 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))))  # gelu_new
        return torch.relu(y)


def test_family_spellings_become_one_op_each():
    model = _FamilySpellings().eval()
    x = torch.randn(2, 5, 16)
    gm = zqhero_fx.trace(model, (x,))
    before, after = _canonical(gm, (x,))
    assert count(before, aten.rsqrt.default) == 2 and count(before, aten.addmm.default) == 1
    assert count(after, aten.rms_norm.default) == 2 and count(after, aten.rsqrt.default) == 0
    assert count(after, aten.addmm.default) == 0 and count(after, LINEAR) == 1
    assert count(after, aten.tanh.default) == 0
    gelus = [n for n in after.graph.nodes if n.target is GELU]
    assert len(gelus) == 1 and gelus[0].kwargs["approximate"] == "tanh"
    assert count(after, aten._assert_tensor_metadata.default) == 0
    linear = next(n for n in after.graph.nodes if n.target is LINEAR)
    assert linear.args[1].target.endswith("_nk") and linear.args[0].meta["val"].dim() == 3  # Wᵀ, views removed
    gemma_weight = [n.args[2] for n in after.graph.nodes if n.target is aten.rms_norm.default][1]
    torch.testing.assert_close(getattr(after, gemma_weight.target.split(".")[-1]), 1.0 + model.w_gemma.detach())
    for shape in ((2, 5, 16), (3, 7, 16)):
        flat = flatten_inputs(gm, (torch.randn(*shape),))
        torch.testing.assert_close(run_flat(after, flat), run_flat(before, flat), rtol=1e-5, atol=1e-5)


def test_torch_level_activations_become_aten_ops():
    class Acts(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(torch.nn.functional.silu(torch.relu(x))).sigmoid()

    gm = torch.fx.symbolic_trace(Acts())
    _, after = _canonical(gm, (torch.randn(2, 4),))
    targets = [n.target for n in after.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets == [aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default]
