"""Shared fixtures. Triton kernels run under the interpreter on this CPU-only machine; the default kernel choice
('auto') sends CPU tensors to the C++ CPU kernels (or the references where none applies), so the interpreter only
matters for tests that force Triton."""

import os

import torch

# Without a GPU, Triton kernels run under the interpreter; with one they must compile for real (the gpu tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")  # see zqhero_fx/inductor.py

import pytest  # noqa: E402

from tests.models import bert_batch, encoder_batch, tiny_bert, TinyEncoder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bert_traced():
    """{(shape, attn): (model, traced GraphModule)} built lazily, once per session."""
    import zqhero_fx

    cache = {}

    def get(shape="h64_l2", attn="sdpa"):
        if (shape, attn) not in cache:
            model = tiny_bert(shape, attn)
            cache[(shape, attn)] = (model, zqhero_fx.trace(model, bert_batch(2, 8, seed=1)))
        return cache[(shape, attn)]

    return get


@pytest.fixture(scope="session")
def bert_calibration():
    return [bert_batch(4, 24, seed=i) for i in range(4)]


@pytest.fixture(scope="session")
def encoder_model():
    return TinyEncoder()


@pytest.fixture(scope="session")
def encoder_calibration():
    return [encoder_batch(4, 16, seed=i) for i in range(4)]
