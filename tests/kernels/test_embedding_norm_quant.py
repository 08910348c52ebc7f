"""embedding_norm_quant: BERT's embedding block (gathers, sum, LayerNorm) fused with per-token INT8 or FP8, from
INT8, FP8 or float tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    FP8_DTYPE_LIST,
    FP8_DTYPES,
    assert_float_close,
    assert_int8_close,
    assert_quantized_close,
    random_fp8,
    random_int8,
    run_reference,
    run_triton,
)
from zqhero_fx.kernels import embedding_norm_quant as ELN


def bert_embedding_inputs(batch, seq, dim, seed, *, position_table="float", weight_dtype=torch.float32, bias=True):
    """Word (INT8, per-row scales), token-type (INT8, one scale) and position (float, or INT8) tables, with
    input ids [B, S], token-type ids [B, S] and position ids [1, S] broadcast over the batch."""
    g = torch.Generator().manual_seed(seed)
    word, word_scale = random_int8((100, dim), g), torch.rand(100, 1, generator=g) * 0.02
    token_type, token_type_scale = random_int8((2, dim), g), torch.rand(1, generator=g) * 0.02
    if position_table == "float":
        position, position_scale = torch.randn(max(seq, 1) + 5, dim, generator=g) * 0.1, torch.empty(0)
    else:
        position, position_scale = random_int8((max(seq, 1) + 5, dim), g), torch.rand(max(seq, 1) + 5, 1) * 0.01
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    type_ids = torch.randint(0, 2, (batch, seq), generator=g)
    pos_ids = torch.arange(seq)[None]
    weight = (torch.rand(dim, generator=g) + 0.5).to(weight_dtype)
    b = (torch.randn(dim, generator=g) * 0.1).to(weight_dtype) if bias else None
    return (
        [ids, type_ids, pos_ids],
        [word, token_type, position],
        [word_scale, token_type_scale, position_scale],
        weight, b, 1e-12,
    )


def check(args, device, emit_normed=True):
    args = (*args, emit_normed)
    q, scale, normed = run_triton("embedding_norm_quant", device, *args)
    q_ref, scale_ref, normed_ref = run_reference("embedding_norm_quant", *args)
    assert_int8_close(q, q_ref)
    assert scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert normed.shape == normed_ref.shape and normed.dtype == normed_ref.dtype
    if emit_normed:
        assert_float_close(normed, normed_ref)
    return q, scale, normed


# ---------------------------------------------------------------- reference semantics
def test_reference_matches_bert_embeddings_then_norm_quant():
    # Dequantize each table, gather, add (word + token type + position), LayerNorm, per-token INT8.
    indices, tables, scales, w, b, eps = bert_embedding_inputs(3, 11, 64, 0)
    q, scale, normed = ELN.embedding_norm_quant_ref(indices, tables, scales, w, b, eps, True)
    word = F.embedding(indices[0], tables[0].float() * scales[0])
    token_type = F.embedding(indices[1], tables[1].float() * scales[1])
    position = F.embedding(indices[2], tables[2])
    expected = F.layer_norm(word + token_type + position, (64,), w, b, eps)
    torch.testing.assert_close(normed, expected)
    q_expected, scale_expected = torch.ops.zqhero.quantize_per_token(expected)
    assert_int8_close(q, q_expected)
    torch.testing.assert_close(scale, scale_expected)


def test_reference_rejects_malformed_tables():
    indices, tables, scales, w, b, eps = bert_embedding_inputs(1, 4, 16, 0)
    with pytest.raises(ValueError, match="empty scale"):
        ELN.embedding_norm_quant_ref(indices, tables, [scales[0], scales[1], torch.ones(1)], w, b, eps, False)
    with pytest.raises(ValueError, match="one index tensor"):
        ELN.embedding_norm_quant_ref(indices[:2], tables, scales, w, b, eps, False)
    with pytest.raises(ValueError, match=r"\[V, 1\] or \[1\]"):
        ELN.embedding_norm_quant_ref(indices, tables, [torch.ones(3), *scales[1:]], w, b, eps, False)


# ---------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("position_table", ["float", "int8"])
@pytest.mark.parametrize(
    "batch, seq, dim", [(1, 1, 64), (3, 11, 64), (2, 130, 96), (1, 7, 768)], ids=lambda v: str(v)
)
def test_bert_embeddings(device, batch, seq, dim, position_table):
    check(bert_embedding_inputs(batch, seq, dim, 1, position_table=position_table), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", FLOAT_DTYPES)
def test_normed_output_in_weight_dtype(device, weight_dtype):
    args = bert_embedding_inputs(2, 9, 48, 2, weight_dtype=weight_dtype, bias=False)
    _, _, normed = check(args, device)
    assert normed.dtype == weight_dtype
    q, _, normed = check(args, device, emit_normed=False)
    assert normed.numel() == 0 and normed.dtype == weight_dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tables", [1, 2, 4])
def test_table_counts(device, num_tables):
    g = torch.Generator().manual_seed(3)
    tables = [random_int8((20 + i, 40), g) for i in range(num_tables)]
    scales = [torch.rand(20 + i, 1, generator=g) * 0.05 for i in range(num_tables)]
    indices = [torch.randint(-20, 20, (4, 6), generator=g) for _ in range(num_tables)]  # negative ids too
    check((indices, tables, scales, torch.rand(40, generator=g) + 0.5, None, 1e-5), device)


def test_more_tables_than_the_kernel_takes_is_an_error():
    tables = [torch.zeros(4, 8, dtype=torch.int8)] * (ELN.MAX_TABLES + 1)
    args = ([torch.zeros(2, dtype=torch.long)] * len(tables), tables, [torch.ones(1)] * len(tables),
            torch.ones(8), None, 1e-5, False)
    with pytest.raises(ValueError, match="up to"):
        ELN.embedding_norm_quant_triton(*args)
    assert ELN.embedding_norm_quant_ref(*args)[0].shape == (2, 8)  # the reference takes any number


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_index_shapes(device):
    # Ids of different ranks broadcast: [S] position ids against [B, S] input ids, [B, 1] segment ids.
    g = torch.Generator().manual_seed(4)
    tables = [random_int8((30, 32), g), random_int8((8, 32), g), random_int8((3, 32), g)]
    scales = [torch.rand(30, 1, generator=g), torch.rand(8, 1, generator=g), torch.rand(1, generator=g)]
    indices = [torch.randint(0, 30, (3, 8), generator=g), torch.arange(8), torch.randint(0, 3, (3, 1), generator=g)]
    q, _, _ = check((indices, tables, scales, torch.ones(32), torch.zeros(32), 1e-5), device)
    assert q.shape == (3, 8, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_identical_rows_quantize_to_zero_safely(device):
    # Every token's embedding sum constant across the hidden dim (all-zero tables): variance 0, output = bias = 0.
    tables = [torch.zeros(5, 16, dtype=torch.int8), torch.zeros(3, 16)]
    scales = [torch.ones(5, 1), torch.empty(0)]
    indices = [torch.tensor([[0, 4]]), torch.tensor([[1, 2]])]
    q, scale, normed = check((indices, tables, scales, torch.ones(16), None, 1e-12), device)
    assert torch.all(q == 0) and not torch.isnan(normed).any() and not torch.isnan(scale).any()


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=8)
@given(
    batch=st.integers(1, 4), seq=st.integers(1, 40), dim=st.integers(1, 200),
    position_table=st.sampled_from(["float", "int8"]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_embedding_norm_quant_hypothesis(device, batch, seq, dim, position_table, bias, seed):
    check(bert_embedding_inputs(batch, seq, dim, seed, position_table=position_table, bias=bias), device)


# ---------------------------------------------------------------- FP8 tables and FP8 outputs
def fp8_embedding_inputs(batch, seq, dim, seed, table_dtypes, *, bias=True):
    """BERT-like word / token-type / position tables in the given dtypes (float8 tables get a static scale, a float
    table an empty one), ids [B, S], [B, S] and [1, S]."""
    g = torch.Generator().manual_seed(seed)
    vocabs = (100, 2, max(seq, 1) + 5)
    tables, scales = [], []
    for vocab, dtype in zip(vocabs, table_dtypes):
        if dtype == torch.int8:
            tables.append(random_int8((vocab, dim), g))
            scales.append(torch.rand(vocab, 1, generator=g) * 0.02)
        elif dtype in FP8_DTYPE_LIST:
            tables.append(random_fp8((vocab, dim), dtype, g, 50.0))
            scales.append(torch.rand(vocab, 1, generator=g) * 0.02 if vocab > 2 else torch.rand(1, generator=g) * 0.02)
        else:
            tables.append(torch.randn(vocab, dim, generator=g).to(dtype) * 0.1)
            scales.append(torch.empty(0))
    indices = [torch.randint(0, 100, (batch, seq), generator=g), torch.randint(0, 2, (batch, seq), generator=g),
               torch.arange(seq)[None]]
    weight = torch.rand(dim, generator=g) + 0.5
    b = torch.randn(dim, generator=g) * 0.1 if bias else None
    return indices, tables, scales, weight, b, 1e-12


def check_quantized(args, device, out_dtype, emit_normed=True):
    args = (*args, emit_normed, out_dtype)
    q, scale, normed = run_triton("embedding_norm_quant", device, *args)
    q_ref, scale_ref, normed_ref = run_reference("embedding_norm_quant", *args)
    assert q.dtype == out_dtype
    assert_quantized_close(q, q_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert normed.shape == normed_ref.shape and normed.dtype == normed_ref.dtype
    if emit_normed:
        assert_float_close(normed, normed_ref)
    return q, scale, normed


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [E4M3, E5M2, torch.int8], ids=["out_e4m3", "out_e5m2", "out_int8"])
@pytest.mark.parametrize(
    "table_dtypes", [(E4M3, E4M3, torch.float32), (E5M2, E4M3, E5M2), (torch.int8, E5M2, torch.float16)],
    ids=["e4m3_tables", "e5m2_mixed", "int8_fp8_float"],
)
@pytest.mark.parametrize("batch, seq, dim", [(1, 1, 64), (3, 11, 64), (2, 130, 96)], ids=lambda v: str(v))
def test_fp8_tables_and_outputs(device, batch, seq, dim, table_dtypes, out_dtype):
    check_quantized(fp8_embedding_inputs(batch, seq, dim, 1, table_dtypes), device, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FP8_DTYPES)
def test_fp8_identical_rows_quantize_to_zero_safely(device, out_dtype):
    tables = [torch.zeros(5, 16, dtype=E4M3), torch.zeros(3, 16)]
    scales = [torch.ones(5, 1), torch.empty(0)]
    indices = [torch.tensor([[0, 4]]), torch.tensor([[1, 2]])]
    q, scale, normed = check_quantized((indices, tables, scales, torch.ones(16), None, 1e-12), device, out_dtype)
    assert torch.all(q.float() == 0) and not torch.isnan(normed).any() and not torch.isnan(scale).any()


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=5)
@given(
    batch=st.integers(1, 4), seq=st.integers(1, 40), dim=st.integers(1, 200),
    table_dtypes=st.tuples(*[st.sampled_from([E4M3, E5M2, torch.int8, torch.float32])] * 3),
    out_dtype=st.sampled_from([E4M3, E5M2]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_embedding_norm_quant_fp8_hypothesis(device, batch, seq, dim, table_dtypes, out_dtype, bias, seed):
    check_quantized(fp8_embedding_inputs(batch, seq, dim, seed, table_dtypes, bias=bias), device, out_dtype)
