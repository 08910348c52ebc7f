"""zqhero_fx.capture on graphs Dynamo hands a backend (freeze_dynamo_graph and its naming helpers), and the version
guard and error messages of zqhero_fx._dynamo_compat. No conversion here: only what `convert` would receive."""

import warnings

import pytest
import torch
import torch.nn as nn

from zqhero_fx import _dynamo_compat as dynamo
from zqhero_fx import capture
from zqhero_fx.errors import CalibrationError, CaptureError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.layers = nn.ModuleList([nn.Linear(16, 32), nn.Linear(32, 16)])
        self.register_buffer("offset", torch.randn(16))

    def forward(self, x):
        x = self.norm(x)
        return self.layers[1](torch.relu(self.layers[0](x))) + self.offset


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _frozen(fn, *args, names=None, **compile_kwargs):
    """[(Dynamo graph, example inputs, frozen graph, keep, input sources)] for every graph Dynamo hands a backend while
    running fn(*args) compiled. Frozen inside the backend call, as the zqhero backend does: Dynamo drops the
    placeholders' "grapharg" meta once the backend returns."""
    seen = []

    def grab(gm, example_inputs):
        frozen, keep = capture.freeze_dynamo_graph(gm, list(example_inputs), names)
        seen.append((gm, list(example_inputs), frozen, keep, capture.input_sources(gm, keep)))
        return gm.forward

    torch.compile(fn, backend=grab, **compile_kwargs)(*args)
    return seen


@pytest.mark.parametrize("named", [False, True])
def test_freeze_dynamo_graph_makes_weights_named_constants(named):
    model = Net().eval()
    x = torch.randn(3, 5, 16)
    [(gm, examples, frozen, keep, sources)] = _frozen(model, x, names=capture.tensor_names(model) if named else None)
    assert capture.freeze is capture.freeze_dynamo_graph
    targets = {n.target for n in frozen.graph.nodes if n.op == "get_attr"}
    assert {"norm.weight", "norm.bias", "layers.0.weight", "layers.1.bias", "offset"} <= targets
    assert torch.equal(frozen.get_buffer("layers.0.weight"), model.layers[0].weight)
    placeholders = [n for n in frozen.graph.nodes if n.op == "placeholder"]
    assert len(keep) == len(placeholders) == 1  # x alone stays an input
    assert sources == ["L['x']"]
    assert placeholders[0].meta["val"].shape[-1] == 16
    with torch.no_grad():
        (out,) = frozen(*[examples[i] for i in keep])
        torch.testing.assert_close(out, model(x))
    assert "layers.0" in capture.module_paths(frozen)


def test_freeze_folds_module_floats_under_dynamic_true():
    model = nn.Sequential(nn.LayerNorm(8, eps=1e-3), nn.Dropout(0.0), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8)
    [(gm, examples, frozen, keep, sources)] = _frozen(model, x, dynamic=True)
    kept = [examples[i] for i in keep]
    assert all(not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()) for v in kept), kept
    with torch.no_grad():
        out = frozen(*kept)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(x))


def test_freeze_rejects_mismatched_inputs():
    raised = []

    def grab(gm, example_inputs):
        with pytest.raises(CaptureError, match="8 inputs but 7 example inputs") as info:
            capture.freeze_dynamo_graph(gm, list(example_inputs)[:-1])
        raised.append(info.value)
        return gm.forward

    torch.compile(Net().eval(), backend=grab)(torch.randn(2, 4, 16))
    assert raised


@pytest.mark.parametrize("source, path", [
    ("L['self']._modules['layer']._modules['0']._parameters['weight']", "layer.0.weight"),
    ("G['model']._modules['fc']._parameters['bias']", "model.fc.bias"),
    ("L['self']._buffers['offset']", "offset"),
])
def test_module_path_of_source(source, path):
    assert capture.module_path_of_source(source) == path


def test_input_builder_reads_sizes_off_tensors():
    build = capture.input_builder(["L['x']"], ["L['x']", "L['x'].size()[1]"])
    x = torch.zeros(2, 7)
    assert build([x])[0] is x and build([x])[1] == 7
    assert capture.input_builder(["L['x']", "L['y']"], ["L['x']"]) is None  # the other graph baked y in


# ---------------------------------------------------------------- _dynamo_compat: version guard and clear errors
def test_version_guard_warns_once_on_another_torch(monkeypatch):
    monkeypatch.setattr(dynamo, "_WARNED", set())
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    with pytest.warns(RuntimeWarning, match=r"torch 2\.99\.0\+cpu.*calibrating on the first call"):
        assert dynamo.check_torch_version() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dynamo.check_torch_version() is False  # once per version
    import zqhero_fx

    monkeypatch.setattr(dynamo, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="checked against torch 2.13"):
        zqhero_fx.backend(mode="M1")  # using the backend is what checks


def test_version_guard_silent_on_a_checked_torch(monkeypatch):
    monkeypatch.setattr(dynamo, "_WARNED", set())
    monkeypatch.setattr(torch, "__version__", f"{dynamo.CHECKED_TORCH[0]}.7+cu128")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dynamo.check_torch_version() is True


def test_changed_internals_raise_errors_naming_them(monkeypatch):
    from torch._dynamo import eval_frame
    from torch._dynamo.backends import registry

    monkeypatch.setattr(dynamo, "_WRAPPER_CODE", [])
    monkeypatch.setattr(eval_frame._TorchDynamoContext, "__call__", lambda self, fn: fn)
    with pytest.raises(CalibrationError, match=r"_TorchDynamoContext.__call__ defines no compile_wrapper.*calibrate"):
        next(dynamo.compiled_calls())
    monkeypatch.delattr(registry, "_COMPILER_FNS")
    with pytest.raises(CaptureError, match="torch._dynamo.backends.registry"):
        dynamo.register_backend(lambda gm, xs: gm, "zqhero_test")
    monkeypatch.setattr(torch._dynamo, "callback_handler", object())
    with pytest.raises(CaptureError, match="torch._dynamo.callback_handler"):
        dynamo.install_compile_hooks()


def test_compiled_calls_find_the_running_compiled_model():
    model = Net().eval()
    found = []

    def grab(gm, example_inputs):
        found.extend(dynamo.compiled_calls())
        return gm.forward

    compiled = torch.compile(model, backend=grab)
    compiled(torch.randn(2, 3, 16))
    assert found and found[0].module is model and found[0].callback is not None
    assert dynamo.callback_of(compiled) is not None and dynamo.callback_of(model) is None
    assert grab in list(dynamo.callback_chain(dynamo.callback_of(compiled)))
