"""quantized_embedding: gather INT8 or FP8 rows and dequantize them, bit-exact against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.kernel_checks import (
    DEVICES,
    FLOAT_DTYPES,
    FP8_DTYPE_LIST,
    FP8_DTYPES,
    random_fp8_codes,
    random_int8,
    run_reference,
    run_triton,
)
from zqhero_fx.kernels import quantized_embedding as E


def make_inputs(index_shape, vocab, dim, seed, scale="row", negative=False):
    g = torch.Generator().manual_seed(seed)
    table = random_int8((vocab, dim), g)
    low = -vocab if negative else 0
    indices = torch.randint(low, vocab, index_shape, generator=g)
    scales = torch.rand((vocab, 1) if scale == "row" else (1,), generator=g) * 0.1
    return indices, table, scales


def test_reference_dequantizes_gathered_rows():
    indices, table, scales = make_inputs((3, 4), 10, 8, 0)
    out = E.quantized_embedding_ref(indices, table, scales, torch.float32)
    torch.testing.assert_close(out, torch.nn.functional.embedding(indices, table.float() * scales), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", ["row", "scalar"])
@pytest.mark.parametrize(
    "index_shape, vocab, dim",
    [((2, 9), 50, 33), ((7,), 1, 1), ((1, 1), 100, 768), ((4, 130), 30, 64)],
    ids=["batch", "single_row_table", "one_token", "seq130"],
)
def test_quantized_embedding_bit_exact(device, index_shape, vocab, dim, scale, out_dtype):
    indices, table, scales = make_inputs(index_shape, vocab, dim, 1, scale)
    out = run_triton("quantized_embedding", device, indices, table, scales, out_dtype)
    ref = run_reference("quantized_embedding", indices, table, scales, out_dtype)
    assert out.shape == (*index_shape, dim) and out.dtype == out_dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_embedding_negative_and_int32_indices(device):
    # Negative ids count from the end, as tensor indexing (the reference) does; int32 ids work as int64 ones.
    indices, table, scales = make_inputs((3, 5), 20, 16, 2, negative=True)
    assert (indices < 0).any()
    ref = run_reference("quantized_embedding", indices, table, scales, torch.float32)
    assert torch.equal(run_triton("quantized_embedding", device, indices, table, scales, torch.float32), ref)
    out32 = run_triton("quantized_embedding", device, indices.int(), table, scales, torch.float32)
    assert torch.equal(out32, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_embedding_strided_table(device):
    g = torch.Generator().manual_seed(3)
    table = random_int8((40, 24), g).t()  # [24 rows, 40 features], column-major
    indices = torch.randint(0, 24, (2, 6), generator=g)
    scales = torch.rand(24, 1, generator=g)
    out = run_triton("quantized_embedding", device, indices, table, scales, torch.float32)
    assert torch.equal(out, run_reference("quantized_embedding", indices, table, scales, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_embedding_out_of_range_index(device):
    # The reference raises. The kernel asserts only with TRITON_DEBUG=1 (device asserts are compiled out otherwise);
    # without it the bad id must not read outside the table: its row comes out as zeros, the others are unaffected.
    indices, table, scales = make_inputs((4,), 10, 8, 4)
    indices[2] = 10
    with pytest.raises(IndexError):
        run_reference("quantized_embedding", indices, table, scales, torch.float32)
    out = run_triton("quantized_embedding", device, indices, table, scales, torch.float32)
    assert torch.all(out[2] == 0)
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(out[keep], run_reference("quantized_embedding", indices[keep], table, scales, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=10)
@given(
    index_shape=st.lists(st.integers(1, 12), min_size=1, max_size=3), vocab=st.integers(1, 60),
    dim=st.integers(1, 200), scale=st.sampled_from(["row", "scalar"]), out_dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantized_embedding_hypothesis(device, index_shape, vocab, dim, scale, out_dtype, seed):
    indices, table, scales = make_inputs(tuple(index_shape), vocab, dim, seed, scale, negative=True)
    out = run_triton("quantized_embedding", device, indices, table, scales, out_dtype)
    assert torch.equal(out, run_reference("quantized_embedding", indices, table, scales, out_dtype))


# ---------------------------------------------------------------- FP8 tables (E4M3, E5M2): bit-exact too
def make_fp8_inputs(index_shape, vocab, dim, seed, fp8, scale="row", negative=False):
    g = torch.Generator().manual_seed(seed)
    table = random_fp8_codes((vocab, dim), fp8, g)  # every finite code: subnormals, both zeros, +-max
    low = -vocab if negative else 0
    indices = torch.randint(low, vocab, index_shape, generator=g)
    scales = torch.rand((vocab, 1) if scale == "row" else (1,), generator=g) * 0.1
    return indices, table, scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", ["row", "scalar"])
@pytest.mark.parametrize(
    "index_shape, vocab, dim", [((2, 9), 50, 33), ((7,), 1, 1), ((4, 130), 30, 64)],
    ids=["batch", "single_row_table", "seq130"],
)
def test_quantized_embedding_fp8_bit_exact(device, index_shape, vocab, dim, scale, out_dtype, fp8):
    indices, table, scales = make_fp8_inputs(index_shape, vocab, dim, 1, fp8, scale, negative=True)
    out = run_triton("quantized_embedding", device, indices, table, scales, out_dtype)
    ref = run_reference("quantized_embedding", indices, table, scales, out_dtype)
    assert out.shape == (*index_shape, dim) and out.dtype == out_dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_embedding_fp8_strided_table_and_int32_ids(device):
    g = torch.Generator().manual_seed(3)
    table = random_fp8_codes((40, 24), torch.float8_e5m2, g).t()  # [24 rows, 40 features], column-major
    indices = torch.randint(0, 24, (2, 6), generator=g, dtype=torch.int32)
    scales = torch.rand(24, 1, generator=g)
    out = run_triton("quantized_embedding", device, indices, table, scales, torch.float32)
    assert torch.equal(out, run_reference("quantized_embedding", indices, table, scales, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=6)
@given(
    index_shape=st.lists(st.integers(1, 12), min_size=1, max_size=3), vocab=st.integers(1, 60),
    dim=st.integers(1, 200), scale=st.sampled_from(["row", "scalar"]), out_dtype=st.sampled_from(FLOAT_DTYPES),
    fp8=st.sampled_from(FP8_DTYPE_LIST), seed=st.integers(0, 2**31 - 1),
)
def test_quantized_embedding_fp8_hypothesis(device, index_shape, vocab, dim, scale, out_dtype, fp8, seed):
    indices, table, scales = make_fp8_inputs(tuple(index_shape), vocab, dim, seed, fp8, scale, negative=True)
    out = run_triton("quantized_embedding", device, indices, table, scales, out_dtype)
    assert torch.equal(out, run_reference("quantized_embedding", indices, table, scales, out_dtype))
